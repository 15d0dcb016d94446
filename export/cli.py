"""`pbs2p-edge export`: model.pt (or an fp32 model for the baselines) -> a validated ONNX bundle directory.

Only click is imported at module level; torch, onnx and onnxruntime load when the command runs.
"""

from __future__ import annotations

import click


@click.command("export")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option(
    "--format",
    "weights",
    type=click.Choice(["pbs2p", "fp32", "int4"]),
    default="pbs2p",
    show_default=True,
    help="pbs2p: SOURCE is a model.pt; fp32/int4 baselines: SOURCE is a model folder, a .gguf, 'default' "
    "or an embedded model's name (pbs2p-edge models).",
)
@click.option(
    "--head",
    type=click.Choice(["fp32", "int8", "int4", "int4s", "int2"]),
    default=None,
    help="Storage of the embedding and LM head [default: int4 for pbs2p and int4, fp32 for fp32]; int4s and "
    "int2 read fewer head bytes per token (zero points, searched scales; export/head.py).",
)
@click.option(
    "--ops-library",
    type=click.Choice(["copy", "reference"]),
    default="copy",
    show_default=True,
    help="Copy the custom-op library into the bundle, or reference its installed path.",
)
@click.option(
    "--accuracy-level",
    type=click.Choice(["0", "4"]),
    default=None,
    help="MatMulNBits compute (int4 layers, int8/int4 head): 0 = fp32, 4 = int8 activations, faster "
    "[default: 4 for pbs2p, as ORT GenAI's builder on CPU; 0 for the int4 baseline, whose free-running "
    "validation int8 rounding pushes below 40 dB].",
)
@click.option(
    "--threshold-db",
    type=float,
    default=None,
    help="Validation: minimum SQNR of logits and custom nodes [default: 40].",
)
@click.option(
    "--graph",
    type=click.Choice(["auto", "fused", "unfused"]),
    default="auto",
    show_default=True,
    help="fused: onnxruntime contrib ops (GroupQueryAttention with a shared KV buffer, SkipSimplifiedLayerNorm); "
    "unfused: plain ONNX ops; auto: fused where the family supports it (docs/FAMILIES.md).",
)
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch comparison.")
@click.pass_context
def export_command(
    ctx: click.Context,
    source: str,
    output: str,
    weights: str,
    head: str | None,
    ops_library: str,
    accuracy_level: str | None,
    threshold_db: float | None,
    graph: str,
    force: bool,
    no_validate: bool,
) -> None:
    """Export SOURCE to an ONNX bundle (model.onnx, ops library, tokenizer, genai_config.json, manifest.json).

    The graph takes input_ids, attention_mask, position_ids and past_key_values.{i}.key/value and returns
    logits and present.{i}.key/value. After writing, the bundle runs in ONNX Runtime against the PyTorch
    model (prefill + 8 decode steps): logits, and for pbs2p every custom node's input and output with the
    graph's own values fed back (teacher-forced); below the SQNR threshold the export fails and nothing is
    left behind.
    """
    from pbs2p_edge.errors import Pbs2pError
    from pbs2p_edge.export.bundle import export_bundle

    try:
        manifest = export_bundle(
            None if weights != "pbs2p" and source == "default" else source,
            output,
            weights=weights,
            head=head,
            force=force,
            validate=not no_validate,
            ops_library=ops_library,
            threshold_db=threshold_db,
            accuracy_level=None if accuracy_level is None else int(accuracy_level),
            graph=graph,
        )
    except Pbs2pError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)
    click.echo(summary(manifest, output))


def summary(manifest: dict, output: str) -> str:
    sizes = manifest["sizes"]
    lines = [
        f"wrote {output}: {manifest['weights']} weights, {manifest['head']} head, "
        f"{sizes['total'] / 1e6:.2f} MB ({sizes['graph_total'] / 1e6:.2f} MB graph + weights) "
        f"in {manifest['export_seconds']:.1f} s"
    ]
    weights = sizes["weights"]
    parts = ", ".join(f"{name} {value / 1e6:.2f} MB" for name, value in weights.items() if value)
    lines.append(f"  weights: {parts}")
    nodes = manifest.get("graph_nodes")
    if nodes:
        lines.append(
            f"  graph: {manifest.get('graph')}, {nodes['total']} nodes ({nodes['per_layer']} per layer)"
        )
    check = manifest.get("validation")
    if check is None:
        lines.append("  validation: skipped (--no-validate)")
    else:
        steps = f"prefill {check['prompt_tokens']} tokens + {check['decode_steps']} decode steps"
        forced = check.get("teacher_forced")
        if forced:
            lines.append(
                f"  validation vs PyTorch ({steps}, teacher-forced, threshold {check['threshold_db']:.0f} dB): "
                f"logits SQNR {forced['sqnr_db']:.1f} dB, max abs diff {forced['max_abs_diff']:.3g}; "
                f"{forced['custom_nodes']} custom nodes: outputs >= {forced['ops_min_sqnr_db']:.1f} dB, "
                f"inputs >= {forced['wiring_min_sqnr_db']:.1f} dB"
                + (
                    f" ({forced['forced_int4_layers']} int4 layers forced too)"
                    if forced.get("forced_int4_layers")
                    else ""
                )
            )
            free, floor = check["free_running"], check["noise_floor"]
            lines.append(
                f"  free-running logits (not gated): SQNR {free['sqnr_db']:.1f} dB, top-1 agreement "
                f"{free['top1_agreement']:.0%}; PyTorch against itself with 1e-6 input noise: "
                f"{floor['sqnr_db']:.1f} dB"
            )
        else:
            lines.append(
                f"  validation vs PyTorch ({steps}): SQNR {check['sqnr_db']:.1f} dB "
                f"(threshold {check['threshold_db']:.0f}), max abs diff {check['max_abs_diff']:.3g}, "
                f"top-1 agreement {check['top1_agreement']:.0%}"
            )
        effect = check.get("head_effect")
        if effect:
            lines.append(
                f"  {manifest['head']} head vs fp32 head (PyTorch): SQNR {effect['sqnr_db']:.1f} dB, "
                f"top-1 agreement {effect['top1_agreement']:.0%}"
            )
    return "\n".join(lines)

"""`pbs2p-edge compress`: HF model (or the embedded default) -> compressed checkpoint model.pt.

Only click is imported at module level; torch and transformers load when the command runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click


@click.command("compress")
@click.option(
    "--model",
    "model_path",
    default=None,
    help="Embedded model name (see `pbs2p-edge models`; default smollm2-135m), HF model folder or .gguf.",
)
@click.option(
    "--text",
    "text_path",
    type=click.Path(),
    default=None,
    help="Calibration text file (default: corpus calibration split).",
)
@click.option("--nm", default="6:8", show_default=True, help="Kept N of every M weights (pruning pattern).")
@click.option(
    "--method",
    type=click.Choice(["pbs2p", "naive", "binarize_only"]),
    default="pbs2p",
    show_default=True,
    help="pbs2p = SPBO + CFS; naive = one-shot prune then binarize; binarize_only = no pruning.",
)
@click.option("--steps", type=int, default=None, help="SPBO pruning steps (default: M - N of each layer).")
@click.option("--calib-samples", type=int, default=None, help="Calibration sequences [default: 32].")
@click.option("--calib-len", type=int, default=None, help="Tokens per calibration sequence [default: 256].")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the calibration sampling and torch."
)
@click.option("--cfs/--no-cfs", default=None, help="Coarse per-layer N search [default: on for pbs2p].")
@click.option(
    "--cfs-delta",
    type=float,
    default=None,
    help="CFS: N change per unit of relative importance [default: 4].",
)
@click.option("--cfs-range", default=None, help="CFS: N_low:N_high bounds of a layer's N [default: N-1:N+1].")
@click.option(
    "--salient",
    default=None,
    help="Salient columns per group with a second sign plane, or 'auto' to search S per layer [default: 1].",
)
@click.option(
    "--salient-max", type=int, default=None, help="--salient auto: largest S tried per layer [default: 4]."
)
@click.option(
    "--salient-rate",
    type=float,
    default=None,
    help="--salient auto: log2-error cost of one bit per weight [default: 2].",
)
@click.option(
    "--binarizer",
    default=None,
    help="Block binarizer: arb, arbx (ARB-X), arbrc (ARB-RC), arbrcx (RC + X) [default: arbx].",
)
@click.option("--rc-mu/--no-rc-mu", default=None, help="RC binarizers: keep a per-row mean [default: off].")
@click.option(
    "--x-iters", type=int, default=None, help="X binarizers: sweep/refit alternations [default: 2]."
)
@click.option("--rescore/--no-rescore", default=None, help="SPBO: re-score between steps [default: on].")
@click.option(
    "--metric", type=click.Choice(["obs", "magnitude"]), default=None, help="Pruning metric [default: obs]."
)
@click.option("--arb-iters", type=int, default=None, help="ARB refinement iterations [default: 15].")
@click.option(
    "--group-size", type=int, default=None, help="Columns per scale group / GPTQ block [default: 128]."
)
@click.option(
    "--damping", type=float, default=None, help="Hessian damping, fraction of mean diag [default: 0.01]."
)
@click.option(
    "--recover-steps",
    type=int,
    default=None,
    help="Block-wise recovery: Adam steps per decoder layer, signs and mask frozen "
    "[default: RECOVER_STEPS_PER_LAYER, fewer above 106 M compressed weights; docs/METHOD.md].",
)
@click.option(
    "--recover-seconds",
    type=float,
    default=None,
    help="Optional wall-time cap on block-wise recovery, seconds over all layers [default: none]. "
    "A capped run depends on machine load.",
)
@click.option("--recover/--no-recover", default=None, help="Turn block-wise recovery on or off.")
@click.option(
    "--recover-target",
    type=click.Choice(["compressed_inputs", "fp_states"]),
    default=None,
    help="Block-wise recovery target: FP layer on the compressed inputs, or the FP model's own states.",
)
@click.option(
    "--e2e-steps",
    type=int,
    default=None,
    help="End-to-end recovery: Adam steps on the KL to the FP model's logits, signs and mask frozen (0 = off) "
    "[default: 512, fewer above 106 M compressed weights but at least 128 (128 at 1.5B); on the low-memory "
    "path (large models) "
    "after the layer loop, by default only where its predicted memory is available (else skipped, saying "
    "why), with the teacher streamed layer by layer over N x micro-batch windows unless --e2e-samples says "
    "otherwise].",
)
@click.option(
    "--e2e-seconds",
    type=float,
    default=None,
    help="Optional wall-time cap on end-to-end recovery, seconds [default: none].",
)
@click.option(
    "--e2e-samples",
    type=int,
    default=None,
    help="Calibration windows the end-to-end pass trains on (the block stages' windows come first) "
    "[default: 1024].",
)
@click.option(
    "--e2e-chat",
    type=float,
    default=None,
    help="Share of the end-to-end windows that are chat-formatted conversations about calibration articles, "
    "so the pass also covers the chat template's positions [default: 0.25 when the tokenizer has a chat "
    "template and no --text is given, else 0].",
)
@click.option(
    "--e2e-chat-file",
    type=click.Path(),
    default=None,
    help='JSONL conversations ({"messages": [...]} per line, e.g. from `pbs2p-edge replies`) that fill the '
    "chat-formatted windows instead of the built-in article questions.",
)
@click.option(
    "--e2e-dtype",
    default=None,
    metavar="[auto|float32|bfloat16]",
    help="Precision the end-to-end steps compute in: bfloat16 autocast measured 1.57x faster on a CPU "
    "with AVX512_BF16 at the same quality, expected slower without native bf16 (not measured); the "
    "keep-or-revert check's forward stays float32 (the teacher's: --e2e-teacher-dtype). auto: bfloat16 on "
    "CPUs with native bf16 (AVX512_BF16, "
    "AMX-BF16, arm64 BF16), else float32 [default: auto].",
)
@click.option(
    "--e2e-teacher-dtype",
    default=None,
    metavar="[auto|float32|bfloat16]",
    help="Precision of the FP model's forward that makes the end-to-end targets: bfloat16 autocast measured "
    "1.6-1.8x faster per window on a CPU with AVX512_BF16, its targets at a top-k KL of 0.0003-0.0006 to "
    "float32's. "
    "auto: as --e2e-dtype [default: auto].",
)
@click.option(
    "--e2e-schedule",
    default=None,
    metavar="[constant|cosine]",
    help="End-to-end learning rate: constant, or a cosine decay to 0 over the steps [default: constant].",
)
@click.option(
    "--e2e-head",
    default=None,
    metavar="[float|int4]",
    help="The head the end-to-end pass trains through: the float weights, or the int4 head the default "
    "bundle computes with (the checkpoint keeps the float weights) [default: int4].",
)
@click.option(
    "--budget-bits",
    type=float,
    default=None,
    help="Honest bits/weight to spend over the compressed linears: the most sensitive layers go int4 "
    "[default: 2.5 when the N:M pattern stores less].",
)
@click.option(
    "--budget/--no-budget", "budget", default=None, help="Turn the bit budget on or off [default: on]."
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint to write (model.pt).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.pass_context
def compress_command(ctx: click.Context, **options: Any) -> None:
    """Compress a LLaMA-family model with PBS2P (or a baseline) into a checkpoint."""
    from pbs2p_edge.errors import Pbs2pError

    try:
        _run(**options)
    except Pbs2pError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)


def build_config(options: dict[str, Any]) -> Any:
    from pbs2p_edge.config import PBS2PConfig, parse_nm

    n, m = parse_nm(options["nm"])
    chosen = {
        "steps": options["steps"],
        "calib_samples": options["calib_samples"],
        "calib_len": options["calib_len"],
        "cfs": options["cfs"],
        "cfs_delta": options["cfs_delta"],
        "binarizer": options["binarizer"],
        "rc_mu": options["rc_mu"],
        "x_iters": options["x_iters"],
        "salient_rate": options["salient_rate"],
        "rescore": options["rescore"],
        "prune_metric": options["metric"],
        "arb_iters": options["arb_iters"],
        "group_size": options["group_size"],
        "damping": options["damping"],
        "recover_steps": _steps(options["recover_steps"], "--recover-steps"),
        "recover_seconds": _budget(options["recover_seconds"], "--recover-seconds"),
        "recover_target": options["recover_target"],
        "budget_bits": options["budget_bits"],
        "budget": options["budget"],
        "e2e_steps": _steps(options["e2e_steps"], "--e2e-steps", allow_zero=True),
        "e2e_seconds": _budget(options["e2e_seconds"], "--e2e-seconds"),
        "e2e_samples": options["e2e_samples"],
        "e2e_schedule": options["e2e_schedule"],
        "e2e_head": options["e2e_head"],
        "e2e_chat": options["e2e_chat"],
        "e2e_chat_file": options["e2e_chat_file"],
        "e2e_dtype": options["e2e_dtype"],
        "e2e_teacher_dtype": options["e2e_teacher_dtype"],
    }
    if options["recover"] is False:
        chosen["recover_steps"] = 0
    _check_caps(chosen)
    if options["cfs_range"] is not None:
        chosen["cfs_n_low"], chosen["cfs_n_high"] = _parse_range(options["cfs_range"])
    chosen.update(_parse_salient(options["salient"], options["salient_max"]))
    settings = {key: value for key, value in chosen.items() if value is not None}
    if options["e2e_chat_file"] is not None:  # read now, not after minutes of loading the model
        from pbs2p_edge.conversations import read_conversations

        read_conversations(options["e2e_chat_file"])
    return PBS2PConfig(n=n, m=m, method=options["method"], seed=options["seed"], **settings)


# Models whose fp32 weights exceed this are compressed one decoder layer at a time from their safetensors
# (compress/lowmem.py); smaller ones are held whole, which the default end-to-end pass needs.
LOW_MEMORY_BYTES = 2 << 30


def _needs_low_memory(folder: Path) -> bool:
    from transformers import AutoConfig

    from pbs2p_edge import memcheck
    from pbs2p_edge.config import SUPPORTED_MODEL_TYPES

    if os.environ.get("PBS2P_EDGE_LOW_MEMORY") == "1":
        return True
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False  # the in-memory path's check_supported names the problem
    return memcheck.fp32_model_bytes(config) > LOW_MEMORY_BYTES


def load_for_compress(folder: Path) -> tuple[Any, Any, Any]:
    """(model, tokenizer, layer store or None) as `compress` takes them: a skeleton whose decoder layers are
    read one at a time from the safetensors when the fp32 model is large (`_needs_low_memory`), else the whole
    model."""
    from pbs2p_edge import sources
    from pbs2p_edge.compress.lowmem import has_safetensors, skeleton_model

    if has_safetensors(folder) and _needs_low_memory(folder):  # one decoder layer in RAM at a time
        model, store = skeleton_model(folder)
        return model, sources.load_tokenizer(folder), store
    model, tokenizer = sources.load_model(folder)
    return model, tokenizer, None


def _budget(value: float | None, flag: str, allow_zero: bool = False) -> float | None:
    from pbs2p_edge.errors import Pbs2pError

    if value is None:
        return None
    if value < 0 or (value == 0 and not allow_zero) or value != value or value > 1e6:
        bound = ">= 0" if allow_zero else "> 0"
        raise Pbs2pError(f"{flag} must be a number of seconds {bound} (got {value})")
    return float(value)


def _steps(value: int | None, flag: str, allow_zero: bool = False) -> int | None:
    from pbs2p_edge.config import MAX_STEPS
    from pbs2p_edge.errors import Pbs2pError

    if value is None:
        return None
    if value < 0 or (value == 0 and not allow_zero) or value > MAX_STEPS:
        bound = ">= 0" if allow_zero else "> 0"
        raise Pbs2pError(f"{flag} must be a number of steps {bound} and at most {MAX_STEPS} (got {value})")
    return value


def _check_caps(chosen: dict[str, Any]) -> None:
    """A wall-time cap alone does not turn a stage on: say so instead of silently doing nothing."""
    from pbs2p_edge.config import E2E_STEPS
    from pbs2p_edge.errors import Pbs2pError

    e2e_steps = chosen["e2e_steps"] if chosen["e2e_steps"] is not None else E2E_STEPS
    if chosen["e2e_seconds"] is not None and e2e_steps == 0:
        raise Pbs2pError("--e2e-seconds only caps the end-to-end pass; turn it on with --e2e-steps N")
    if chosen["recover_seconds"] is not None and chosen["recover_steps"] == 0:
        raise Pbs2pError("--recover-seconds caps block-wise recovery, which --no-recover turns off")


def _parse_range(text: str) -> tuple[int, int]:
    from pbs2p_edge.errors import Pbs2pError

    low, sep, high = text.partition(":")
    try:
        return int(low), int(high)
    except ValueError:
        raise Pbs2pError(f"invalid CFS range {text!r}: expected N_low:N_high like 5:7") from None


def _parse_salient(text: str | None, largest: int | None) -> dict[str, Any]:
    """--salient N (fixed S) or --salient auto (search 0..--salient-max per layer)."""
    from pbs2p_edge.errors import Pbs2pError

    if text is not None and text.strip().lower() == "auto":
        return {"salient_search": True, "salient": 4 if largest is None else largest}
    if largest is not None:
        raise Pbs2pError("--salient-max applies to --salient auto only")
    if text is None:
        return {}
    try:
        return {"salient": int(text)}
    except ValueError:
        raise Pbs2pError(f"invalid --salient {text!r}: expected a column count or 'auto'") from None


def _run(**options: Any) -> None:

    from pbs2p_edge.errors import Pbs2pError, require_new_output

    config = build_config(options)
    output = Path(options["output"])
    if output.is_dir():
        raise Pbs2pError(f"output {output} is a directory")
    require_new_output(output, options["force"])

    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import read_tokenizer_files, save_checkpoint
    from pbs2p_edge.compress.pipeline import (
        calibration_windows,
        check_supported,
        compress,
        resolve_e2e_chat,
    )

    folder = sources.model_files(options["model_path"])
    model, tokenizer, store = load_for_compress(folder)
    check_supported(model)
    e2e_runs = config.e2e_steps_for(1) > 0
    e2e_skipped = ""
    if store is not None:
        from pbs2p_edge import memcheck

        needed = memcheck.compress_bytes(model.config, config.calib_samples, config.calib_len)
        e2e_needed = memcheck.lowmem_e2e_bytes(model.config, config.e2e_micro_batch, config.calib_len)
        if e2e_runs and config.e2e_steps is None:
            config, e2e_skipped = _streamed_e2e_default(config, model, max(needed, e2e_needed))
            e2e_runs = not e2e_skipped
        if e2e_runs:
            needed = max(needed, e2e_needed)
        memcheck.require(needed, f"compressing {folder.name}")
        if e2e_runs and options["e2e_samples"] is None:  # the teacher costs per window: each seen once
            import dataclasses

            config = dataclasses.replace(config, e2e_samples=config.e2e_steps_for(1) * config.e2e_micro_batch)
    # the chat share matters (and needs a template) only where the end-to-end pass runs
    if e2e_runs:
        config = resolve_e2e_chat(config, tokenizer, options["text_path"])
    calib, e2e_ids = calibration_windows(tokenizer, config, options["text_path"])
    tokenizer_files = read_tokenizer_files(folder)
    compressed = compress(
        model,
        config,
        calib,
        tokenizer_files=tokenizer_files,
        progress=not options["no_progress"],
        store=store,
        e2e_ids=e2e_ids,
    )
    if e2e_skipped:
        compressed.results["e2e"] = {"skipped": e2e_skipped}
    compressed.weights.clear()  # the packed arrays are what the checkpoint stores
    save_checkpoint(compressed, output)
    click.echo(summary(compressed.results, output))


def _streamed_e2e_default(config: Any, model: Any, needed: int) -> tuple[Any, str]:
    """The default end-to-end pass on the layer-streaming path: the steps the in-memory path would take at
    this size (`e2e_steps_for`: the default model's total work, at least E2E_MIN_STEPS; 128 at 1.5B) where
    the pass's predicted peak is available; else off, with the reason (config, reason or "")."""
    import dataclasses

    from pbs2p_edge import memcheck
    from pbs2p_edge.compress.pipeline import linear_names

    if not memcheck.fits(needed):
        return dataclasses.replace(config, e2e_steps=0), f"it {memcheck.shortfall(needed)}"
    names = linear_names(model)
    weights = sum(layer.get_submodule(n).weight.numel() for layer in model.model.layers for n in names)
    return dataclasses.replace(config, e2e_steps=config.e2e_steps_for(weights)), ""


def _chat_text(e2e: dict[str, Any]) -> str:
    return f" ({e2e['chat_windows']} chat-formatted)" if e2e.get("chat_windows") else ""


def _salient_text(results: dict[str, Any]) -> str:
    counts = results.get("salient_per_linear") or []
    if not counts:
        return "?"
    if len(set(counts)) == 1:
        return str(counts[0])
    return f"{min(counts)}..{max(counts)} (mean {sum(counts) / len(counts):.2f}, searched)"


def _stage_seconds(results: dict[str, Any]) -> str:
    """Where the compress time went: the decoder layers, the end-to-end pass, and everything else (mostly
    the teacher's top-k and the dense passes)."""
    layers = sum(results.get("layer_seconds") or [])
    e2e = (results.get("e2e") or {}).get("seconds", 0.0)
    if not layers:
        return ""
    rest = results["seconds"] - layers - e2e
    return f" (decoder layers {layers:.1f} s, end-to-end pass {e2e:.1f} s, the rest {rest:.1f} s)"


def summary(results: dict[str, Any], output: Any) -> str:
    layer_n = results["layer_n"]
    lines = [
        f"wrote {output}: {results['method']} {results['nm']} "
        f"({results['calibration']['samples']} x {results['calibration']['seq_len']} calibration tokens)",
        f"  bits per weight (compressed linears): {results['bits_per_weight']:.3f} honest "
        f"(signs + mask + scales), {results['bits_per_weight_paper_style']:.3f} paper-style (kept signs only)",
        f"  binarizer: {results.get('binarizer', 'arb')}, salient columns per group: {_salient_text(results)}",
        f"  per-layer N: {' '.join(map(str, layer_n))} (parameter-weighted average {results['average_n']:.3f})",
        f"  time: {results['seconds']:.1f} s{_stage_seconds(results)}",
    ]
    budget = results.get("budget") or {}
    if budget:
        lines.append(
            f"  bit budget {budget['budget_bits']:g} (pattern alone {budget['pattern_bits']:.3f}): "
            f"int4 decoder layers {budget['int4_layers'] or 'none'}"
        )
    if "projected_bundle_bytes" in results:
        lines.append(
            f"  projected bundle weights (int4 head): {results['projected_bundle_bytes'] / 1e6:.1f} MB"
        )
    recovery = results.get("recovery") or []
    if recovery:
        kept = sum(1 for r in recovery if r["kept"])
        before = sum(r["before"] for r in recovery) / len(recovery)
        after = sum(r["after"] for r in recovery) / len(recovery)
        lines.append(
            f"  block recovery: mean layer error {before:.3f} -> {after:.3f} (relative to the layer's update), "
            f"kept in {kept}/{len(recovery)} layers, {sum(r['steps'] for r in recovery)} steps"
            + _capped([r.get("capped", False) for r in recovery])
        )
    e2e = results.get("e2e") or {}
    if e2e.get("skipped"):
        lines.append(f"  end-to-end recovery skipped: {e2e['skipped']}")
    elif e2e:
        lines.append(
            f"  end-to-end recovery: top-k KL {e2e['before']:.4f} -> {e2e['after']:.4f} "
            f"({'kept' if e2e['kept'] else 'discarded'}, {e2e['steps']} steps"
            + (
                f" over {e2e['windows']} windows{_chat_text(e2e)}, {e2e['head']} head"
                f"{', bfloat16 steps' if e2e.get('dtype') == 'bfloat16' else ''}"
                f"{', bfloat16 teacher' if e2e.get('teacher_dtype') == 'bfloat16' else ''})"
                if "windows" in e2e
                else ")"
            )
            + _capped([e2e.get("capped", False)])
        )
    return "\n".join(lines)


def _capped(flags: list[bool]) -> str:
    hit = sum(flags)
    if not hit:
        return ""
    return f"; the wall-time cap cut {hit} of {len(flags)} runs short (the result depends on machine load)"

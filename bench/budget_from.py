"""What the bit budget's int4 layers buy on an already compressed model (issue 10), without recompressing.

`pbs2p-edge compress` keeps the layers its probe finds most sensitive in int4 (MatMulNBits 4-bit, 5.0 bits per
weight) and compresses the rest around them. This script takes a finished model.pt (say, the 1.5B model after
its end-to-end passes, compressed before the streaming path had the budget) and keeps the given decoder
layers in int4 instead: each of their linears quantized from the FP model's own weights (its safetensors,
read one tensor at a time), the packed arrays dropped, a bias moved to the dense state. Everything else,
tuned norms included, stays as it was. It reports perplexity (fp32 head and the deployed int4 head) and honest
bits per weight before and after, and with `--save` writes the new model.pt (loadable by `eval`, `export`,
and `bench/e2e_from.py` for more end-to-end steps):

    .venv/bin/python bench/budget_from.py --from e2e-72.pt --model qwen2.5-coder-1.5b \\
        --plan bench/results/budget-qwen1.5b.json --save int4.pt --name budget-from-qwen1.5b

Layers come from `--layers 0,1,27` or from `--plan` (the int4 layers of a `bench/sensitivity.py` report).
Results: bench/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from peers import exit_usage, write_report

RESULTS = Path(__file__).resolve().parent / "results"


def keep_int4(ckpt: dict[str, Any], folder: Path, layers: list[int]) -> list[str]:
    """Move the linears of decoder `layers` from the checkpoint's packed arrays to int4 `nbits` entries made
    from the FP weights in `folder`; return their names."""
    import torch

    from pbs2p_edge.compress.budget import int4_entry
    from pbs2p_edge.compress.lowmem import LayerStore
    from pbs2p_edge.errors import Pbs2pError
    from pbs2p_edge.format import PackedWeight

    count = int(ckpt["model_config"]["num_hidden_layers"])
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise Pbs2pError(f"layers {bad} do not exist: the model has decoder layers 0..{count - 1}")
    store = LayerStore(folder)
    moved = []
    for index in layers:
        prefix = f"model.layers.{index}."
        names = [name for name in ckpt["packed"] if name.startswith(prefix)]
        if not names:
            raise Pbs2pError(f"decoder layer {index} has no packed linears (already kept in int4?)")
        for name in names:
            fp = store.tensors([f"{name}.weight"])[f"{name}.weight"]
            packed = PackedWeight.from_arrays(ckpt["packed"].pop(name))
            if fp.shape != (packed.rows, packed.k):
                raise Pbs2pError(f"{name}: the FP weight {list(fp.shape)} is not the packed layer's shape")
            ckpt["nbits"][name], _ = int4_entry(fp)
            if packed.has_bias:
                ckpt["dense_state"][f"{name}.bias"] = torch.from_numpy(
                    packed.arrays["bias"].astype("float32")
                )
            moved.append(name)
    return moved


def honest_bits(ckpt: dict[str, Any], unpacked: dict[str, Any]) -> dict[str, Any]:
    """The compress summary's bit counts for the checkpoint as it stands (pipeline.summarize_results);
    `unpacked` holds (at least) its packed layers unpacked, so a 1.5B model is unpacked once for both counts."""
    from pbs2p_edge.checkpoint import packed_layers
    from pbs2p_edge.compress.pipeline import summarize_results
    from pbs2p_edge.config import PBS2PConfig

    compression = dict(ckpt["compression"])
    old = compression.pop("results")
    config = PBS2PConfig.from_dict(compression)
    packed = packed_layers(ckpt)
    weights = {name: unpacked[name] for name in packed}
    calib = old["calibration"]
    summary = summarize_results(
        config,
        (calib["samples"], calib["seq_len"]),
        old["layer_n"],
        old.get("layer_cosine", []),
        old.get("layer_importance", []),
        packed,
        weights,
        {name: s for name, s in old.get("layers", {}).items() if name in packed},  # int4 ones: no stats
        ckpt["nbits"],
    )
    return {**old, **summary}


def evaluate(ckpt: dict[str, Any], tokens: int, ctx: int) -> dict[str, float]:
    from e2e_from import ppl_int4_head

    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import build_model
    from pbs2p_edge.evaluate import perplexity

    model, tokenizer = build_model(ckpt)
    eval_ids = sources.evaluation_ids(tokenizer, tokens)
    return {
        "ppl": perplexity(model, eval_ids, ctx=ctx, progress=False)["ppl"],
        "ppl_int4_head": ppl_int4_head(model, eval_ids, ctx),
    }


def chosen_layers(args: argparse.Namespace) -> list[int]:
    if (args.layers is None) == (args.plan is None):
        exit_usage("give the layers to keep in int4: --layers 0,1,27 or --plan PLAN.json")
    if args.plan is not None:
        try:
            return sorted(int(i) for i in json.loads(args.plan.read_text())["budget"]["int4_layers"])
        except (OSError, ValueError, KeyError, TypeError):
            exit_usage(f"{args.plan} is not a bench/sensitivity.py report with int4 layers")
    try:
        return sorted({int(i) for i in args.layers.split(",")})
    except ValueError:
        exit_usage(f"--layers {args.layers!r}: expected comma-separated layer indices")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch
    from e2e_from import start_checkpoint

    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import packed_layers
    from pbs2p_edge.errors import Pbs2pError, atomic_path
    from pbs2p_edge.format import unpack

    layers = chosen_layers(args)
    ckpt = start_checkpoint(args.source)
    ckpt.setdefault("nbits", {})
    unpacked = {name: unpack(p) for name, p in packed_layers(ckpt).items()}
    before = honest_bits(ckpt, unpacked)
    try:
        folder = sources.model_files(args.model)
        changed = copy.copy(ckpt)
        changed["packed"], changed["nbits"] = dict(ckpt["packed"]), dict(ckpt["nbits"])
        changed["dense_state"] = dict(ckpt["dense_state"])
        moved = keep_int4(changed, folder, layers)
    except Pbs2pError as exc:
        exit_usage(str(exc))
    after = honest_bits(changed, unpacked)
    del unpacked
    budget = dict(before.get("budget") or {})
    int4_layers = sorted({*budget.get("int4_layers", []), *layers})
    after["budget"] = {**budget, "int4_layers": int4_layers, "added_from_fp": layers}
    changed["compression"] = {**ckpt["compression"], "results": after}
    t0 = time.perf_counter()
    rows = [
        {"model": args.source.name, "int4_layers": budget.get("int4_layers", []), **_bits(before)},
        {"model": f"{args.source.name} + int4 {layers}", "int4_layers": int4_layers, **_bits(after)},
    ]
    for row, state in zip(rows, (ckpt, changed), strict=True):
        row.update(evaluate(state, args.tokens, args.ctx))
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.save:
        with atomic_path(args.save) as tmp:
            torch.save(changed, tmp)
    return {
        "source": str(args.source),
        "teacher": folder.name,
        "moved": moved,
        "rows": rows,
        "eval_tokens": args.tokens,
        "ctx": args.ctx,
        "seconds": time.perf_counter() - t0,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, CPython {platform.python_version()}",
    }


def _bits(results: dict[str, Any]) -> dict[str, float]:
    keys = ("bits_per_weight", "bits_per_weight_mask_coded", "bits_per_weight_paper_style")
    return {key: float(results[key]) for key in keys}


def markdown(report: dict[str, Any], command: str) -> str:
    lines = [
        "# Decoder layers kept in int4 after compression",
        "",
        f"Command: `{command}`  ",
        f"Teacher (FP weights of the int4 layers): {report['teacher']}. Evaluation: {report['eval_tokens']} "
        f"tokens of the evaluation split, ctx {report['ctx']}. {report['machine']}; {report['measured']}.",
        "",
        "| model | int4 layers | bits/w stored | mask coded | paper-style | perplexity | int4 head |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['int4_layers'] or '-'} | {row['bits_per_weight']:.3f} | "
            f"{row['bits_per_weight_mask_coded']:.3f} | {row['bits_per_weight_paper_style']:.3f} | "
            f"{row['ppl']:.2f} | {row['ppl_int4_head']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from", dest="source", type=Path, required=True, help="compressed model.pt")
    parser.add_argument("--model", default=None, help="the FP model it was compressed from (default model)")
    parser.add_argument("--layers", default=None, help="decoder layers to keep in int4, e.g. 0,1,27")
    parser.add_argument("--plan", type=Path, default=None, help="a bench/sensitivity.py report (.json)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--save", type=Path, default=None, help="write the new model.pt here")
    parser.add_argument("--name", default="budget-from", help="output stem under bench/results/")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.ctx < 2:
        exit_usage(f"--tokens and --ctx must be >= 2 (got {args.tokens}, {args.ctx})")
    report = run(args)
    command = "bench/budget_from.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(report, command)
    write_report(args.out_dir / args.name, report, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end KL recovery measured from one compressed model (issue 10), without recompressing.

`compress` runs the end-to-end pass (`--e2e-steps`) after the block-wise stage, on the finished model. This
script starts from a model.pt written by `pbs2p-edge compress` (E2E off) and runs exactly that pass for each
step count given, each variant from the same starting weights, so one compress serves every variant:

    nice -n 10 .venv/bin/python bench/e2e_from.py --from default.pt --steps 0,16,48,96 --name e2e

A start model compressed from another model names its teacher with `--model` (e.g. `--model qwen2.5-coder-1.5b`
with a model.pt from the layer-streaming path, which runs the same pass when given `--e2e-steps`).

For each variant it reports the top-k KL to the FP model on the calibration windows the pass trains on, the
same KL on held-out windows drawn from the calibration split with another seed (the overfitting check; the
evaluation split is never used for choosing), and the perplexity on the evaluation windows (what the ablation
scores). `--save DIR` writes each variant as DIR/e2e-<steps>.pt, a checkpoint `pbs2p-edge eval` and
`bench/compress_table.py --import` read like any other. Results: bench/results/NAME.{md,json} (merged by
(steps, lr, micro-batch)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def ppl_int4_head(model: Any, eval_ids: Any, ctx: int) -> float:
    """Perplexity through the int4 head the default bundle computes with (what `eval BUNDLE` scores, but for
    the fp16 rounding of the bundle's scales)."""
    from pbs2p_edge.compress.head import deployed_head
    from pbs2p_edge.evaluate import perplexity

    with deployed_head(model, "int4"):
        return perplexity(model, eval_ids, ctx=ctx, progress=False)["ppl"]


def _kl_int4_head(model: Any, ids: Any, teacher: tuple[Any, Any], micro_batch: int) -> float:
    from pbs2p_edge.compress.head import deployed_head
    from pbs2p_edge.compress.recover import mean_topk_kl

    with deployed_head(model, "int4"):
        return mean_topk_kl(model, ids, teacher, micro_batch)


def save_variant(
    ckpt: dict[str, Any], model: Any, weights: dict[str, Any], stats: dict[str, Any], steps: int, path: Path
) -> None:
    """The starting checkpoint with the tuned scales (packed) and RMSNorm weights, and the E2E record."""
    import torch

    from pbs2p_edge.errors import atomic_path
    from pbs2p_edge.format import pack

    state = model.state_dict()
    out = dict(ckpt)
    out["dense_state"] = {key: state[key].detach().clone() for key in ckpt["dense_state"]}
    out["packed"] = {
        name: {key: torch.from_numpy(array.copy()) for key, array in pack(w).arrays.items()}
        for name, w in weights.items()
    }
    compression = dict(ckpt["compression"])
    compression["e2e_steps"] = (compression.get("e2e_steps") or 0) + steps  # a start model's own pass counts
    results = compression["results"]
    # as if `compress` had run the pass: its seconds count in the compress time
    compression["results"] = {**results, "e2e": stats, "seconds": results["seconds"] + stats["seconds"]}
    out["compression"] = compression
    with atomic_path(path) as tmp:
        torch.save(out, tmp)


def e2e_config(cfg: dict[str, Any], args: argparse.Namespace) -> Any:
    """The start model's calibration settings with this run's E2E windows (and their chat share)."""
    from pbs2p_edge.config import PBS2PConfig

    return PBS2PConfig(
        calib_samples=cfg["calib_samples"],
        calib_len=cfg["calib_len"],
        seed=args.window_seed,
        e2e_samples=args.samples,
        e2e_chat=args.chat,
        e2e_chat_file=args.chat_file,
    )


def start_checkpoint(source: Path) -> dict[str, Any]:
    """The start model.pt, or one `error:` line and exit 2 (missing, unreadable, not a checkpoint)."""
    from peers import exit_usage

    from pbs2p_edge.checkpoint import load_checkpoint
    from pbs2p_edge.errors import Pbs2pError

    try:
        return load_checkpoint(source)
    except Pbs2pError as exc:
        exit_usage(str(exc))


def teacher_for(ckpt: dict[str, Any], model: str | None) -> tuple[Any, Any]:
    """(FP model in fp32 eval mode, tokenizer) of `model` (None: the default), refused with Pbs2pError when
    the checkpoint was not compressed from a model of its shapes."""
    from pbs2p_edge import sources
    from pbs2p_edge.errors import Pbs2pError

    fp_model, tokenizer = sources.load_model(model)
    shape_keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    fp_shape = {key: getattr(fp_model.config, key, None) for key in shape_keys}
    if fp_shape != {key: ckpt["model_config"].get(key) for key in shape_keys}:
        raise Pbs2pError(
            f"the start model was not compressed from this teacher ({fp_shape}): pass its --model"
        )
    return fp_model.float().eval(), tokenizer


def run(args: argparse.Namespace, ckpt: dict[str, Any], write: Any) -> list[dict[str, Any]]:
    import torch
    from tqdm.auto import tqdm

    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import build_model, packed_layers
    from pbs2p_edge.compress.head import deployed_head
    from pbs2p_edge.compress.pipeline import calibration_windows
    from pbs2p_edge.compress.recover import mean_topk_kl, recover_e2e, teacher_topk
    from pbs2p_edge.evaluate import perplexity
    from pbs2p_edge.format import unpack

    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = ckpt["compression"]
    fp_model, tokenizer = teacher_for(ckpt, args.model)
    _, calib = calibration_windows(tokenizer, e2e_config(cfg, args))
    held = sources.calibration_ids(tokenizer, args.holdout, cfg["calib_len"], cfg["seed"] + 1000)
    eval_ids = sources.evaluation_ids(tokenizer, args.tokens)
    teacher = teacher_topk(
        fp_model, calib, args.topk, args.micro_batch, progress=True, dtype=args.teacher_dtype
    )
    # the held-out check scores against float32 targets whatever the training teacher's precision
    held_teacher = teacher_topk(fp_model, held, args.topk, args.micro_batch, progress=True)
    del fp_model
    n_first = cfg["calib_samples"]  # calib KL on the block stages' windows, which every variant trains on
    rows = []
    for steps in args.steps:
        torch.manual_seed(cfg["seed"])
        model, _ = build_model(ckpt)
        weights = {name: unpack(p) for name, p in packed_layers(ckpt).items()}
        stats: dict[str, Any] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        if steps > 0:
            with deployed_head(model, args.head), tqdm(total=steps, desc="E2E", unit="step") as bar:
                stats = recover_e2e(
                    model,
                    weights,
                    calib,
                    teacher,
                    steps=steps,
                    lr=args.lr,
                    micro_batch=args.micro_batch,
                    seed=cfg["seed"],
                    schedule=args.schedule,
                    check_samples=cfg["calib_samples"],
                    dtype=args.dtype,
                    progress=lambda done: bar.update(done - bar.n),
                )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {
            "steps": steps,
            "lr": args.lr,
            "samples": args.samples,
            "schedule": args.schedule,
            "chat": args.chat,
            "chat_file": args.chat_file and Path(args.chat_file).name,
            "dtype": args.dtype,
            "teacher_dtype": args.teacher_dtype,
            "micro_batch": args.micro_batch,
            "topk": args.topk,
            "window_seed": args.window_seed,
            "kept": stats.get("kept", False),
            "calib_kl": mean_topk_kl(
                model, calib[:n_first], (teacher[0][:n_first], teacher[1][:n_first]), args.micro_batch
            ),
            "heldout_kl": mean_topk_kl(model, held, held_teacher, args.micro_batch),
            "head": args.head,
            "ppl": perplexity(model, eval_ids, ctx=args.ctx, progress=False)["ppl"],
            "ppl_int4_head": ppl_int4_head(model, eval_ids, args.ctx),
            "heldout_kl_int4_head": _kl_int4_head(model, held, held_teacher, args.micro_batch),
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "torch_threads": torch.get_num_threads(),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.save and steps > 0:
            args.save.mkdir(parents=True, exist_ok=True)
            save_variant(ckpt, model, weights, stats, steps, args.save / f"e2e-{steps}.pt")
        rows.append(row)
        write(row)  # after each variant, so a long run keeps what it has measured
        del model, weights
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# End-to-end KL recovery from one compressed model",
        "",
        f"Command: `{meta['command']}`  ",
        f"Last start model: `{meta['source']}` ({meta['source_config']}).  ",
        f"Calibration (the pass trains on it): {meta['calib']}; held-out: {meta['holdout']} windows of the "
        f"calibration split, another seed. Evaluation: {meta['tokens']} tokens of the evaluation split, ctx {meta['ctx']}.  ",
        f"Machine: {meta['machine']}; shared by other jobs, so seconds are not speed claims.",
        "",
        "| start model | windows | chat share | step dtype | teacher | schedule | trained through head | E2E steps | lr | micro-batch | kept | calib KL | held-out KL | held-out KL, int4 head | eval perplexity | same, int4 head | wall s | CPU s | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('source', '-')} | {r['samples']} | {r.get('chat', 0.0):g} | {r.get('dtype', 'float32')} | {r.get('teacher_dtype', 'float32')} | {r['schedule']} | {r['head']} | {r['steps']} | {r['lr']:g} | {r['micro_batch']} | {'yes' if r['kept'] else '-'} | {r['calib_kl']:.4f} | "
            f"{r['heldout_kl']:.4f} | {_maybe(r.get('heldout_kl_int4_head'), 4)} | {r['ppl']:.2f} | {_maybe(r.get('ppl_int4_head'))} | {r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['measured']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from", dest="source", type=Path, required=True, help="model.pt from pbs2p-edge compress"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the FP model the start checkpoint was compressed from, the teacher (a name `pbs2p-edge eval` "
        "takes or a folder; default: the default model)",
    )
    parser.add_argument(
        "--steps", default="0,16,48", help="comma list of E2E step counts (0 = the start model)"
    )
    parser.add_argument("--lr", type=float, default=None, help="E2E learning rate (default: PBS2PConfig's)")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="sequences per step (default: PBS2PConfig's)"
    )
    parser.add_argument(
        "--samples", type=int, default=None, help="calibration windows to train on (default: PBS2PConfig's)"
    )
    parser.add_argument(
        "--schedule", choices=["constant", "cosine"], default=None, help="learning-rate schedule"
    )
    parser.add_argument("--head", choices=["float", "int4"], default=None, help="head to train through")
    parser.add_argument(
        "--chat",
        type=float,
        default=0.0,
        help="share of the windows that are chat-formatted (compress --e2e-chat)",
    )
    parser.add_argument(
        "--chat-file",
        default=None,
        help="JSONL conversations for the chat-formatted windows (compress --e2e-chat-file)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="precision of the steps (--e2e-dtype)",
    )
    parser.add_argument(
        "--teacher-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="precision of the training teacher's forward (--e2e-teacher-dtype)",
    )
    parser.add_argument("--topk", type=int, default=None, help="teacher top-k (default: PBS2PConfig's)")
    parser.add_argument("--holdout", type=int, default=16, help="held-out calibration-split windows")
    parser.add_argument(
        "--window-seed",
        type=int,
        default=None,
        help="seed of the windows the pass trains on (default: the start model's, i.e. compress's windows); "
        "another seed continues a model that already had a pass on fresh windows",
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--name", default="e2e", help="output stem under bench/results/")
    parser.add_argument("--save", type=Path, default=None, help="folder for each variant's model.pt")
    args = parser.parse_args()

    from peers import exit_usage

    from pbs2p_edge.config import PBS2PConfig
    from pbs2p_edge.errors import Pbs2pError

    defaults = PBS2PConfig()
    args.lr = args.lr if args.lr is not None else defaults.e2e_lr
    args.micro_batch = args.micro_batch or defaults.e2e_micro_batch
    args.topk = args.topk or defaults.e2e_topk
    args.samples = args.samples or defaults.e2e_samples
    args.schedule = args.schedule or defaults.e2e_schedule
    args.head = args.head or defaults.e2e_head
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
        if any(s < 0 for s in args.steps) or not 0 < args.lr < 1 or args.micro_batch < 1 or args.holdout < 1:
            raise ValueError
        if not 0 <= args.chat <= 1:
            raise ValueError
    except ValueError:
        exit_usage(
            "--steps must be integers >= 0, --lr in (0, 1), --micro-batch and --holdout >= 1, --chat in [0, 1]"
        )
    ckpt = start_checkpoint(args.source)  # loaded once: a 1.5B model.pt is 2.2 GB
    if args.window_seed is None:
        args.window_seed = ckpt["compression"]["seed"]
    try:
        run(args, ckpt, lambda row: _write(args, ckpt["compression"], row))
    except Pbs2pError as exc:
        exit_usage(str(exc))


def _write(args: argparse.Namespace, cfg: dict[str, Any], row: dict[str, Any]) -> None:
    """Merge `row` into bench/results/NAME.{json,md} (keyed by steps, lr, micro-batch and start model)."""
    path = RESULTS / f"{args.name}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    row = {**row, "source": args.source.name}
    key = ("steps", "lr", "micro_batch", "samples", "schedule", "head", "chat", "dtype", "source")
    old = [
        {"samples": 32, "schedule": "constant", "head": "float", "chat": 0.0, "dtype": "float32", **r}
        for r in old
    ]  # rows from before the options
    merged = [r for r in old if tuple(r.get(k) for k in key) != tuple(row[k] for k in key)] + [row]
    merged.sort(
        key=lambda r: (
            r.get("source", ""),
            r["samples"],
            r["schedule"],
            r["chat"],
            r["dtype"],
            r["lr"],
            r["micro_batch"],
            r["steps"],
        )
    )
    meta = {
        "command": _threads_env() + _nice() + ".venv/bin/python bench/e2e_from.py " + " ".join(sys.argv[1:]),
        "source": args.source.name,
        "source_config": ", ".join(
            f"{k}={cfg.get(k)}"
            for k in ("n", "m", "binarizer", "recover_steps", "recover_seconds", "budget_bits", "seed")
        ),
        "calib": f"{args.samples} x {cfg['calib_len']} tokens (last run)",
        "holdout": args.holdout,
        "tokens": args.tokens,
        "ctx": args.ctx,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": merged}, indent=2) + "\n")
    tmp.replace(path)
    md = RESULTS / f"{args.name}.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(merged, meta))
    tmp.replace(md)


def _maybe(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _nice() -> str:
    niceness = os.nice(0)
    return f"nice -n {niceness} " if niceness else ""


def _threads_env() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={threads} " if threads else ""


if __name__ == "__main__":
    main()

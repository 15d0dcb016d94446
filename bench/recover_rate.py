"""Cost of one block-wise recovery step on the default model (issue 10: what a step budget buys in time).

Recovery is budgeted in Adam steps per decoder layer (`--recover-steps`, config.RECOVER_STEPS_PER_LAYER).
This times `recover_layer` on one decoder layer of a compressed model.pt, exactly as `compress` runs it
(calibration windows of the checkpoint, target = FP layer on the compressed inputs, micro-batch 1):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/recover_rate.py --from default.pt --layer 5 --steps 40

It prints wall and CPU (process) seconds per step. On a shared machine the wall time is inflated by other
jobs; with one thread the CPU seconds per step approximate the wall time of an idle core. Results are merged
into bench/results/recover_rate.json (one entry per layer, steps, threads).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from e2e_from import _threads_env  # bench/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results"


def measure(source: Path, index: int, steps: int) -> dict[str, Any]:
    import torch

    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import build_model, load_checkpoint, packed_layers
    from pbs2p_edge.compress.pipeline import _run_layer, capture_layer_inputs
    from pbs2p_edge.compress.recover import recover_layer
    from pbs2p_edge.format import unpack

    ckpt = load_checkpoint(source)
    cfg = ckpt["compression"]
    prefix = f"model.layers.{index}."
    local = {n[len(prefix) :]: unpack(p) for n, p in packed_layers(ckpt).items() if n.startswith(prefix)}
    if not local:
        raise SystemExit(f"error: decoder layer {index} of {source} has no packed linears (kept in int4?)")
    fp_model, tokenizer = sources.load_model(None)
    fp_model.float().eval()
    model, _ = build_model(ckpt)
    calib = sources.calibration_ids(tokenizer, cfg["calib_samples"], cfg["calib_len"], cfg["seed"])
    with torch.no_grad():
        chunks = capture_layer_inputs(model, calib, cfg["batch_size"])
        for layer in model.model.layers[:index]:
            chunks = [(_run_layer(layer, hs, kw), kw) for hs, kw in chunks]
        fp_layer = copy.deepcopy(fp_model.model.layers[index])
        targets = [_run_layer(fp_layer, hs, kw) for hs, kw in chunks]
    del fp_model
    t0, c0 = time.perf_counter(), time.process_time()
    stats, _ = recover_layer(
        model.model.layers[index],
        local,
        chunks,
        targets,
        steps=steps,
        lr=cfg["recover_lr"],
        micro_batch=cfg["recover_micro_batch"],
        seed=cfg["seed"],
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "layer": index,
        "steps": stats["steps"],
        "error_before": stats["before"],
        "error_after": stats["after"],
        "wall_seconds_per_step": wall / steps,
        "cpu_seconds_per_step": cpu / steps,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from", dest="source", type=Path, required=True, help="model.pt from pbs2p-edge compress"
    )
    parser.add_argument("--layer", type=int, default=5, help="decoder layer to time (not an int4 one)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if args.steps < 1 or args.layer < 0:
        print("error: --steps must be >= 1 and --layer >= 0", file=sys.stderr)
        raise SystemExit(2)
    from pbs2p_edge.errors import Pbs2pError

    try:
        row = measure(args.source, args.layer, args.steps)
    except Pbs2pError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(row))
    path = RESULTS / "recover_rate.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    key = ("layer", "steps", "torch_threads")
    rows = [r for r in old if tuple(r[k] for k in key) != tuple(row[k] for k in key)] + [row]
    meta = {
        "command": _threads_env()
        + "nice -n 10 .venv/bin/python bench/recover_rate.py "
        + " ".join(sys.argv[1:]),
        "source": args.source.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared by other jobs",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()

"""The compression ablation (issues 3 and 10): FP, int4, binarize-only, naive and PBS2P, one row per component.

Every row is compressed, saved as model.pt, loaded back with `load_checkpoint` + `build_model` (what
`pbs2p-edge eval model.pt` scores) and evaluated on the same evaluation tokens (ctx 512, non-overlapping
windows, the first --tokens tokens). Each row runs in its own subprocess so its peak RSS is its own.

    .venv/bin/python bench/compress_table.py --name ablation       # all rows -> bench/results/ablation.{md,json,png}
    .venv/bin/python bench/compress_table.py --name ablation --rows pbs2p-6:8+recover_seconds=300

A row is `method[-N:M][+config_key=value...]` (PBS2PConfig fields; `none` = None), or `fp`, or `int4` (every
projection and the tied head RTN 4-bit in blocks of 32 by onnxruntime's quantizer, dequantized: what the
int4 bundle computes with, scored in PyTorch). Rows given with --rows are (re)measured and merged into the
existing results file of --name, so only changed rows need rerunning. The PNG plots perplexity (log) against
honest bits/weight for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Explicit settings, so that a row keeps its meaning when the PBS2PConfig defaults change.
_OFF = "+recover_seconds=0+e2e_seconds=0+budget=false"
_ARB = "+binarizer=arb"  # the binarizer before ARB-X / ARB-RC existed
# Recovery as it was budgeted before step budgets (session 3): 600 s of wall time over all layers, no step
# limit. Such rows depend on machine load; they are kept as measured.
_WALL600 = "+recover_steps=100000+recover_seconds=600"
DEFAULT_ROWS = ",".join(
    [
        "fp",
        "int4",
        "binarize_only" + _ARB + _OFF,
        "naive-6:8" + _ARB + _OFF,
        "naive-5:8" + _ARB + _OFF,
        "naive-4:8" + _ARB + _OFF,
        "pbs2p-6:8" + _ARB + _OFF,
        "pbs2p-5:8" + _ARB + _OFF,
        "pbs2p-4:8" + _ARB + _OFF,
        "pbs2p-6:8+binarizer=arbx" + _OFF,
        "pbs2p-6:8+binarizer=arbx" + _WALL600 + "+e2e_seconds=0+budget=false",
        "pbs2p-6:8+binarizer=arbx+recover_seconds=0+e2e_seconds=0+budget_bits=2.5",
        "pbs2p-6:8" + _ARB + _WALL600 + "+e2e_seconds=0+budget_bits=2.5",
        "pbs2p-6:8+binarizer=arbx" + _WALL600 + "+e2e_seconds=0+budget_bits=2.5",
        "pbs2p-6:8+binarizer=arbx+recover_steps=120+e2e_steps=0+budget_bits=2.5",
        "pbs2p-6:8+binarizer=arbx+recover_steps=120+e2e_steps=16+budget_bits=2.5",
    ]
)
RESULTS = Path(__file__).resolve().parent / "results"


def parse_row(row: str) -> tuple[str, str | None, dict[str, Any]]:
    """'pbs2p-6:8+salient=1+cfs=false' -> ('pbs2p', '6:8', {'salient': 1, 'cfs': False})."""
    head, *settings = row.split("+")
    method, _, nm = head.partition("-")
    extra: dict[str, Any] = {}
    for item in settings:
        key, _, value = item.partition("=")
        extra[key] = _value(value)
    return method, nm or None, extra


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered == "none":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_row(row: str, tokens: int, ctx: int, calib: dict[str, int]) -> dict[str, Any]:
    """Compress (unless fp), round-trip through model.pt, evaluate. Runs inside the row's subprocess."""
    import torch

    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import build_model, load_checkpoint, read_tokenizer_files, save_checkpoint
    from pbs2p_edge.compress import compress
    from pbs2p_edge.compress.pipeline import calibration_windows
    from pbs2p_edge.config import PBS2PConfig
    from pbs2p_edge.evaluate import perplexity

    method, nm, extra = parse_row(row)
    model, tokenizer = sources.load_model(None)
    eval_ids = sources.evaluation_ids(tokenizer, tokens)
    out: dict[str, Any] = {"row": row, "method": method, "nm": nm}
    if method == "fp":
        result = perplexity(model, eval_ids, ctx=ctx, progress=False)
        out.update(ppl=result["ppl"], tokens=result["tokens"], bits_per_weight=32.0)
    elif method == "int4":
        from pbs2p_edge.export.baselines import INT4_BLOCK_SIZE, is_projection
        from pbs2p_edge.export.nbits import quantize_rows

        start = time.perf_counter()
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and (is_projection(name) or name == "lm_head"):
                    q = quantize_rows(module.weight.detach().float().numpy(), 4, INT4_BLOCK_SIZE)
                    module.weight.data.copy_(torch.from_numpy(q.dequantize()))
        seconds = time.perf_counter() - start
        result = perplexity(model, eval_ids, ctx=ctx, progress=False)
        out.update(ppl=result["ppl"], tokens=result["tokens"], bits_per_weight=5.0, compress_seconds=seconds)
    else:
        config = PBS2PConfig.from_nm(
            "8:8" if method == "binarize_only" else nm or "", method=method, **calib, **extra
        )
        calib_ids, e2e_ids = calibration_windows(tokenizer, config)
        start = time.perf_counter()
        compressed = compress(
            model,
            config,
            calib_ids,
            tokenizer_files=read_tokenizer_files(sources.model_files(None)),
            progress=False,
            e2e_ids=e2e_ids,
        )
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory(prefix="pbs2p-table-") as folder:
            path = Path(folder) / "model.pt"
            save_checkpoint(compressed, path)
            checkpoint_mb = path.stat().st_size / 1e6
            del model, compressed.model
            rebuilt, _ = build_model(load_checkpoint(path))
        result = perplexity(rebuilt, eval_ids, ctx=ctx, progress=False)
        r = compressed.results
        out.update(
            ppl=result["ppl"],
            tokens=result["tokens"],
            config=config.to_dict(),
            compress_seconds=seconds,
            bits_per_weight=r["bits_per_weight"],
            bits_per_weight_mask_coded=r["bits_per_weight_mask_coded"],
            bits_per_weight_paper_style=r["bits_per_weight_paper_style"],
            layer_n=r["layer_n"],
            average_n=r["average_n"],
            checkpoint_mb=checkpoint_mb,
            projected_bundle_mb=r.get("projected_bundle_bytes", 0) / 1e6,
            int4_layers=(r.get("budget") or {}).get("int4_layers", []),
            recovery=_recovery_summary(r),
        )
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    out["torch_threads"] = torch.get_num_threads()
    return out


def import_row(row: str, ckpt_path: Path, time_log: Path | None, tokens: int, ctx: int) -> dict[str, Any]:
    """A row from an existing checkpoint: its recorded compression results, perplexity measured here."""
    import re

    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import build_model, load_checkpoint
    from pbs2p_edge.evaluate import perplexity

    ckpt = load_checkpoint(ckpt_path)
    model, _ = build_model(ckpt)
    _, tokenizer = sources.load_model(None)
    result = perplexity(model, sources.evaluation_ids(tokenizer, tokens), ctx=ctx, progress=False)
    compression = dict(ckpt["compression"])
    r = compression.pop("results")
    rss = None
    if time_log is not None:
        found = re.search(
            r"Maximum resident set size \(kbytes\): (\d+)", time_log.read_text(errors="replace")
        )
        rss = int(found.group(1)) / 1e6 if found else None
    method, nm, _ = parse_row(row)
    return {
        "row": row,
        "method": method,
        "nm": nm,
        "ppl": result["ppl"],
        "tokens": result["tokens"],
        "config": compression,
        "compress_seconds": r["seconds"],
        "bits_per_weight": r["bits_per_weight"],
        "bits_per_weight_mask_coded": r["bits_per_weight_mask_coded"],
        "bits_per_weight_paper_style": r["bits_per_weight_paper_style"],
        "layer_n": r["layer_n"],
        "average_n": r["average_n"],
        "checkpoint_mb": ckpt_path.stat().st_size / 1e6,
        "projected_bundle_mb": r.get("projected_bundle_bytes", 0) / 1e6,
        "int4_layers": (r.get("budget") or {}).get("int4_layers", []),
        "recovery": _recovery_summary(r),
        "peak_rss_gb": rss if rss is not None else float("nan"),
        "imported_from": f"pbs2p-edge compress -> {ckpt_path.name}",
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _recovery_summary(r: dict[str, Any]) -> dict[str, Any]:
    blocks = r.get("recovery") or []
    out: dict[str, Any] = {}
    if blocks:
        out["block_error_before"] = sum(b["before"] for b in blocks) / len(blocks)
        out["block_error_after"] = sum(b["after"] for b in blocks) / len(blocks)
        out["block_steps"] = sum(b["steps"] for b in blocks)
        out["block_layers_kept"] = sum(1 for b in blocks if b["kept"])
    if r.get("e2e"):
        out["e2e"] = r["e2e"]
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# PBS2P perplexity table ({meta['model']})",
        "",
        f"Command: `{meta['command']}`  ",
        *(f"Earlier: `{c}`  " for c in meta.get("earlier_commands", [])[-12:]),
        f"Evaluation: {meta['tokens']} tokens of the corpus evaluation split, ctx {meta['ctx']}, non-overlapping windows. "
        f"Calibration: {meta['calib']['calib_samples']} x {meta['calib']['calib_len']} tokens of the calibration split.  ",
        f"Machine: {meta['machine']}; {meta['date']}.",
        "",
        "Bits per weight are over the compressed linears (7 per decoder layer). *stored* = every byte of the packed "
        "format (1-bit mask plane + kept signs + fp16 alpha/mu per row per 128 columns + salient extras); "
        "*mask coded* = the same with the mask counted at its entropy bound log2 C(M,N)/M; *paper-style* = kept "
        "signs only (what the paper quotes).",
        "",
        "Rows were measured while the machine was shared by other jobs: compress seconds are not speed claims. "
        "*measured* gives each row's date (rows are merged across runs of this script).",
        "",
        "| row | perplexity | bits/w stored | bits/w mask coded | bits/w paper-style | per-layer N | int4 layers "
        "| block recovery error | compress s | peak RSS GB | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        when = r.get("measured", meta["date"]) + (f" ({r['session']})" if r.get("session") else "")
        if r["method"] in ("fp", "int4"):
            bits = "32" if r["method"] == "fp" else "5.0"
            label = "FP32" if r["method"] == "fp" else "int4 RTN (linears + head, blocks of 32)"
            lines.append(
                f"| {label} | {r['ppl']:.2f} | {bits} | {bits} | {bits} | - | - | - | - | {r['peak_rss_gb']:.2f} | {when} |"
            )
            continue
        layer_n = _compact(r["layer_n"])
        rec = r.get("recovery") or {}
        err = (
            f"{rec['block_error_before']:.3f} -> {rec['block_error_after']:.3f}"
            if rec.get("block_steps")
            else "-"
        )
        int4 = " ".join(map(str, r.get("int4_layers") or [])) or "-"
        lines.append(
            f"| {r['row']} | {r['ppl']:.2f} | {r['bits_per_weight']:.3f} | {r['bits_per_weight_mask_coded']:.3f} | "
            f"{r['bits_per_weight_paper_style']:.3f} | {layer_n} | {int4} | {err} | {r['compress_seconds']:.0f} "
            f"| {r['peak_rss_gb']:.2f} | {when} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, int4_reference: float | None = None) -> None:
    """Perplexity (log) against honest bits/weight, one labelled point per row; FP as a line; the int4
    bundle's deployed perplexity (given, 5.0 bits) as a reference point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        if r["method"] == "fp":
            ax.axhline(r["ppl"], color="grey", linestyle="--", label=f"FP32 ({r['ppl']:.2f})")
            continue
        marker = "s" if r["method"] == "int4" else "o"
        ax.scatter(r["bits_per_weight"], r["ppl"], marker=marker)
        ax.annotate(
            r["row"].replace(_OFF, "").replace("+e2e_seconds=0", "").replace(_WALL600, "+wall600s"),
            (r["bits_per_weight"], r["ppl"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    if int4_reference:
        ax.scatter(
            5.0, int4_reference, marker="*", s=120, color="black", label=f"int4 bundle ({int4_reference:.2f})"
        )
    ax.set_yscale("log")
    ax.set_xlabel("honest bits per weight over the compressed linears (everything stored)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M: perplexity vs stored bits (bench/compress_table.py)")
    ax.legend(loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _compact(values: list[int]) -> str:
    return "all " + str(values[0]) if len(set(values)) == 1 else " ".join(map(str, values))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", default=DEFAULT_ROWS, help="comma list: fp, binarize_only, naive-N:M, pbs2p-N:M[+key=value]"
    )
    parser.add_argument(
        "--tokens", type=int, default=4096, help="evaluation token budget (same for every row)"
    )
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-len", type=int, default=None)
    parser.add_argument("--name", default="compress_table", help="output file stem under bench/results/")
    parser.add_argument(
        "--seed-from",
        default=None,
        help="copy the rows of bench/results/NAME.json (measured before recovery/budget existed, so their "
        "settings equal the explicit +binarizer=arb+recover_seconds=0+e2e_seconds=0+budget=false rows) into --name",
    )
    parser.add_argument(
        "--int4-reference",
        type=float,
        default=None,
        help="perplexity of the int4 bundle as deployed, plotted at 5.0 bits (`pbs2p-edge export default "
        "--format int4 -o int4 && pbs2p-edge eval int4`)",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="ROW=CKPT[,TIME_LOG]",
        help="add a row from a model.pt made by `pbs2p-edge compress` (scored here like every row; compress "
        "seconds from the checkpoint, peak RSS from a `/usr/bin/time -v` log of that compress if given)",
    )
    parser.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=>NEW",
        help="relabel a stored row (e.g. to spell out a setting whose default changed since it was measured)",
    )
    parser.add_argument(
        "--session",
        default=None,
        help="label stored with every row measured (or imported) by this run, shown beside its date",
    )
    parser.add_argument("--one-row", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from pbs2p_edge.config import PBS2PConfig

    defaults = PBS2PConfig()
    calib = {
        "calib_samples": args.calib_samples or defaults.calib_samples,
        "calib_len": args.calib_len or defaults.calib_len,
    }
    if args.one_row:
        print(json.dumps(run_row(args.one_row, args.tokens, args.ctx, calib)))
        return

    rows = _existing(args.name)
    for spec in args.rename:
        old, _, new = spec.partition("=>")
        rows = [{**r, "row": new} if r["row"] == old else r for r in rows]
    if args.rename:
        _write(args, _ordered(rows), calib)
        return
    for spec in args.imports:
        row, _, paths = spec.rpartition("=")
        ckpt, _, log = paths.partition(",")
        result = import_row(row, Path(ckpt), Path(log) if log else None, args.tokens, args.ctx)
        if args.session:
            result["session"] = args.session
        rows = [r for r in rows if r["row"] != row] + [result]
        _write(args, _ordered(rows), calib)
    if args.imports:
        return
    if args.seed_from or not args.rows:
        old = json.loads((RESULTS / f"{args.seed_from}.json").read_text()) if args.seed_from else {"rows": []}
        for r in old["rows"]:
            key = r["row"] if r["method"] == "fp" else r["row"] + _ARB + _OFF
            r = {**r, "row": key, "measured": old["meta"]["date"] + f" ({args.seed_from}.json)"}
            rows = [x for x in rows if x["row"] != key] + [r]
        _write(args, _ordered(rows), calib)
        return
    for row in args.rows.split(","):
        print(f"[compress_table] {row} ...", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--one-row",
            row,
            "--tokens",
            str(args.tokens),
            "--ctx",
            str(args.ctx),
        ]
        cmd += ["--calib-samples", str(calib["calib_samples"]), "--calib-len", str(calib["calib_len"])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            raise SystemExit(f"row {row} failed (exit {done.returncode})")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"[compress_table] {row}: ppl {result['ppl']:.2f}", file=sys.stderr, flush=True)
        result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if args.session:
            result["session"] = args.session
        rows = [r for r in rows if r["row"] != row] + [result]
        _write(args, _ordered(rows), calib)


def _existing(name: str) -> list[dict[str, Any]]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Default rows first in their order, then any others in measurement order."""
    rank = {row: i for i, row in enumerate(DEFAULT_ROWS.split(","))}
    return sorted(rows, key=lambda r: rank.get(r["row"], len(rank)))


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], calib: dict[str, int]) -> None:
    meta = {
        "model": "SmolLM2-135M-Instruct (embedded default, fp32)",
        "command": "nice -n 10 .venv/bin/python bench/compress_table.py " + " ".join(sys.argv[1:]),
        "tokens": args.tokens,
        "ctx": args.ctx,
        "calib": calib,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    path = RESULTS / f"{args.name}.json"
    if path.is_file():  # keep the commands that made the merged rows
        old = json.loads(path.read_text())["meta"]
        earlier = [*old.get("earlier_commands", []), old["command"]]
        meta["earlier_commands"] = [c for c in dict.fromkeys(earlier) if c != meta["command"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, meta))
    plot(rows, RESULTS / f"{args.name}.png", args.int4_reference)


if __name__ == "__main__":
    main()

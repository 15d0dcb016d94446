"""The perplexity table of issue 3: FP, binarize-only, naive and PBS2P at 6:8 / 5:8 / 4:8 on the default model.

Every row is compressed, saved as model.pt, loaded back with `load_checkpoint` + `build_model` (what
`pbs2p-edge eval model.pt` scores) and evaluated on the same evaluation tokens (ctx 512, non-overlapping
windows, the first --tokens tokens). Each row runs in its own subprocess so its peak RSS is its own.

    nice -n 10 .venv/bin/python bench/compress_table.py            # writes bench/results/compress_table.{md,json}
    .venv/bin/python bench/compress_table.py --rows fp,pbs2p-6:8+salient=1 --name ablation
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

DEFAULT_ROWS = "fp,binarize_only,naive-6:8,naive-5:8,naive-4:8,pbs2p-6:8,pbs2p-5:8,pbs2p-4:8"
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
    from pbs2p_edge.config import PBS2PConfig
    from pbs2p_edge.evaluate import perplexity

    method, nm, extra = parse_row(row)
    model, tokenizer = sources.load_model(None)
    eval_ids = sources.evaluation_ids(tokenizer, tokens)
    out: dict[str, Any] = {"row": row, "method": method, "nm": nm}
    if method == "fp":
        result = perplexity(model, eval_ids, ctx=ctx, progress=False)
        out.update(ppl=result["ppl"], tokens=result["tokens"], bits_per_weight=32.0)
    else:
        config = PBS2PConfig.from_nm(
            "8:8" if method == "binarize_only" else nm or "", method=method, **calib, **extra
        )
        calib_ids = sources.calibration_ids(tokenizer, config.calib_samples, config.calib_len, config.seed)
        start = time.perf_counter()
        compressed = compress(
            model,
            config,
            calib_ids,
            tokenizer_files=read_tokenizer_files(sources.model_files(None)),
            progress=False,
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
        )
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    out["torch_threads"] = torch.get_num_threads()
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# PBS2P perplexity table ({meta['model']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Evaluation: {meta['tokens']} tokens of the corpus evaluation split, ctx {meta['ctx']}, non-overlapping windows. "
        f"Calibration: {meta['calib']['calib_samples']} x {meta['calib']['calib_len']} tokens of the calibration split.  ",
        f"Machine: {meta['machine']}; {meta['date']}.",
        "",
        "Bits per weight are over the compressed linears (7 per decoder layer). *stored* = every byte of the packed "
        "format (1-bit mask plane + kept signs + fp16 alpha/mu per row per 128 columns + salient extras); "
        "*mask coded* = the same with the mask counted at its entropy bound log2 C(M,N)/M; *paper-style* = kept "
        "signs only (what the paper quotes).",
        "",
        "| row | perplexity | bits/w stored | bits/w mask coded | bits/w paper-style | per-layer N | compress s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "fp":
            lines.append(f"| FP32 | {r['ppl']:.2f} | 32 | 32 | 32 | - | - | {r['peak_rss_gb']:.2f} |")
            continue
        layer_n = _compact(r["layer_n"])
        lines.append(
            f"| {r['row']} | {r['ppl']:.2f} | {r['bits_per_weight']:.3f} | {r['bits_per_weight_mask_coded']:.3f} | "
            f"{r['bits_per_weight_paper_style']:.3f} | {layer_n} | {r['compress_seconds']:.0f} | {r['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


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

    rows = []
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
        rows.append(result)
        _write(args, rows, calib)


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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()

"""What each `export --head` choice costs: perplexity with the same fp32 body, bytes read per token, disk bytes.

In PyTorch, on the windows `pbs2p-edge eval` scores (same text, --ctx, --tokens): each head is built by
`make_head` exactly as `export` builds it, and the logits are the head's stored matrix applied to its
`reference_input` (the int8 rounding MatMulNBits applies at accuracy_level 4), with the body fed by the head
module's stored embedding. The export validation checks that a bundle computes this same function (logits
SQNR >= 40 dB against it; the int2 bundle of the default model: 84 dB). Also reported: the share of predicted
positions whose top-1 token equals the fp32 head's.

Bytes read per token (head matmul + one embedding row) come from `predicted_read_bytes`, which
tests/test_head_formats.py checks against the bytes measured on exported graphs; `--predict VOCABxWIDTH`
adds the figure for a model too large to quantize here (151936x1536: Qwen2.5-Coder-1.5B). Disk bytes are the
embedding/head module's stored arrays. Writes OUT.md and OUT.json.

    .venv/bin/python bench/head_formats.py --model default --predict 151936x1536 --out bench/results/heads-smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from pbs2p_edge.export.head import HEAD_CHOICES, predicted_read_bytes

MB = 1e6


def stored_bytes(head: Any) -> int:
    """Bytes the graph stores for the embedding and head (shared tensors once)."""
    tensors = {id(t): t for t in [*head.buffers(), *head.parameters()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def score(model: Any, heads: dict[str, Any], ids: Any, ctx: int) -> dict[str, dict[str, float]]:
    """Summed NLL and top-1 agreement with the fp32 head for each head, one body pass per distinct embedding."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from pbs2p_edge.evaluate import window_count

    n_windows = window_count(int(ids.numel()), ctx)
    windows = ids[: n_windows * ctx].view(n_windows, ctx)
    embed_module = model.get_input_embeddings()
    saved = embed_module.weight
    weights = {name: head.reference_weights() for name, head in heads.items()}
    groups: list[list[str]] = []  # heads whose stored embeddings are equal share one body pass
    for name, (embed, _) in weights.items():
        group = next((g for g in groups if torch.equal(weights[g[0]][0], embed)), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    totals = {name: {"nll": 0.0, "agree": 0.0} for name in heads}
    try:
        with torch.inference_mode():
            for window in tqdm(windows, desc="windows", unit="win"):
                batch = window[None]
                logits = {}
                for names in groups:
                    embed_module.weight = torch.nn.Parameter(weights[names[0]][0], requires_grad=False)
                    hidden = model.base_model(input_ids=batch).last_hidden_state[0, :-1]
                    for name in names:
                        head_w = weights[name][1]
                        logits[name] = F.linear(heads[name].reference_input(hidden), head_w).float()
                target = batch[0, 1:]
                reference = logits["fp32"].argmax(-1)
                for name, values in logits.items():
                    totals[name]["nll"] += float(F.cross_entropy(values, target, reduction="sum"))
                    totals[name]["agree"] += float((values.argmax(-1) == reference).sum())
    finally:
        embed_module.weight = saved
    predicted = n_windows * (ctx - 1)
    return {
        name: {
            "nll": t["nll"] / predicted,
            "top1_vs_fp32": t["agree"] / predicted,
            "predicted_tokens": predicted,
        }
        for name, t in totals.items()
    }


def markdown(report: dict[str, Any]) -> str:
    shapes = list(report["predicted"])
    rows = report["rows"]
    base = rows["fp32"]["perplexity"]
    lines = [
        f"# Head formats on {report['model']}: fp32 body, PyTorch, {report['eval']}",
        "",
        "| head | perplexity | vs fp32 head | top-1 = fp32 head's | head bits/weight | read/token MB "
        "| embedding+head on disk MB | " + " | ".join(f"read/token MB at {s}" for s in shapes) + " |",
        "|---" * (7 + len(shapes)) + "|",
    ]
    for name, r in rows.items():
        predicted = [f"{report['predicted'][s][name]['total'] / MB:.1f}" for s in shapes]
        lines.append(
            f"| {name} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
            f"{r['top1_vs_fp32']:.1%} | {r['head_bits_per_weight']:.2f} | {r['read_per_token']['total'] / MB:.2f} | "
            f"{r['stored_bytes'] / MB:.1f} | " + " | ".join(predicted) + " |"
        )
    lines += [
        "",
        "read/token = the head matmul's arrays (codes, scales, zero points) + one embedding row. int4s and int2 "
        "keep an int4 copy of a tied matrix for the embedding gather: more disk, not more bytes per token. "
        "The body is fp32 in every row; its embedding is the one the head choice stores.",
        f"Quantization seconds per head: {json.dumps(report['build_seconds'])}. Command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def parse_shape(text: str) -> tuple[int, int]:
    try:
        vocab, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: --predict takes VOCABxWIDTH like 151936x1536, got {text!r}") from None
    return vocab, width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/head_formats.py")
    parser.add_argument("--model", default="default")
    parser.add_argument("--heads", default=",".join(HEAD_CHOICES), help="fp32 is always included")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--predict", action="append", default=[], help="VOCABxWIDTH (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    names = ["fp32", *(h.strip() for h in args.heads.split(",") if h.strip() and h.strip() != "fp32")]
    if any(h not in HEAD_CHOICES for h in names):
        raise SystemExit(
            f"error: --heads takes a comma list of {', '.join(HEAD_CHOICES)}, got {args.heads!r}"
        )
    shapes = {text: parse_shape(text) for text in args.predict}

    from pbs2p_edge import sources
    from pbs2p_edge.export.head import make_head

    model, tokenizer = sources.load_model(None if args.model == "default" else args.model)
    model.eval()
    if getattr(model.config, "final_logit_softcapping", None):
        raise SystemExit(
            "error: this model soft-caps its logits; bench/head_formats.py applies the head alone"
        )
    ids = sources.evaluation_ids(tokenizer, args.tokens)
    heads, build_seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        heads[name] = make_head(model, name)
        build_seconds[name] = round(time.perf_counter() - start, 1)
    scores = score(model, heads, ids, args.ctx)
    vocab, width = model.get_output_embeddings().weight.shape
    rows = {}
    for name in names:
        read = predicted_read_bytes(name, int(vocab), int(width))
        rows[name] = {
            "perplexity": math.exp(scores[name]["nll"]),
            **scores[name],
            "read_per_token": read,
            "head_bits_per_weight": 8 * read["head"] / (int(vocab) * int(width)),
            "stored_bytes": stored_bytes(heads[name]),
        }
    report = {
        "model": args.model,
        "eval": f"ctx {args.ctx}, first {args.tokens} tokens of the evaluation split",
        "rows": rows,
        "predicted": {s: {h: predicted_read_bytes(h, v, w) for h in names} for s, (v, w) in shapes.items()},
        "build_seconds": build_seconds,
        "command": " ".join(["bench/head_formats.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    from peers import write_report

    text = markdown(report)
    write_report(args.out, report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

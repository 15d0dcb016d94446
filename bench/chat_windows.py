"""A short end-to-end pass with chat-formatted calibration windows, from one compressed model (issue 10).

The default E2E pass trains on Wikipedia windows only; the longer it runs, the further the model's first token
after the chat template drifts from the FP model's (docs/METHOD.md "Session 7"). This script measured the remedy
before it became `compress --e2e-chat`: chat-formatted windows (`sources.chat_calibration_ids`) mixed one to
one with plain calibration windows of another seed, and runs `recover_e2e` on the mix through the int4 head. Before and after it reports the
perplexity through the int4 head on the evaluation split, the top next tokens after a chat prompt and the
greedy chat reply, in PyTorch.

    OMP_NUM_THREADS=2 .venv/bin/python bench/chat_windows.py --from e2e-512.pt --windows 64 --steps 64 \
        --save chat.pt --out bench/results/chat-windows

`--steps 0` only probes the start model and the FP one (no windows, no training).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "What is the capital of France?"


def probe(model: Any, tokenizer: Any, eval_ids: Any) -> dict[str, Any]:
    """Perplexity through the int4 head, the top next tokens after the chat prompt, the greedy chat reply."""
    import torch

    from pbs2p_edge.compress.head import deployed_head
    from pbs2p_edge.evaluate import perplexity

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=prompt).logits[0, -1].float(), dim=-1)
        top = logp.topk(5)
        reply = model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1] :]
    with deployed_head(model, "int4"):
        ppl = perplexity(model, eval_ids, ctx=512, progress=False)["ppl"]
    return {
        "ppl_int4_head": ppl,
        "top_next": [
            [tokenizer.decode([int(i)]), round(float(v.exp()), 4)] for v, i in zip(*top, strict=True)
        ],
        "greedy_reply": tokenizer.decode(reply),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help="model.pt to start from")
    parser.add_argument("--windows", type=int, default=64, help="chat windows (as many plain ones are added)")
    parser.add_argument(
        "--steps", type=int, default=64, help="0: only probe the start model (and the FP one)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save", type=Path, help="write the tuned model.pt here")
    parser.add_argument("--out", type=Path, help="bench/results/NAME: writes NAME.json and NAME.md")
    args = parser.parse_args()
    from e2e_from import start_checkpoint, teacher_for
    from peers import exit_usage

    if not args.source.is_file():
        exit_usage(f"{args.source} does not exist")
    if args.windows < 1 or args.steps < 0 or args.lr <= 0:
        exit_usage("--windows must be at least 1, --steps at least 0 and --lr positive")
    if args.save and args.steps == 0:
        exit_usage("--save needs --steps of at least 1 (with 0 the model is the start model)")
    import torch

    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import build_model, packed_layers
    from pbs2p_edge.compress.head import deployed_head
    from pbs2p_edge.compress.pipeline import CHAT_SEED_OFFSET
    from pbs2p_edge.compress.recover import recover_e2e, teacher_topk
    from pbs2p_edge.errors import Pbs2pError
    from pbs2p_edge.format import unpack

    ckpt = start_checkpoint(args.source)
    cfg = ckpt["compression"]
    try:
        fp_model, tokenizer = teacher_for(ckpt, None)
    except Pbs2pError as exc:
        exit_usage(str(exc))
    if args.steps:
        chat = sources.chat_calibration_ids(
            tokenizer, args.windows, cfg["calib_len"], cfg["seed"] + CHAT_SEED_OFFSET
        )
        plain = sources.calibration_ids(tokenizer, args.windows, cfg["calib_len"], cfg["seed"] + 77)
        mix = torch.stack([w for pair in zip(chat, plain, strict=True) for w in pair])
        teacher = teacher_topk(fp_model, mix, cfg.get("e2e_topk", 64), 2)
    eval_ids = sources.evaluation_ids(tokenizer, 4096)
    report: dict[str, Any] = {"fp": probe(fp_model, tokenizer, eval_ids)}
    del fp_model
    model, _ = build_model(ckpt)
    weights = {name: unpack(p) for name, p in packed_layers(ckpt).items()}
    report["before"] = probe(model, tokenizer, eval_ids)
    if args.steps:
        started = time.perf_counter()
        with deployed_head(model, "int4"):
            stats = recover_e2e(model, weights, mix, teacher, steps=args.steps, lr=args.lr, micro_batch=2)
        report["e2e"] = {**stats, "wall_seconds": time.perf_counter() - started}
        report["after"] = probe(model, tokenizer, eval_ids)
    report["command"] = "bench/chat_windows.py " + " ".join(sys.argv[1:])
    if args.save:
        from e2e_from import save_variant

        # recorded as one E2E pass of the earlier steps plus these (its stats are this pass's)
        save_variant(ckpt, model, weights, stats, (cfg.get("e2e_steps") or 0) + args.steps, args.save)
    lines = [
        f"# Chat-formatted E2E windows from {args.source.name}",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    lines += ["| model | perplexity, int4 head | top next tokens after the chat prompt | greedy chat reply |"]
    lines += ["|---|---|---|---|"]
    for key in ("fp", "before", "after")[: 3 if args.steps else 2]:
        r = report[key]
        top = ", ".join(f"{t!r} {p:.3f}" for t, p in r["top_next"])
        lines.append(f"| {key} | {r['ppl_int4_head']:.2f} | {top} | {r['greedy_reply']!r} |")
    from peers import print_report

    print_report(args.out, report, lines)


if __name__ == "__main__":
    main()

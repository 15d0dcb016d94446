"""Does a bundle still answer? Greedy chat replies to a fixed set of short questions, each checked for the words
a right answer contains (issue 10).

Perplexity says how far a compressed model is from its FP model on text; this says whether it still answers a
user. Each bundle runs the same prompts through our torch-free runtime (`--chat`, greedy); `--model` adds the FP
model's replies (transformers) as the reference. A reply passes when every group of PROBES' words has one
match in it (regular expressions, case-insensitive). The table keeps each reply, so a reader can judge beyond the words.

    .venv/bin/python bench/chat_probe.py --bundle s15=/path/bundle --bundle s16=/path/other \\
        --model qwen2.5-coder-1.5b --out bench/results/chat-probe-qwen1.5b-s16
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

# (prompt, groups of regular expressions: each group needs one of its patterns in the reply, case-insensitive)
PROBES: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("What is the capital of France?", ((r"\bparis\b",),)),
    ("What is the capital of Germany?", ((r"\bberlin\b",),)),
    ("What are the three primary colors?", ((r"\bred\b",), (r"\bblue\b",), (r"\byellow\b", r"\bgreen\b"))),
    (
        "Write a Python function that returns the square of a number.",
        ((r"def \w+\(",), (r"\*\*\s*2\b", r"\b(\w+)\s*\*\s*\1\b", r"pow\(")),
    ),
    ("What is 2 + 2?", ((r"\b4\b", r"\bfour\b"),)),
    ("What is the largest planet in the Solar System?", ((r"\bjupiter\b",),)),
    ("Who wrote Romeo and Juliet?", ((r"\bshakespeare\b",),)),
    ("How many days are in a week?", ((r"\b7\b", r"\bseven\b"),)),
    ("What is the chemical symbol for gold?", ((r"\bau\b",),)),
    ("Translate 'thank you' into Spanish.", ((r"\bgracias\b",),)),
    ("Write a Python expression that reverses a string s.", ((r"\[::-1\]", r"reversed\("),)),
    ("What is the boiling point of water at sea level in degrees Celsius?", ((r"\b100\b",),)),
)


def passes(reply: str, groups: tuple[tuple[str, ...], ...]) -> bool:
    return all(any(re.search(pattern, reply, re.IGNORECASE) for pattern in group) for group in groups)


def bundle_replies(path: str, max_new_tokens: int, threads: int) -> list[str]:
    from pbs2p_edge.runtime.generate import Generator

    generator = Generator(path, threads=threads)
    return [generator.generate(prompt, max_new_tokens, chat=True).text.strip() for prompt, _ in PROBES]


def model_replies(model: str, max_new_tokens: int, dtype: str) -> list[str]:
    from pbs2p_edge import sources
    from pbs2p_edge.config import default_e2e_dtype
    from pbs2p_edge.conversations import generate_replies

    fp_model, tokenizer = sources.load_model(model, default_e2e_dtype() if dtype == "auto" else dtype)
    prompts = [prompt for prompt, _ in PROBES]
    made = generate_replies(fp_model, tokenizer, prompts, max_new_tokens, 4, whole_sentences=False)
    return [turns[1]["content"] for turns in made]


def markdown(systems: dict[str, list[str]], args: argparse.Namespace) -> str:
    names = list(systems)
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        f"# Chat probe: {len(PROBES)} questions, greedy, {args.max_new_tokens} new tokens at most",
        "",
        "A reply passes (yes) when it matches one pattern of each of the question's groups (`bench/chat_probe.py`"
        " PROBES), case-insensitive.",
        "",
        "| question | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for i, (prompt, groups) in enumerate(PROBES):
        row = [f"{'yes' if passes(systems[n][i], groups) else 'no'}: {cell(systems[n][i])}" for n in names]
        lines.append(f"| {cell(prompt)} | " + " | ".join(row) + " |")
    right = [sum(passes(systems[n][i], g) for i, (_, g) in enumerate(PROBES)) for n in names]
    lines.append("| **right** | " + " | ".join(f"**{r} / {len(PROBES)}**" for r in right) + " |")
    lines += ["", "Systems: " + "; ".join(f"`{n}` = {args.sources[n]}" for n in names) + ".", ""]
    lines.append(f"Command: `{args.command}`. {args.measured}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from peers import exit_usage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", action="append", default=[], help="NAME=BUNDLE_DIR (repeatable)")
    parser.add_argument("--model", default=None, help="also the FP model's replies (folder, GGUF or name)")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="the FP model's precision"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    args.command = " ".join(["bench/chat_probe.py", *(sys.argv[1:] if argv is None else argv)])
    if args.max_new_tokens < 1:
        exit_usage(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    named = [spec.partition("=") for spec in args.bundle]
    if not named and args.model is None:
        exit_usage("nothing to probe: give --bundle NAME=DIR and/or --model")
    for name, sep, path in named:
        if not sep or not name or not Path(path, "manifest.json").is_file():
            exit_usage(f"--bundle wants NAME=BUNDLE_DIR with a manifest.json (got {name}{sep}{path!r})")
    from pbs2p_edge.errors import Pbs2pError

    systems: dict[str, list[str]] = {}
    args.sources = {}
    try:
        if args.model is not None:
            systems["fp"] = model_replies(args.model, args.max_new_tokens, args.dtype)
            args.sources["fp"] = f"FP model {args.model} (transformers)"
        for name, _, path in named:
            systems[name] = bundle_replies(path, args.max_new_tokens, args.threads)
            args.sources[name] = f"bundle {path}"
    except Pbs2pError as exc:
        exit_usage(str(exc))
    args.measured = f"{platform.node() or 'host'}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    text = markdown(systems, args)
    print(text)
    if args.out is not None:
        from peers import write_report

        report = {
            "probes": [{"prompt": p, "groups": g} for p, g in PROBES],
            "systems": {n: {"source": args.sources[n], "replies": r} for n, r in systems.items()},
            "right": {n: sum(passes(r[i], g) for i, (_, g) in enumerate(PROBES)) for n, r in systems.items()},
            "max_new_tokens": args.max_new_tokens,
            "command": args.command,
        }
        write_report(args.out, report, text)


if __name__ == "__main__":
    main()

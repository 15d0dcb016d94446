"""Chat conversations for the end-to-end pass: a JSONL file of them, and the FP model's own replies.

The chat-formatted E2E windows (`sources.chat_calibration_ids`) answer each question with the article's intro.
A conversations file replaces those turns with any others, one JSON object per line in the common chat
format, `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`.
`pbs2p-edge replies` writes one whose assistant turns are the FP model's own greedy replies to questions about
calibration articles, so the pass distils the teacher on the kind of text it produces when it answers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbs2p_edge.errors import Pbs2pError, atomic_path

ROLES = ("system", "user", "assistant")
# User turns built from a calibration article: the CHAT_QUESTIONS about its title, and these over its intro.
INTRO_TASKS = (
    "Summarize this in one sentence:\n\n{intro}",
    "What are the key facts in this text?\n\n{intro}",
    "Rewrite this text in simpler words:\n\n{intro}",
)
Conversation = list[dict[str, str]]


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """The conversations of a JSONL file, or Pbs2pError naming the file, the line and the problem."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Pbs2pError(f"cannot read conversations file {path}: {exc}") from None
    conversations = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise Pbs2pError(f"{path}:{number}: not JSON ({exc.msg})") from None
        conversations.append(_messages(record, f"{path}:{number}"))
    if not conversations:
        raise Pbs2pError(f"conversations file {path} has no conversations")
    return conversations


def _messages(record: Any, where: str) -> Conversation:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise Pbs2pError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for turn in messages:
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in ROLES
            or not isinstance(turn.get("content"), str)
        ):
            raise Pbs2pError(f"{where}: every message needs a role ({', '.join(ROLES)}) and a string content")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise Pbs2pError(f"{where}: a conversation needs an assistant turn")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def write_conversations(conversations: list[Conversation], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            for messages in conversations:
                out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def calibration_prompts(count: int, seed: int) -> list[str]:
    """`count` user turns about calibration-split articles (never the evaluation split): a CHAT_QUESTIONS
    question about the title or an INTRO_TASKS task over the intro, drawn with a seeded generator."""
    import numpy as np

    from pbs2p_edge.sources import CHAT_QUESTIONS, calibration_articles

    if count <= 0:
        raise Pbs2pError(f"the number of prompts must be > 0 (got {count})")
    articles = list(calibration_articles().items())
    templates = CHAT_QUESTIONS + INTRO_TASKS
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        title, intro = articles[int(rng.integers(len(articles)))]
        template = templates[int(rng.integers(len(templates)))]
        prompts.append(template.format(title, intro=intro))
    return prompts


def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    whole_sentences: bool = True,
) -> list[Conversation]:
    """Greedy replies of `model` to each prompt (a user turn in the chat template), in batches of left-padded
    prompts; a reply stops at the end-of-turn token or after `max_new_tokens` (then, with `whole_sentences`,
    it is cut after its last full stop). Conversations in prompt order."""
    import torch

    from pbs2p_edge.sources import has_chat_template

    if not has_chat_template(tokenizer):
        raise Pbs2pError("the tokenizer has no chat template, so there is no reply format to generate")
    stops = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    conversations: list[Conversation] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        encoded = [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            )
            for prompt in batch
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for prompt, row in zip(batch, out[:, width:].tolist(), strict=True):
            finished = any(token in stops for token in row)
            reply = tokenizer.decode(row, skip_special_tokens=True).strip()
            if whole_sentences and not finished:  # so the template's end-of-turn follows a whole sentence
                reply = reply[: reply.rfind(".") + 1] or reply
            conversations.append(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
            )
        if progress is not None:
            progress(len(conversations))
    return conversations


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops

"""Conversations for the end-to-end pass: the JSONL file, the model's own replies, and the chat windows they fill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pbs2p_edge import conversations, sources
from pbs2p_edge.errors import Pbs2pError

TALK = [
    [{"role": "user", "content": "What is a zebra?"}, {"role": "assistant", "content": "A striped horse."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Ultramarine blue."},
    ],
]


def _corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A 40-article corpus with both splits; returns the evaluation-side titles."""
    articles = {f"Topic{i}": {"extract": f"Topic{i} is a thing number {i} of the world."} for i in range(40)}
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(articles), encoding="utf-8")
    monkeypatch.setattr(sources, "corpus_path", lambda: corpus)
    evaluation = [t for t, a in articles.items() if sources.is_evaluation_text(a["extract"])]
    assert evaluation and len(evaluation) < len(articles)
    return evaluation


def test_conversations_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "talk.jsonl"
    conversations.write_conversations(TALK, path)
    assert conversations.read_conversations(path) == TALK
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", ":1: not JSON"),
        ('{"turns": []}', ':1: expected {"messages"'),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "needs a role"),
        ('{"messages": [{"role": "user", "content": 3}]}', "string content"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "needs an assistant turn"),
        ("", "has no conversations"),
    ],
)
def test_a_bad_conversations_file_is_named_with_its_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(Pbs2pError, match=problem):
        conversations.read_conversations(path)
    with pytest.raises(Pbs2pError, match="cannot read"):
        conversations.read_conversations(tmp_path / "missing.jsonl")


def test_prompts_are_seeded_and_never_about_evaluation_articles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluation = _corpus(tmp_path, monkeypatch)
    prompts = conversations.calibration_prompts(200, seed=4)
    assert prompts == conversations.calibration_prompts(200, seed=4)
    assert prompts != conversations.calibration_prompts(200, seed=5)
    assert not any(f"Topic{t[5:]} " in p or f"{t}." in p or f"{t}?" in p for p in prompts for t in evaluation)
    assert any("Summarize" in p for p in prompts) and any(p.startswith("What is Topic") for p in prompts)
    with pytest.raises(Pbs2pError, match="> 0"):
        conversations.calibration_prompts(0, seed=4)


def test_replies_are_the_models_greedy_continuations(tiny_model_dir: Path) -> None:
    model, tokenizer = sources.load_model(str(tiny_model_dir))
    prompts = ["Tell me about rivers.", "What is a very long question about mountains and seas?", "Hi"]
    made = conversations.generate_replies(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert [c[0]["content"] for c in made] == prompts and all(c[1]["role"] == "assistant" for c in made)
    # batching and left padding do not change a reply: each prompt alone gives the same one
    for prompt, conversation in zip(prompts, made, strict=True):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            alone = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        reply = tokenizer.decode(alone[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()
        assert conversation[1]["content"] in (reply, reply[: reply.rfind(".") + 1])


def test_chat_windows_draw_from_a_conversations_file(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    from pbs2p_edge.compress.pipeline import calibration_windows
    from pbs2p_edge.config import PBS2PConfig

    path = tmp_path / "talk.jsonl"
    conversations.write_conversations(TALK, path)
    tokenizer = sources.load_tokenizer(str(tiny_model_dir))
    config = PBS2PConfig(
        calib_samples=4, calib_len=96, seed=3, e2e_samples=8, e2e_chat=0.5, e2e_chat_file=str(path)
    )
    _, e2e = calibration_windows(tokenizer, config, str(corpus_text_file))
    assert e2e.shape == (8, 96)
    chat_text = tokenizer.decode(e2e[4:].flatten().tolist())
    assert "A striped" in chat_text and "Name a colour" in chat_text
    assert "Tell me about" not in chat_text  # the built-in questions are replaced, not mixed in
    _, again = calibration_windows(tokenizer, config, str(corpus_text_file))
    assert torch.equal(e2e, again)


def test_a_conversations_file_needs_a_chat_share_and_a_template() -> None:
    from pbs2p_edge.config import E2E_CHAT, PBS2PConfig

    with_file = PBS2PConfig(e2e_chat_file="talk.jsonl")
    assert with_file.e2e_chat_share(chat_template=True, builtin_corpus=False) == E2E_CHAT
    with pytest.raises(Pbs2pError, match="chat template"):
        with_file.e2e_chat_share(chat_template=False, builtin_corpus=True)
    with pytest.raises(Pbs2pError, match="--e2e-chat is 0"):
        PBS2PConfig(e2e_chat=0.0, e2e_chat_file="talk.jsonl").e2e_chat_share(True, True)


def test_cli_refuses_bad_conversation_input_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    from cli_helpers import assert_one_line_error, run_cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n', encoding="utf-8")
    taken = tmp_path / "taken.jsonl"
    taken.write_text("", encoding="utf-8")
    model = str(tiny_model_dir)
    refused = run_cli("compress", "--model", model, "--e2e-chat-file", bad, "-o", tmp_path / "m.pt")
    assert_one_line_error(refused, "bad.jsonl:1")
    assert_one_line_error(run_cli("replies", "--model", model, "-o", taken), "exists")
    assert not (tmp_path / "m.pt").exists()

"""Shared fixtures: a tiny random LLaMA with a real (small, locally trained) tokenizer, and small text files.

Nothing here touches the network: the tokenizer is trained in the test session on corpus text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=320,  # K of down_proj: a multiple of 8 but not of the 128-column group
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The suite's tiny-model compresses run the default E2E pass at session 6's 128 steps: this release's 512 made
# each such compress ~4x slower without testing anything more (the pass's own behaviour is tested with explicit
# --e2e-steps, and test_recover checks E2E_STEPS through the module, patched or not).
SUITE_E2E_STEPS = 128


@pytest.fixture(scope="session", autouse=True)
def _suite_e2e_length() -> Iterator[None]:
    from pbs2p_edge import config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "E2E_STEPS", SUITE_E2E_STEPS)
        # --e2e-dtype auto would pick bf16 steps on some CI machines and float32 on others; the suite's figures
        # (validation SQNR floors among them) are float32's everywhere. `auto` itself is tested on fake cpuinfo.
        patch.setattr(config, "native_bf16", lambda: False)
        yield


def _fallback_text() -> str:
    words = "the model of a small language runs on the edge with binary weights and sparse masks".split()
    return " ".join(words[(i * 7) % len(words)] for i in range(20000))


def tiny_corpus_text(max_articles: int = 400) -> str:
    """Text for tiny-model tests: the first articles of the calibration split, or synthetic text if absent."""
    try:
        from pbs2p_edge.sources import corpus_split

        calib, _ = corpus_split()
        return "\n\n".join(calib[:max_articles])
    except Exception:
        return _fallback_text()


@pytest.fixture(scope="session")
def corpus_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(tiny_corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random LlamaForCausalLM (fixed seed) with a BPE tokenizer and a ChatML chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([tiny_corpus_text(200)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_CONFIG, "vocab_size": len(fast)})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "pbs2p_tiny.json").write_text(json.dumps({"made_by": "tests/conftest.py", "seed": 0}))
    return out

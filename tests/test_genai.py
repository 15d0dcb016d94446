"""onnxruntime-genai runs our bundles (custom ops library from genai_config.json) with PyTorch's greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_export import _dequantized_head, built_bundle, tiny_checkpoint, trained_like_dir

og = pytest.importorskip("onnxruntime_genai")

NEW_TOKENS = 12


def _genai_greedy(bundle: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def _torch_greedy(model, head, prompt: list[int], new_tokens: int, head_input=None) -> list[int]:
    from pbs2p_edge.export.validate import reference_head, torch_logits

    with reference_head(model, head, head, head_input):
        _, tokens = torch_logits(model, prompt, steps=new_tokens)  # the `new_tokens` greedy tokens
    return tokens


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[int(i) for i in rng.integers(3, vocab, n)] for n in (5, 17)]


def test_genai_config_points_at_the_bundled_ops_library(
    tmp_path_factory, tiny_model_dir, corpus_text_file
) -> None:
    bundle = built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "pbs2p")
    config = json.loads((bundle / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["session_options"]["custom_ops_library"] == "libpbs2p_edge_ops.so"
    assert decoder["filename"] == "model.onnx" and decoder["num_hidden_layers"] == 2
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"


def test_genai_tokenizer_matches_transformers(tmp_path_factory, tiny_model_dir, corpus_text_file) -> None:
    from transformers import AutoTokenizer

    bundle = built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "pbs2p")
    text = "the model of a small language runs on the edge"
    ours = og.Tokenizer(og.Model(str(bundle))).encode(text)
    theirs = AutoTokenizer.from_pretrained(bundle).encode(text, add_special_tokens=False)
    assert list(ours) == list(theirs)


def test_genai_greedy_equals_pytorch_greedy_pbs2p(tmp_path_factory, tiny_model_dir, corpus_text_file) -> None:
    from pbs2p_edge.checkpoint import build_model, load_checkpoint, packed_layers
    from pbs2p_edge.export.head import make_head
    from pbs2p_edge.export.patch import eager_arithmetic, pbs2p_factory, swapped_linears

    bundle = built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "pbs2p")
    manifest = json.loads((bundle / "manifest.json").read_text())
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file))
    model, _ = build_model(ckpt)
    head = _dequantized_head(bundle)
    # the head's input rounded as its MatMulNBits node rounds it (int8 at the manifest's accuracy level 4)
    head_input = make_head(model, manifest["head"], manifest["accuracy_level"]).reference_input
    # PyTorch with the kernels' arithmetic (int7 activations), as the bundle computes.
    with swapped_linears(model, pbs2p_factory(packed_layers(ckpt))), eager_arithmetic(model, "kernel"):
        for prompt in _prompts(model.config.vocab_size):
            expected = _torch_greedy(model, head, prompt, NEW_TOKENS, head_input)
            assert _genai_greedy(bundle, prompt, NEW_TOKENS) == expected


def test_genai_greedy_equals_pytorch_greedy_fp32(tmp_path_factory, tiny_model_dir, corpus_text_file) -> None:
    from pbs2p_edge.sources import load_model

    bundle = built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "fp32")
    model, _ = load_model(trained_like_dir(tmp_path_factory, tiny_model_dir))
    head = model.get_output_embeddings().weight
    for prompt in _prompts(model.config.vocab_size):
        assert _genai_greedy(bundle, prompt, NEW_TOKENS) == _torch_greedy(model, head, prompt, NEW_TOKENS)


def assert_genai_equals_runtime(bundle: Path, prompt: list[int], new_tokens: int) -> None:
    """onnxruntime-genai's greedy tokens on `bundle` are our runtime's greedy tokens."""
    from pbs2p_edge.runtime import Generator

    generator = Generator(bundle, threads=1)
    result = generator.generate(prompt, new_tokens)
    theirs = _genai_greedy(bundle, prompt, new_tokens)
    if result.stop_reason == "eos":  # genai reports the EOS token it stops on; our runtime does not
        assert theirs[-1] in generator.bundle.eos_token_ids and theirs[:-1] == result.token_ids
    else:
        assert theirs == result.token_ids


@pytest.mark.parametrize("kind", ["pbs2p", "fp32"])
def test_genai_greedy_equals_our_runtime_greedy(
    tmp_path_factory, tiny_model_dir, corpus_text_file, kind: str
) -> None:
    bundle = built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, kind)
    vocab = json.loads((bundle / "manifest.json").read_text())["vocab_size"]
    for prompt in _prompts(vocab):
        assert_genai_equals_runtime(bundle, prompt, NEW_TOKENS)

"""The other families the compression supports (Qwen2 with q/k/v biases, Mistral) compress, export and validate.

Tiny random models of each family, with the tiny LLaMA's tokenizer, go through `pbs2p-edge compress` and
`export_bundle` (validation on), then our runtime and onnxruntime-genai generate the same greedy tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import TINY_CONFIG

from pbs2p_edge.export import export_bundle

FAMILY_CONFIGS = {
    # Qwen2 adds biases to q/k/v, which the packed format carries and the op adds.
    "qwen2": {"use_sliding_window": False},
    # A sliding window longer than the test's contexts: the bundle's context is capped at it.
    "mistral": {"sliding_window": 64},
}
NEW_TOKENS = 10


def _tiny_family_dir(tmp_path: Path, tiny_model_dir: Path, family: str) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / f"tiny_{family}"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    llama = json.loads((tiny_model_dir / "config.json").read_text())
    settings = {**TINY_CONFIG, "vocab_size": llama["vocab_size"], **FAMILY_CONFIGS[family]}
    config = AutoConfig.for_model(family, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-like norm weights and biases (see test_export.trained_like_dir)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family_bundle(request, tmp_path_factory, tiny_model_dir, corpus_text_file) -> tuple[str, Path]:
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    source = _tiny_family_dir(tmp, tiny_model_dir, family)
    return family, compress_and_export(source, corpus_text_file, tmp, calib_len=64)


def compress_and_export(source: Path, text: Path, tmp: Path, calib_len: int) -> Path:
    """`pbs2p-edge compress --nm 6:8` of a tiny model folder (4 calibration samples), then a validated export."""
    from pbs2p_edge.compress.cli import compress_command

    checkpoint = tmp / "model.pt"
    args = ["--model", str(source), "--text", str(text), "--nm", "6:8", "--calib-samples", "4"]
    args += ["--calib-len", str(calib_len), "-o", str(checkpoint), "--no-progress"]
    result = CliRunner().invoke(compress_command, args)
    assert result.exit_code == 0, result.output
    bundle = tmp / "bundle"
    export_bundle(checkpoint, bundle)
    return bundle


def test_family_exports_and_passes_validation(family_bundle: tuple[str, Path]) -> None:
    family, bundle = family_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    check = manifest["validation"]
    assert manifest["model_type"] == family and check["gated"] == "teacher_forced"
    forced = check["teacher_forced"]
    assert forced["custom_layers"] == 7 * TINY_CONFIG["num_hidden_layers"]
    nodes = 4 if manifest["graph"] == "fused" else 7  # fused: q|k|v and gate|up are one node each
    assert forced["custom_nodes"] == nodes * TINY_CONFIG["num_hidden_layers"]
    assert min(forced["sqnr_db"], forced["ops_min_sqnr_db"], forced["wiring_min_sqnr_db"]) >= 40.0
    genai = json.loads((bundle / "genai_config.json").read_text())
    assert genai["model"]["type"] == family
    expected_context = 64 if family == "mistral" else TINY_CONFIG["max_position_embeddings"]
    assert manifest["context_length"] == genai["model"]["context_length"] == expected_context


def test_qwen2_projection_biases_ride_in_the_custom_nodes(family_bundle: tuple[str, Path]) -> None:
    family, bundle = family_bundle
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    with_bias = set()
    for node in model.graph.node:
        if node.op_type == "SparseBinaryMatMul":
            attrs = {a.name: a for a in node.attribute}
            if "block_has_bias" in attrs:  # a multi-block node names its layers (export/fused.py)
                layers = next(p.value for p in node.metadata_props if p.key == "pbs2p_edge.layers")
                flags = zip(layers.split(","), attrs["block_has_bias"].ints, strict=True)
                with_bias |= {layer.rsplit(".", 1)[-1] for layer, flag in flags if flag}
            elif attrs["has_bias"].i:
                with_bias.add(node.input[4].rsplit(".", 2)[-2])  # ...self_attn.q_proj.scales -> q_proj
    assert with_bias == ({"q_proj", "k_proj", "v_proj"} if family == "qwen2" else set())


def test_family_runtime_and_genai_agree(family_bundle: tuple[str, Path]) -> None:
    pytest.importorskip("onnxruntime_genai")
    from test_genai import assert_genai_equals_runtime

    _, bundle = family_bundle
    vocab = json.loads((bundle / "manifest.json").read_text())["vocab_size"]
    prompt = [int(i) for i in np.random.default_rng(3).integers(3, vocab, 9)]
    assert_genai_equals_runtime(bundle, prompt, NEW_TOKENS)

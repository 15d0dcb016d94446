"""Head formats (`export --head`): the 2-bit MatMulNBits layout against ONNX Runtime, the error-aware search,
and tiny-model bundles whose validation covers the narrow head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_export import built_bundle, tiny_checkpoint, trained_like_dir

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export import export_bundle
from pbs2p_edge.export.head import predicted_read_bytes
from pbs2p_edge.export.lowbit import search_quantize, unpack_codes
from pbs2p_edge.export.nbits import BlockQuantized, int8_activations, quantize_rows_searched
from pbs2p_edge.export.validate import sqnr_db

EXACT_DB = 100.0  # same function in fp32, different summation order


def _nbits_session(q: BlockQuantized, accuracy_level: int):
    import onnxruntime as ort

    n = q.packed.shape[0]
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "S")]
    inputs = ["X", "B", "S"]
    zero = q.packed_zero_points()
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "Z"))
        inputs.append("Z")
    attrs = {"K": q.k, "N": n, "bits": q.bits, "block_size": q.block_size, "accuracy_level": accuracy_level}
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", q.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [32, 64])
def test_searched_layout_matches_onnxruntime(bits: int, block: int) -> None:
    rng = np.random.default_rng(bits * block)
    weight = rng.standard_normal((40, 192)).astype(np.float32)
    q = quantize_rows_searched(weight, bits, block)
    x = (3 * rng.standard_normal((3, 192))).astype(np.float32)
    dense = q.dequantize()
    fp32 = _nbits_session(q, 0).run(None, {"X": x})[0]
    assert sqnr_db(x @ dense.T, fp32) > EXACT_DB
    # accuracy_level 4: int8 activations per block, reproduced by int8_activations (and not by fp32 x).
    int8 = _nbits_session(q, 4).run(None, {"X": x})[0]
    emulated = int8_activations(torch.from_numpy(x), block).numpy() @ dense.T
    assert sqnr_db(emulated, int8) > EXACT_DB
    assert sqnr_db(x @ dense.T, int8) < 60.0


@pytest.mark.parametrize("k", [64, 200])
@pytest.mark.parametrize("block", [32, 64])
def test_int4_linear_reference_matches_onnxruntime_at_accuracy_level_4(k: int, block: int) -> None:
    """The int4 layers' eager reference rounds its input as MatMulNBits does at accuracy_level 4 (a ragged
    last block included), so validation compares like with like."""
    from torch import nn

    from pbs2p_edge.export.nbits import NBitsLinear

    rng = np.random.default_rng(k + block)
    linear = nn.Linear(k, 24, bias=False)
    linear.weight.data = torch.from_numpy(rng.standard_normal((24, k)).astype(np.float32))
    x = (3 * rng.standard_normal((5, k))).astype(np.float32)
    for level in (0, 4):
        module = NBitsLinear(linear, 4, block, level)
        expected = _nbits_session(module.quantized, level).run(None, {"X": x})[0]
        assert sqnr_db(module(torch.from_numpy(x)).detach().numpy(), expected) > EXACT_DB
    assert sqnr_db(x @ module.quantized.dequantize().T, expected) < 60.0


def _rtn_asymmetric_error(weight: np.ndarray, bits: int, block: int, h: np.ndarray) -> float:
    levels = (1 << bits) - 1
    w = weight.reshape(weight.shape[0], -1, block)
    lo, hi = np.minimum(w.min(-1, keepdims=True), 0), np.maximum(w.max(-1, keepdims=True), 0)
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
    zero = np.clip(np.rint(-lo / scale), 0, levels)
    deq = (np.clip(np.rint(w / scale) + zero, 0, levels) - zero) * scale
    return float((h.reshape(-1, block) * (w - deq) ** 2).sum())


def _weighted_error(weight: np.ndarray, q: BlockQuantized, h: np.ndarray) -> float:
    return float((h * (weight - q.dequantize()) ** 2).sum())


def test_search_beats_round_to_nearest_and_follows_importance() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 128)).astype(np.float32)
    uniform = np.ones(128, np.float32)
    searched = quantize_rows_searched(weight, 2, 64)
    assert _weighted_error(weight, searched, uniform) < 0.9 * _rtn_asymmetric_error(weight, 2, 64, uniform)
    # Skewed importance: the weighted search lowers the error where it counts.
    skewed = np.where(np.arange(128) % 8 == 0, 50.0, 1.0).astype(np.float32)
    weighted = quantize_rows_searched(weight, 2, 64, skewed)
    assert _weighted_error(weight, weighted, skewed) < 0.9 * _weighted_error(weight, searched, skewed)


def test_codes_round_trip_and_bad_arguments() -> None:
    rng = np.random.default_rng(1)
    packed, scales, zero = search_quantize(rng.standard_normal((5, 64)).astype(np.float32), 2, 32)
    codes = unpack_codes(packed, 2)
    assert packed.shape == (5, 2, 8) and scales.shape == zero.shape == (5, 2)
    assert codes.max() <= 3 and zero.max() <= 3
    with pytest.raises(Pbs2pError, match="2, 4 or 8"):
        search_quantize(np.zeros((2, 64), np.float32), 3, 32)
    with pytest.raises(Pbs2pError, match="multiple of the block size"):
        search_quantize(np.zeros((2, 48), np.float32), 2, 32)
    with pytest.raises(Pbs2pError, match="non-negative"):
        search_quantize(np.zeros((2, 64), np.float32), 2, 32, -np.ones(64))


def _head_nodes(bundle: Path) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    head = next(
        n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] in inits and "head" in n.input[1]
    )
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    return head, gather


@pytest.fixture(scope="module")
def int2_bundles(tmp_path_factory, tiny_model_dir, corpus_text_file) -> dict[str, Path]:
    source = trained_like_dir(tmp_path_factory, tiny_model_dir)
    out = tmp_path_factory.mktemp("heads")
    bundles = {}
    for head in ("int4", "int4s", "int2"):
        bundles[head] = out / head
        export_bundle(source, bundles[head], weights="fp32", head=head)
    bundles["fp32"] = built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "fp32")
    return bundles


def test_int2_head_bundle_is_validated_and_reads_fewer_bytes(int2_bundles: dict[str, Path]) -> None:
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in int2_bundles.items()}
    head, gather = _head_nodes(int2_bundles["int2"])
    attrs = {a.name: a.i for a in head.attribute}
    assert attrs["bits"] == 2 and attrs["accuracy_level"] == 4 and len(head.input) == 4
    assert {a.name: a.i for a in gather.attribute}["bits"] == 4  # the gather keeps an int4 copy
    check = manifests["int2"]["validation"]
    # Gated logits: the reference rounds the head input as MatMulNBits does, so they agree to fp32 noise.
    assert check["sqnr_db"] > 60.0 and check["head_effect"] is not None
    assert check["head_effect"]["sqnr_db"] < manifests["int4"]["validation"]["head_effect"]["sqnr_db"]
    read = {k: m["sizes"]["head_read_per_token"] for k, m in manifests.items()}
    assert read["int2"]["embedding_row"] == read["int4"]["embedding_row"] > 0
    assert read["int2"]["head"] < 0.6 * read["int4"]["head"]
    assert read["int2"]["head"] < read["int4s"]["head"] < 0.9 * read["int4"]["head"]
    # The searched 4-bit head at block 128 stays at least as close to the fp32 head as RTN int4 at block 32.
    effects = {k: m["validation"]["head_effect"]["sqnr_db"] for k, m in manifests.items() if k != "fp32"}
    assert effects["int4s"] > effects["int4"] - 1.0 > effects["int2"]
    vocab, width = manifests["int2"]["vocab_size"], manifests["int2"]["hidden_size"]
    # 2 bits per weight, an fp32 scale per block of 64, 2-bit zero points (per row, padded to a byte).
    blocks = width // 64
    assert read["int2"]["head"] == vocab * (width // 4 + 4 * blocks + math.ceil(blocks / 4))
    for head, measured in read.items():
        assert predicted_read_bytes(head, vocab, width) == measured


def test_int2_head_under_the_teacher_forced_validation(
    tmp_path_factory, tiny_model_dir, corpus_text_file
) -> None:
    checkpoint = tiny_checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file)
    out = tmp_path_factory.mktemp("pbs2p_int2") / "bundle"
    manifest = export_bundle(checkpoint, out, weights="pbs2p", head="int2")
    forced = manifest["validation"]["teacher_forced"]
    assert forced is not None and forced["sqnr_db"] >= manifest["validation"]["threshold_db"]
    assert manifest["validation"]["head_effect"]["sqnr_db"] < 40.0


def test_cli_refuses_an_unknown_head(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pbs2p_edge.export.cli import export_command

    result = CliRunner().invoke(export_command, ["default", "-o", str(tmp_path / "b"), "--head", "int3"])
    assert result.exit_code == 2 and "int3" in result.output

"""`pbs2p-edge export`: bundles of a tiny compressed LLaMA and of its fp32/int4 baselines.

Bundles are built once per session (`built_bundle`, also used by tests/test_genai.py) to keep the suite fast.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export import export_bundle
from pbs2p_edge.export.cli import export_command

PROJECTIONS_PER_LAYER = 7
FUSED_NODES_PER_LAYER = 4  # q|k|v, o, gate|up, down
TINY_LAYERS = 2
_BUILT: dict[str, Path] = {}


def trained_like_dir(factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """The tiny model with its RMSNorm weights drawn around 1 instead of all exactly 1, as in trained models.

    With unit norm weights, an int4 embedding row stays an exact multiple of its block scale after the first
    norm, which puts many activations exactly on ties of the kernels' int7 rounding; ONNX Runtime and PyTorch
    then break some ties differently (their norms differ by one ulp) and the validation measures that
    artefact instead of the export. Any trained model has non-uniform norm weights.
    """
    if "model_dir" not in _BUILT:
        from transformers import AutoModelForCausalLM

        out = factory.mktemp("tiny_trained_like")
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(out)
        _BUILT["model_dir"] = out
    return _BUILT["model_dir"]


def tiny_checkpoint(factory: pytest.TempPathFactory, model_dir: Path, text_file: Path) -> Path:
    """The tiny model compressed at 6:8 with a fast calibration, via the compress command."""
    if "checkpoint" not in _BUILT:
        from pbs2p_edge.compress.cli import compress_command

        out = factory.mktemp("ckpt") / "model.pt"
        source = trained_like_dir(factory, model_dir)
        args = ["--model", str(source), "--text", str(text_file), "--nm", "6:8", "--calib-samples", "8"]
        args += ["--calib-len", "64", "-o", str(out), "--no-progress"]
        result = CliRunner().invoke(compress_command, args)
        assert result.exit_code == 0, result.output
        _BUILT["checkpoint"] = out
    return _BUILT["checkpoint"]


def built_bundle(factory: pytest.TempPathFactory, model_dir: Path, text_file: Path, kind: str) -> Path:
    """Session-cached bundles: "pbs2p" (int4 head), "fp32" and "int4" baselines of the tiny model, with the
    default (fused) graph; "pbs2p-unfused" / "int4-unfused": the same with the unfused graph."""
    if kind not in _BUILT:
        out = factory.mktemp(f"bundle_{kind}") / "bundle"
        weights, _, unfused = kind.partition("-")
        if weights == "pbs2p":
            source = tiny_checkpoint(factory, model_dir, text_file)
        else:
            source = trained_like_dir(factory, model_dir)
        export_bundle(source, out, weights=weights, graph=unfused or "auto")
        _BUILT[kind] = out
    return _BUILT[kind]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file) -> Path:
    return tiny_checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file)


@pytest.fixture(scope="module")
def pbs2p_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file) -> Path:
    return built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "pbs2p")


@pytest.fixture(scope="module", params=["fp32", "int4"])
def baseline_bundle(request, tmp_path_factory, tiny_model_dir, corpus_text_file) -> Path:
    return built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, request.param)


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _graph(bundle: Path) -> onnx.ModelProto:
    return onnx.load(str(bundle / "model.onnx"), load_external_data=False)


def _session(bundle: Path):
    from pbs2p_edge.export.validate import ort_session

    library = _manifest(bundle)["ops_library"]
    return ort_session(bundle / "model.onnx", None if library is None else bundle / library)


def _dequantized_head(bundle: Path) -> torch.Tensor:
    """The LM head as the bundle stores it, read back from its MatMulNBits initializers."""
    from pbs2p_edge.export.nbits import BlockQuantized

    model = onnx.load(str(bundle / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("head."))
    attrs = {a.name: a.i for a in node.attribute}
    q = BlockQuantized(
        inits[node.input[1]], inits[node.input[2]], attrs["bits"], attrs["block_size"], attrs["K"]
    )
    return torch.from_numpy(q.dequantize())


def test_pbs2p_bundle_layout_and_checker(pbs2p_bundle: Path) -> None:
    names = {p.name for p in pbs2p_bundle.iterdir()}
    expected = {
        "model.onnx",
        "model.onnx.data",
        "libpbs2p_edge_ops.so",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert expected | {"genai_config.json", "manifest.json"} <= names
    onnx.checker.check_model(str(pbs2p_bundle / "model.onnx"))
    manifest = _manifest(pbs2p_bundle)
    assert manifest["format"] == "pbs2p-edge-bundle" and manifest["version"] == 1
    assert manifest["weights"] == "pbs2p" and manifest["ops_library"] == "libpbs2p_edge_ops.so"
    assert (
        manifest["num_layers"] == TINY_LAYERS and manifest["num_kv_heads"] == 2 and manifest["head_dim"] == 32
    )
    assert manifest["compression"]["n"] == 6 and manifest["compression"]["m"] == 8
    sizes = manifest["sizes"]
    assert sizes["ops_library"] == (pbs2p_bundle / "libpbs2p_edge_ops.so").stat().st_size
    assert (
        sizes["total"]
        == sizes["model_onnx"] + sizes["model_onnx_data"] + sizes["ops_library"] + sizes["tokenizer"]
    )
    assert sizes["model_onnx_data"] == (pbs2p_bundle / "model.onnx.data").stat().st_size


def test_every_projection_is_one_custom_node_fed_by_packed_initializers(pbs2p_bundle: Path) -> None:
    graph = _graph(pbs2p_bundle).graph
    custom = [n for n in graph.node if n.op_type == "SparseBinaryMatMul"]
    # The fused graph: q|k|v and gate|up are one multi-block node each (4 nodes per layer for 7 projections).
    assert len(custom) == FUSED_NODES_PER_LAYER * TINY_LAYERS
    assert all(n.domain == "pbs2p.edge" for n in custom)
    initializers = {t.name: t for t in graph.initializer}
    for node in custom:
        assert all(name in initializers for name in node.input[1:])
    # Nothing dequantized: no float MatMul/Gemm reads a weight initializer anywhere in the graph.
    float_weight_nodes = [
        n
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm", "Gather") and any(i in initializers for i in n.input)
    ]
    assert [n.name for n in float_weight_nodes if n.op_type != "Gather"] == []
    weights = _manifest(pbs2p_bundle)["sizes"]["weights"]
    assert weights["float_layers"] == 0 and weights["sparse_binary_layers"] > 0


def test_tied_int4_head_is_stored_once(pbs2p_bundle: Path) -> None:
    graph = _graph(pbs2p_bundle).graph
    head = next(n for n in graph.node if n.op_type == "MatMulNBits")
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    producer = next(n for n in graph.node if gather.input[0] in n.output)
    assert producer.op_type == "Reshape" and producer.input[0] == head.input[1]
    assert gather.input[2] == head.input[2]


def test_pbs2p_bundle_matches_pytorch_prefill_and_8_decode_steps(
    pbs2p_bundle: Path, checkpoint: Path
) -> None:
    """Independent of the export's own validation: a fresh PyTorch model vs the bundle as written."""
    from pbs2p_edge.checkpoint import build_model, load_checkpoint, packed_layers
    from pbs2p_edge.export.configs import export_config
    from pbs2p_edge.export.patch import eager_arithmetic, pbs2p_factory, swapped_linears
    from pbs2p_edge.export.validate import compare, ort_logits, reference_head, torch_logits

    ckpt = load_checkpoint(checkpoint)
    model, _ = build_model(ckpt)
    config = export_config(model.config)
    head = _dequantized_head(pbs2p_bundle)
    prompt = [int(i) for i in np.random.default_rng(1).integers(3, config.vocab_size, 20)]
    session = _session(pbs2p_bundle)
    with reference_head(model, head, head), swapped_linears(model, pbs2p_factory(packed_layers(ckpt))):
        with eager_arithmetic(model, "kernel"):
            reference, tokens = torch_logits(model, prompt, steps=8)
        with eager_arithmetic(model, "float"):
            float_activations, _ = torch_logits(model, prompt, steps=8, forced=tokens)
    graph = ort_logits(session, config, prompt, tokens)
    assert len(reference) == 9 and [r.shape[0] for r in reference] == [20] + [1] * 8
    exact = compare(reference, graph)
    assert exact["sqnr_db"] >= 40.0 and exact["top1_agreement"] == 1.0, exact
    # The kernels' int7 activations against the compressed model in fp32: noisier, but the same model.
    assert compare(float_activations, graph)["sqnr_db"] >= 25.0
    validation = _manifest(pbs2p_bundle)["validation"]
    assert validation["sqnr_db"] >= validation["threshold_db"] == 40.0 and validation["decode_steps"] == 8
    assert validation["head_effect"] is not None and validation["vs_float_activations"] is not None
    assert validation["teacher_forced"]["ops_min_sqnr_db"] >= 40.0
    assert validation["teacher_forced"]["wiring_min_sqnr_db"] >= 40.0


def test_batch_of_two_with_left_padding(tmp_path_factory, tiny_model_dir, corpus_text_file) -> None:
    """The mask input really masks: a left-padded row gives the logits of the same row run alone (unfused
    graph; the fused graph's right padding: tests/test_fused.py)."""
    pbs2p_bundle = built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "pbs2p-unfused")
    session = _session(pbs2p_bundle)
    manifest = _manifest(pbs2p_bundle)
    layers, kv, dim = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]
    past = {
        f"past_key_values.{i}.{k}": np.zeros((2, kv, 0, dim), np.float32)
        for i in range(layers)
        for k in ("key", "value")
    }
    ids = np.array([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    positions = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]], dtype=np.int64)
    both = session.run(
        ["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
    )[0]
    single_past = {k: v[:1] for k, v in past.items()}
    alone = session.run(
        ["logits"],
        {
            "input_ids": ids[:1, 2:],
            "attention_mask": mask[:1, 2:],
            "position_ids": positions[:1, 2:],
            **single_past,
        },
    )[0]
    np.testing.assert_allclose(both[0, 2:], alone[0], rtol=1e-4, atol=1e-4)


def test_baselines_export_run_and_share_the_interface(baseline_bundle: Path, pbs2p_bundle: Path) -> None:
    manifest = _manifest(baseline_bundle)
    graph = _graph(baseline_bundle).graph
    reference = _graph(pbs2p_bundle).graph
    assert [i.name for i in graph.input] == [i.name for i in reference.input]
    assert [o.name for o in graph.output] == [o.name for o in reference.output]
    assert manifest["ops_library"] is None and not (baseline_bundle / "libpbs2p_edge_ops.so").exists()
    assert manifest["validation"]["sqnr_db"] >= 40.0
    ops = [n.op_type for n in graph.node]
    assert "SparseBinaryMatMul" not in ops
    if manifest["weights"] == "int4":
        # The fused graph runs q/k/v and gate/up as one node each: 4 nodes per layer instead of 7.
        per_layer = 4 if manifest["graph"] == "fused" else PROJECTIONS_PER_LAYER
        assert ops.count("MatMulNBits") == per_layer * TINY_LAYERS + 1  # + the LM head
        assert manifest["sizes"]["weights"]["float_layers"] == 0
    else:
        assert "MatMulNBits" not in ops and manifest["head"] == "fp32"
        assert manifest["sizes"]["weights"]["nbits_layers"] == 0
    onnx.checker.check_model(str(baseline_bundle / "model.onnx"))


def test_matmul_nbits_accuracy_level_defaults_per_format(baseline_bundle: Path, pbs2p_bundle: Path) -> None:
    """int8 activations (level 4) where validation re-anchors the graph at every sparse-binary node (pbs2p);
    fp32 compute for the baselines, every MatMulNBits node carrying the manifest's level."""
    for bundle, level in ((pbs2p_bundle, 4), (baseline_bundle, 0)):
        assert _manifest(bundle)["accuracy_level"] == level
        graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
        nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
        levels = {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} or {0}
        assert levels == ({level} if nodes else {0})


def test_pbs2p_bundle_is_smaller_than_baselines(baseline_bundle: Path, pbs2p_bundle: Path) -> None:
    assert (
        _manifest(pbs2p_bundle)["sizes"]["graph_total"] < _manifest(baseline_bundle)["sizes"]["graph_total"]
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_dequantize_matches_onnxruntime(bits: int) -> None:
    """Our eager reference for MatMulNBits / GatherBlockQuantized equals what ONNX Runtime computes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pbs2p_edge.export.nbits import quantize_rows

    rows, k, block = 48, 64, 32
    weight = np.random.default_rng(bits).standard_normal((rows, k)).astype(np.float32)
    q = quantize_rows(weight, bits, block)
    flat = q.packed.reshape(rows, -1)
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["x", "B", "S"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=rows,
            bits=bits,
            block_size=block,
        ),
        helper.make_node(
            "GatherBlockQuantized",
            ["F", "ids", "S"],
            ["e"],
            domain="com.microsoft",
            bits=bits,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(q.packed, "B"),
            numpy_helper.from_array(q.scales, "S"),
            numpy_helper.from_array(flat, "F"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    ids = np.array([0, 7, rows - 1])
    y, e = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "ids": ids})
    dense = q.dequantize()
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(e, dense[ids])
    assert np.abs(dense - weight).max() <= np.abs(weight).max() / (2 ** (bits - 1) - 1)


def test_failed_validation_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(Pbs2pError, match="validation failed"):
        export_bundle(checkpoint, out, threshold_db=500.0)
    assert list(tmp_path.iterdir()) == []


def _revalidate(bundle: Path, checkpoint: Path) -> dict:
    """The export's validation, run again on `bundle` against a PyTorch model rebuilt from the checkpoint."""
    from pbs2p_edge.checkpoint import build_model, load_checkpoint, packed_layers
    from pbs2p_edge.export.configs import export_config
    from pbs2p_edge.export.head import make_head
    from pbs2p_edge.export.patch import pbs2p_factory, swapped_linears
    from pbs2p_edge.export.validate import validate_graph

    ckpt = load_checkpoint(checkpoint)
    model, tokenizer = build_model(ckpt)
    manifest = _manifest(bundle)
    with swapped_linears(model, pbs2p_factory(packed_layers(ckpt))):
        head = make_head(model, manifest["head"], manifest["accuracy_level"])
        return validate_graph(
            bundle / "model.onnx",
            bundle / manifest["ops_library"],
            model,
            head,
            export_config(model.config),
            tokenizer,
        )


def changed_initializer_copy(
    bundle: Path, out: Path, initializer: str, change: Callable[[np.ndarray], np.ndarray]
) -> Path:
    """A copy of `bundle` whose graph has `initializer` replaced by `change(initializer)` (same dtype)."""
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = onnx.load(str(bundle / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name == initializer)
    array = onnx.numpy_helper.to_array(tensor)
    tensor.CopyFrom(onnx.numpy_helper.from_array(change(array).astype(array.dtype), initializer))
    onnx.save_model(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return out


def test_revalidating_an_intact_bundle_passes_every_check(pbs2p_bundle: Path, checkpoint: Path) -> None:
    result = _revalidate(pbs2p_bundle, checkpoint)
    forced = result["teacher_forced"]
    assert (
        result["gated"] == "teacher_forced" and forced["custom_layers"] == PROJECTIONS_PER_LAYER * TINY_LAYERS
    )
    assert forced["custom_nodes"] == FUSED_NODES_PER_LAYER * TINY_LAYERS
    assert min(forced["sqnr_db"], forced["ops_min_sqnr_db"], forced["wiring_min_sqnr_db"]) >= 80.0, forced
    assert not (pbs2p_bundle / "validate.onnx").exists()


DEFECTS = {
    # A packed scale off by 25% in one layer: that node's output no longer matches the kernel arithmetic; the
    # gate|up node (swiglu epilogue) is checked as one output, named after both its layers.
    "packed-scales": (
        "layers.1.mlp.up_proj.scales",
        r"custom node output at layers\.1\.mlp\.gate_proj\+layers\.1\.mlp\.up_proj,",
    ),
    "packed-scales-qkv": (
        "layers.1.self_attn.k_proj.scales",
        r"custom node output at layers\.1\.self_attn\.k_proj,",
    ),
    # A norm between two custom nodes: the inputs of the nodes it feeds differ.
    "norm-between-nodes": (
        "layers.1.post_attention_layernorm.weight",
        r"custom node input at layers\.1\.mlp\.(gate|up)_proj,",
    ),
    # The final norm: only the logits differ.
    "final-norm": ("norm.weight", r"validation failed: logits,"),
}


@pytest.mark.parametrize(("initializer", "message"), DEFECTS.values(), ids=list(DEFECTS))
def test_validation_names_where_a_defect_is(
    pbs2p_bundle: Path, checkpoint: Path, tmp_path: Path, initializer: str, message: str
) -> None:
    broken = changed_initializer_copy(pbs2p_bundle, tmp_path / "broken", initializer, lambda a: a * 1.25)
    with pytest.raises(Pbs2pError, match=message):
        _revalidate(broken, checkpoint)
    assert not (broken / "validate.onnx").exists()


# ------------------------------------------------------------------------------------------ bad input


def _export(*args: str | Path, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(export_command, [str(a) for a in args])


def _assert_one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_not_our_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    _assert_one_line_error(_export(foreign, "-o", tmp_path / "out"), "not a pbs2p-edge checkpoint")
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    _assert_one_line_error(_export(truncated, "-o", tmp_path / "out"), "truncated")
    assert not (tmp_path / "out").exists()


def test_unknown_checkpoint_version(checkpoint: Path, tmp_path: Path) -> None:
    data = torch.load(checkpoint, weights_only=True)
    data["version"] = 99
    future = tmp_path / "future.pt"
    torch.save(data, future)
    _assert_one_line_error(_export(future, "-o", tmp_path / "out"), "version")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_one_line_error(_export(checkpoint, "-o", out), "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_ops_library_that_fails_to_load(checkpoint: Path, tmp_path: Path) -> None:
    fake = tmp_path / "libpbs2p_edge_ops.so"
    fake.write_text("not a shared library")
    result = _export(checkpoint, "-o", tmp_path / "out", env={"PBS2P_EDGE_OPS_LIBRARY": str(fake)})
    _assert_one_line_error(result, "fails to load")
    assert not (tmp_path / "out").exists()


def test_baseline_format_refuses_a_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    _assert_one_line_error(_export(checkpoint, "-o", tmp_path / "out", "--format", "int4"), "--format pbs2p")


@pytest.mark.parametrize(("salient", "bias", "k"), [(0, False, 320), (2, True, 200), (3, False, 128)])
def test_kernel_arithmetic_in_pytorch_equals_the_format_oracle(salient: int, bias: bool, k: int) -> None:
    """The PyTorch reference used by validation computes what pbs2p_edge.format.kernel_matmul specifies."""
    from torch import nn

    from pbs2p_edge.export.patch import SparseBinaryLinear
    from pbs2p_edge.format import kernel_matmul, pack, random_weight

    weight = random_weight(48, k, salient=salient, bias=bias, seed=1)
    linear = nn.Linear(k, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight.dense()))
        if bias:
            linear.bias.copy_(torch.from_numpy(weight.bias.astype(np.float32)))
    module = SparseBinaryLinear(linear, pack(weight))
    module.arithmetic = "kernel"
    x = np.random.default_rng(0).standard_normal((2, 5, k)).astype(np.float32)
    with torch.no_grad():
        ours = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, kernel_matmul(x, pack(weight)), rtol=1e-5, atol=1e-6)


def test_an_ops_library_older_than_the_exporter_is_refused(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op-version-3 library ignores the swiglu attribute: the export must name the library, not fail later."""
    import dataclasses

    from pbs2p_edge import ops

    real = ops.library_info
    monkeypatch.setattr(ops, "library_info", lambda path: dataclasses.replace(real(path), op_version=3))
    out = tmp_path / "out"
    _assert_one_line_error(_export(checkpoint, "-o", out), "op version 3")
    assert not out.exists()

"""The fused graph (export/fused.py): its nodes, its logits against the unfused graph, the shared KV buffers of
the runtime, and bundles of the unfused graph (already on users' disks) still running."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_export import TINY_LAYERS, built_bundle, tiny_checkpoint

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.validate import DEFAULT_THRESHOLD_DB

PROMPT = [5, 9, 17, 33, 65, 129, 200]


def _bundle(request_factory, model_dir: Path, text: Path, kind: str) -> Path:
    return built_bundle(request_factory, model_dir, text, kind)


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model_dir, corpus_text_file) -> dict[str, Path]:
    kinds = ("pbs2p", "pbs2p-unfused", "int4", "int4-unfused")
    return {k: _bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, k) for k in kinds}


def test_fused_graph_nodes(bundles: dict[str, Path]) -> None:
    for kind in ("pbs2p", "int4"):
        manifest = _manifest(bundles[kind])
        nodes = manifest["graph_nodes"]
        ops = nodes["by_op"]
        assert manifest["graph"] == "fused" and "logits_to_keep" in manifest["inputs"]
        assert ops["GroupQueryAttention"] == TINY_LAYERS
        assert ops["SkipSimplifiedLayerNormalization"] == 2 * TINY_LAYERS
        assert not {"Softmax", "Transpose", "Concat", "Where"} & set(ops)
        # Per layer: 2 norms, attention, 4 projection nodes (q|k|v, o, gate|up, down); int4 adds the Split of
        # gate|up and SiLU (Sigmoid, Mul) * up (Mul), which a SparseBinaryMatMul gate|up node computes itself
        # (attribute activation=swiglu).
        swiglu = {"pbs2p": 0, "int4": 1 + 3}[kind]
        assert nodes["per_layer"] == 2 + 1 + 4 + swiglu
        if kind == "pbs2p":
            assert not {"Split", "Sigmoid"} & set(ops)
            assert ops["SparseBinaryMatMul"] == 4 * TINY_LAYERS
            graph = onnx.load(str(bundles[kind] / "model.onnx"), load_external_data=False).graph
            activations = [a.s.decode() for n in graph.node for a in n.attribute if a.name == "activation"]
            assert activations == ["swiglu"] * TINY_LAYERS
        assert ops[{"pbs2p": "SparseBinaryMatMul", "int4": "MatMulNBits"}[kind]] >= 4 * TINY_LAYERS
        unfused = _manifest(bundles[f"{kind}-unfused"])
        assert unfused["graph"] == "unfused"
        assert unfused["graph_nodes"]["per_layer"] >= nodes["per_layer"] + 20


def test_fused_logits_equal_unfused_graph(bundles: dict[str, Path]) -> None:
    """int4 (no int7 activation rounding to flip): fused and unfused graphs, prefill + decode, same logits."""
    from pbs2p_edge.export.configs import export_config
    from pbs2p_edge.export.validate import compare, ort_logits, ort_session

    manifest = _manifest(bundles["int4"])
    from transformers import AutoConfig

    config = export_config(AutoConfig.for_model(**manifest["model_config"]))
    tokens = [3, 40, 41, 42, 7, 8]
    fused = ort_logits(ort_session(bundles["int4"] / "model.onnx", None), config, PROMPT, tokens)
    plain = ort_logits(ort_session(bundles["int4-unfused"] / "model.onnx", None), config, PROMPT, tokens)
    result = compare(plain, fused)
    assert result["sqnr_db"] >= DEFAULT_THRESHOLD_DB + 40 and result["top1_agreement"] == 1.0, result
    for kind in ("pbs2p", "int4"):  # the export's own gate against PyTorch passed on the fused graph
        validation = _manifest(bundles[kind])["validation"]
        assert validation["sqnr_db"] >= DEFAULT_THRESHOLD_DB
    forced = _manifest(bundles["pbs2p"])["validation"]["teacher_forced"]
    assert forced["custom_layers"] == 7 * TINY_LAYERS and forced["custom_nodes"] == 4 * TINY_LAYERS
    assert forced["ops_min_sqnr_db"] >= DEFAULT_THRESHOLD_DB


def _no_cache_greedy(session, prompt: list[int], steps: int) -> list[int]:
    ids, tokens = list(prompt), []
    for _ in range(steps):
        session.reset()
        token = int(np.argmax(session.forward(ids)))
        tokens.append(token)
        ids.append(token)
    return tokens


@pytest.mark.parametrize("kind", ["pbs2p", "int4"])
def test_kv_buffer_generation_equals_no_cache_greedy(
    bundles: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pbs2p_edge.runtime import Generator
    from pbs2p_edge.runtime import session as session_module

    monkeypatch.setattr(session_module, "KV_BUFFER_STEP", 4)  # grow the buffers several times
    generator = Generator(bundles[kind], threads=1)
    assert generator.session.fused
    result = generator.generate(PROMPT, 20)
    assert generator.session.kv_cache_bytes() > 0
    assert result.token_ids == _no_cache_greedy(generator.session, PROMPT, len(result.token_ids))
    # A fork has its own buffers: generating on it leaves the first cache alone.
    fork = generator.fork()
    assert fork.generate(PROMPT, 20).token_ids == result.token_ids


def test_old_unfused_bundles_still_run(bundles: dict[str, Path]) -> None:
    from pbs2p_edge.runtime import Generator
    from pbs2p_edge.runtime.perplexity import BundleScorer

    fused, plain = Generator(bundles["int4"], threads=1), Generator(bundles["int4-unfused"], threads=1)
    assert fused.session.fused and not plain.session.fused
    assert fused.generate(PROMPT, 16).token_ids == plain.generate(PROMPT, 16).token_ids
    assert Generator(bundles["pbs2p-unfused"], threads=1).generate(PROMPT, 8).stop_reason is not None
    ids = list(range(3, 67))
    scores = [
        BundleScorer(bundles[k], threads=1).perplexity(ids, ctx=32, progress=False)
        for k in ("int4", "int4-unfused")
    ]
    assert scores[0]["ppl"] == pytest.approx(scores[1]["ppl"], rel=1e-4)


def test_right_padded_batch_of_two(bundles: dict[str, Path]) -> None:
    """The fused graph reads each row's length from attention_mask: a right-padded row gives its own logits."""
    from pbs2p_edge.export.validate import ort_session

    session = ort_session(bundles["int4"] / "model.onnx", None)
    manifest = _manifest(bundles["int4"])
    layers, kv, dim = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]

    def past(batch: int) -> dict[str, np.ndarray]:
        shape = (batch, kv, 8, dim)
        return {
            f"past_key_values.{i}.{k}": np.zeros(shape, np.float32)
            for i in range(layers)
            for k in ("key", "value")
        }

    ids = np.array([[11, 12, 13, 0, 0], [21, 22, 23, 24, 25]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    both = session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **past(2)})[0]
    alone = session.run(["logits"], {"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3], **past(1)})[0]
    np.testing.assert_allclose(both[0, :3], alone[0], rtol=1e-4, atol=1e-4)


def test_fused_graph_refuses_families_it_cannot_express() -> None:
    from transformers import Qwen3Config

    from pbs2p_edge.export.bundle import _use_fused
    from pbs2p_edge.export.configs import export_config

    config = export_config(
        Qwen3Config(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
        )
    )
    assert not _use_fused(config, "auto") and not _use_fused(config, "unfused")
    with pytest.raises(Pbs2pError, match="--graph unfused"):
        _use_fused(config, "fused")


def test_graph_without_the_epilogue_still_runs(
    bundles: dict[str, Path], tmp_path_factory, tiny_model_dir, corpus_text_file, monkeypatch
) -> None:
    """The gate|up node without attribute activation (the graph every bundle before op version 4 has: Split,
    Sigmoid, Mul, Mul after it) still exports, validates, loads and decodes; its logits are the swiglu graph's."""
    from pbs2p_edge import ops
    from pbs2p_edge.export import export_bundle, fused
    from pbs2p_edge.export.configs import export_config
    from pbs2p_edge.export.validate import compare, ort_logits, ort_session
    from pbs2p_edge.runtime import Generator

    monkeypatch.setattr(fused, "GATE_UP_ACTIVATION", "none")
    out = tmp_path_factory.mktemp("no_epilogue") / "bundle"
    source = tiny_checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file)
    manifest = export_bundle(source, out, weights="pbs2p")
    assert (
        manifest["graph_nodes"]["per_layer"] == 11
        and manifest["graph_nodes"]["by_op"]["Sigmoid"] == TINY_LAYERS
    )
    assert manifest["validation"]["teacher_forced"]["ops_min_sqnr_db"] >= DEFAULT_THRESHOLD_DB
    assert Generator(out, threads=1).generate(PROMPT, 8).token_ids
    from transformers import AutoConfig

    config = export_config(AutoConfig.for_model(**manifest["model_config"]))
    library = ops.library_path()
    old = ort_logits(ort_session(out / "model.onnx", library), config, PROMPT, [])
    new = ort_logits(ort_session(bundles["pbs2p"] / "model.onnx", library), config, PROMPT, [])
    assert compare(old, new)["sqnr_db"] >= DEFAULT_THRESHOLD_DB


def test_validation_refuses_a_wrong_fused_node(
    tmp_path_factory, tiny_model_dir, corpus_text_file, monkeypatch
) -> None:
    """A gate|up node computing silu(up) * gate (blocks swapped, metadata unchanged) fails the export's gate at
    that node: the logits and the down projection's input are forced, the node's output is not."""
    from pbs2p_edge.export import export_bundle, fused

    class Swapped(fused.FusedSparseBinary):
        def __init__(self, names: list[str], modules: list, activation: str = "none") -> None:
            super().__init__(names, modules[::-1] if activation == "swiglu" else modules, activation)

    monkeypatch.setattr(fused, "FusedSparseBinary", Swapped)
    out = tmp_path_factory.mktemp("swapped") / "bundle"
    source = tiny_checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file)
    with pytest.raises(
        Pbs2pError, match=r"custom node output at layers\.\d\.mlp\.gate_proj\+layers\.\d\.mlp\.up_proj"
    ):
        export_bundle(source, out, weights="pbs2p")
    assert not out.exists()


def test_validation_taps_of_epilogue_nodes() -> None:
    """Validation reads a gate|up node's epilogue; it refuses epilogues it cannot check."""
    from pbs2p_edge.export.forcing import LAYERS_KEY, _node_taps

    def node(activation: str | None, layers: str | None) -> onnx.NodeProto:
        attrs = {"block_rows": [4, 4]} | ({"activation": activation} if activation else {})
        made = onnx.helper.make_node("SparseBinaryMatMul", ["x", "w"], ["y"], domain="pbs2p.edge", **attrs)
        if layers is not None:
            made.metadata_props.add(key=LAYERS_KEY, value=layers)
        return made

    taps = _node_taps(node("swiglu", "l.gate_proj,l.up_proj"))
    assert [(t.layer, t.start, t.stop, t.activation) for t in taps] == [
        ("l.gate_proj", 0, 4, "swiglu"),
        ("l.up_proj", 4, 8, "swiglu"),
    ]
    assert {t.activation for t in _node_taps(node(None, "l.gate_proj,l.up_proj"))} == {"none"}
    with pytest.raises(Pbs2pError, match="activation 'gelu'"):
        _node_taps(node("gelu", "l.gate_proj,l.up_proj"))
    with pytest.raises(Pbs2pError, match="activation 'swiglu'"):
        _node_taps(node("swiglu", None))

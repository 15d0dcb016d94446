"""Export at scale, on the tiny model: validation decodes each packed layer once and stays as strict, the fp32
bundle streams its weights to external data (one copy) and PyTorch's weights go before ONNX Runtime loads."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from test_export import built_bundle, changed_initializer_copy, tiny_checkpoint, trained_like_dir

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export import export_bundle

TINY_LAYERS = 2
PROJECTIONS_PER_LAYER = 7


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file) -> Path:
    return tiny_checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file)


@pytest.fixture(scope="module")
def pbs2p_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file) -> Path:
    return built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "pbs2p")


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file) -> Path:
    return built_bundle(tmp_path_factory, tiny_model_dir, corpus_text_file, "fp32")


def _revalidate_packed_only(bundle: Path, checkpoint: Path) -> dict:
    """The export's validation on `bundle`, against a model built as the export builds it: no dense weights
    for the packed layers (meta), so every PyTorch run reads the decoded packed weights."""
    import json

    from pbs2p_edge.checkpoint import build_model, load_checkpoint, packed_layers
    from pbs2p_edge.export.configs import export_config
    from pbs2p_edge.export.head import make_head
    from pbs2p_edge.export.patch import pbs2p_factory, swapped_linears
    from pbs2p_edge.export.validate import validate_graph

    ckpt = load_checkpoint(checkpoint)
    model, tokenizer = build_model(ckpt, dense_linears=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    with swapped_linears(model, pbs2p_factory(packed_layers(ckpt))) as swapped:
        assert all(m.weight_hat.is_meta for m in swapped.values())
        head = make_head(model, manifest["head"], manifest["accuracy_level"])
        return validate_graph(
            bundle / "model.onnx",
            bundle / manifest["ops_library"],
            model,
            head,
            export_config(model.config),
            tokenizer,
        )


@pytest.fixture
def decode_counts(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts `decode_weight` calls per packed layer (by the identity of its PackedWeight)."""
    from pbs2p_edge.export import patch

    counts: Counter = Counter()
    real = patch.decode_weight

    def counting(packed):
        counts[id(packed)] += 1
        return real(packed)

    monkeypatch.setattr(patch, "decode_weight", counting)
    return counts


def test_validation_decodes_each_packed_layer_once(
    pbs2p_bundle: Path, checkpoint: Path, decode_counts: Counter
) -> None:
    result = _revalidate_packed_only(pbs2p_bundle, checkpoint)
    forced = result["teacher_forced"]
    # ~5 PyTorch runs of prefill + 8 decode steps, plus the kernel twin on each node's graph input: each of
    # the 14 layers was still decoded exactly once.
    assert len(decode_counts) == PROJECTIONS_PER_LAYER * TINY_LAYERS
    assert set(decode_counts.values()) == {1}
    assert min(forced["sqnr_db"], forced["ops_min_sqnr_db"], forced["wiring_min_sqnr_db"]) >= 80.0, forced
    assert result["vs_float_activations"]["sqnr_db"] > 10.0  # the float path ran (on the decoded weights)


CORRUPTIONS = {
    # Every sign bit of one layer flipped: that node's output is no longer the packed weight's.
    "signs": ("layers.1.mlp.down_proj.signs", np.invert, r"custom node output at layers\.1\.mlp\.down_proj,"),
    # The final norm scaled: only the logits differ.
    "logits": ("norm.weight", lambda a: a * 1.25, r"validation failed: logits,"),
}


@pytest.mark.parametrize(("initializer", "change", "message"), CORRUPTIONS.values(), ids=list(CORRUPTIONS))
def test_decoded_once_validation_still_refuses_a_corrupted_graph(
    pbs2p_bundle: Path,
    checkpoint: Path,
    tmp_path: Path,
    decode_counts: Counter,
    initializer: str,
    change: Callable[[np.ndarray], np.ndarray],
    message: str,
) -> None:
    broken = changed_initializer_copy(pbs2p_bundle, tmp_path / "broken", initializer, change)
    with pytest.raises(Pbs2pError, match=message):
        _revalidate_packed_only(broken, checkpoint)
    assert set(decode_counts.values()) == {1}


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def test_fp32_bundle_streams_one_copy_of_each_weight_to_external_data(
    fp32_bundle: Path, tmp_path_factory, tiny_model_dir
) -> None:
    from transformers import AutoModelForCausalLM

    graph = onnx.load(str(fp32_bundle / "model.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert all(_external(t)["location"] == "model.onnx.data" for t in external)
    # No initializer above the threshold inline, and no byte range of the data file used twice.
    assert all(
        len(t.raw_data) <= 1024 for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
    )
    ranges = sorted((int(_external(t).get("offset", 0)), int(_external(t)["length"])) for t in external)
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(ranges))
    model = AutoModelForCausalLM.from_pretrained(trained_like_dir(tmp_path_factory, tiny_model_dir))
    params = sum(p.numel() for p in model.parameters())  # tied head counted once
    stored = sum(length for _, length in ranges)
    assert 4 * params <= stored < 4 * params + 2**20  # + rotary tables; no weight twice
    # Round trip: every projection's MatMul reads W.T from the data file, equal to the model's W.
    weights = {
        t.name: onnx.numpy_helper.to_array(t, base_dir=str(fp32_bundle))
        for t in onnx.load(str(fp32_bundle / "model.onnx")).graph.initializer
    }
    matmuls = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    assert len(matmuls) == PROJECTIONS_PER_LAYER * TINY_LAYERS
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in matmuls:
        layer = name.removeprefix("model.").removesuffix(".weight_t")
        linear = next(m for n, m in linears.items() if n.endswith(layer))
        np.testing.assert_array_equal(weights[name], linear.weight.detach().numpy().T, err_msg=name)


def test_fp32_export_frees_pytorch_weights_before_the_last_session(
    tmp_path: Path, tmp_path_factory, tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pbs2p_edge.export import bundle as bundle_module
    from pbs2p_edge.export import validate

    sessions: list[bool] = []
    loaded: list = []
    real_session, real_source = validate.ort_session, bundle_module._load_fp_source

    def source(*args, **kwargs):
        src = real_source(*args, **kwargs)
        loaded.append(src.model)
        return src

    def session(*args, **kwargs):
        sessions.append(all(p.is_meta for p in loaded[0].parameters()))
        return real_session(*args, **kwargs)

    monkeypatch.setattr(bundle_module, "_load_fp_source", source)
    monkeypatch.setattr(validate, "ort_session", session)
    manifest = export_bundle(
        trained_like_dir(tmp_path_factory, tiny_model_dir), tmp_path / "b", weights="fp32"
    )
    assert sessions == [True] and manifest["validation"]["sqnr_db"] >= 80.0


def test_fp32_export_refuses_up_front_when_memory_is_short(
    tmp_path: Path, tmp_path_factory, tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig

    from pbs2p_edge import memcheck
    from pbs2p_edge.export.cli import export_command

    folder = trained_like_dir(tmp_path_factory, tiny_model_dir)
    needed = memcheck.fp32_export_bytes(AutoConfig.from_pretrained(folder))
    assert needed > memcheck.BASE_BYTES + 4 * memcheck.config_params(AutoConfig.from_pretrained(folder))[0]
    monkeypatch.setattr(memcheck, "available_bytes", lambda: memcheck.BASE_BYTES // 2)
    out = tmp_path / "out"
    result = CliRunner().invoke(export_command, [str(folder), "-o", str(out), "--format", "fp32"])
    assert result.exit_code == 2 and not out.exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "exporting an fp32 bundle" in lines[0] and "GiB is available" in lines[0]


@pytest.mark.parametrize(("salient", "col_scales", "k"), [(0, False, 320), (2, True, 200), (3, False, 128)])
def test_decoded_weight_rebuilds_w_hat_to_the_bit(salient: int, col_scales: bool, k: int) -> None:
    """The 1-byte-per-weight decoded form gives back exactly the W_hat the format defines."""
    from pbs2p_edge.export.patch import decode_weight
    from pbs2p_edge.format import pack, random_weight

    weight = random_weight(48, k, salient=salient, seed=2, col_scales=col_scales)
    decoded = decode_weight(pack(weight))
    assert decoded.ternary.dtype == torch.int8
    np.testing.assert_array_equal(decoded.dense().numpy(), weight.dense())


def test_pbs2p_export_refuses_up_front_when_memory_is_short(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pbs2p_edge import memcheck
    from pbs2p_edge.export.cli import export_command

    monkeypatch.setattr(memcheck, "available_bytes", lambda: 0)
    out = tmp_path / "out"
    result = CliRunner().invoke(export_command, [str(checkpoint), "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: exporting model.pt"), result.output
    assert "GiB in all" in lines[0]

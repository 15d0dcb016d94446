"""Bit budget (compress/budget.py): exact accounting, int4-kept layers in model.pt, eval and the exported
bundle (validated), old checkpoints still load, and one-line errors for impossible budgets."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from pbs2p_edge.compress.budget import choose_int4_layers, int4_bits, quick_binarize
from pbs2p_edge.compress.cli import compress_command

FAST = ["--calib-samples", "4", "--calib-len", "32", "--no-progress"]
_BUILT: dict[str, Path] = {}


def _budget_checkpoint(factory: pytest.TempPathFactory, model_dir: Path, text: Path) -> Path:
    if "ckpt" not in _BUILT:
        out = factory.mktemp("budget") / "model.pt"
        args = ["--model", str(model_dir), "--text", str(text), "--nm", "6:8", "--budget-bits", "3.7"]
        result = CliRunner().invoke(compress_command, [*args, *FAST, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "int4 decoder layers [" in result.output
        _BUILT["ckpt"] = out
    return _BUILT["ckpt"]


@pytest.fixture(scope="module")
def budget_ckpt(tmp_path_factory, tiny_model_dir, corpus_text_file) -> Path:
    return _budget_checkpoint(tmp_path_factory, tiny_model_dir, corpus_text_file)


def test_budget_accounting_equals_the_stored_bytes(budget_ckpt: Path) -> None:
    from pbs2p_edge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(budget_ckpt)
    results = ckpt["compression"]["results"]
    int4_layers = results["budget"]["int4_layers"]
    assert len(int4_layers) == 1
    names = sorted(ckpt["nbits"])
    assert len(names) == 7 and all(f"layers.{int4_layers[0]}." in n for n in names)
    stored = sum(t.numel() * t.element_size() for arrays in ckpt["packed"].values() for t in arrays.values())
    stored += sum(e["packed"].numel() + 4 * e["scales"].numel() for e in ckpt["nbits"].values())
    assert results["packed_bytes"] == stored
    weights = results["compressed_weights"]
    assert results["bits_per_weight"] == pytest.approx(8 * stored / weights)
    assert results["bits_per_weight"] <= 3.7
    # int4 layers cost exactly 5 bits per weight (4-bit values + an fp32 scale per 32).
    int4_weights = sum(int(e["meta"][2]) * e["scales"].shape[0] for e in ckpt["nbits"].values())
    int4_stored = sum(e["packed"].numel() + 4 * e["scales"].numel() for e in ckpt["nbits"].values())
    assert 8 * int4_stored == 5 * int4_weights
    assert results["projected_bundle_bytes"] > stored


def test_int4_layers_rebuild_exactly_and_export_as_matmulnbits(budget_ckpt: Path, tmp_path: Path) -> None:
    from pbs2p_edge.checkpoint import build_model, load_checkpoint, nbits_layers
    from pbs2p_edge.export import export_bundle

    ckpt = load_checkpoint(budget_ckpt)
    model, _ = build_model(ckpt)
    for name, q in nbits_layers(ckpt).items():
        assert torch.equal(model.get_submodule(name).weight, torch.from_numpy(q.dequantize()))
    out = tmp_path / "bundle"
    export_bundle(budget_ckpt, out)  # teacher-forced validation on (raises on failure)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    # The fused graph runs q|k|v and gate|up as one node each: 4 nodes for a layer's 7 projections.
    manifest = json.loads((out / "manifest.json").read_text())
    per_layer = 4 if manifest["graph"] == "fused" else 7
    assert ops.count("MatMulNBits") == per_layer + 1  # the int4 layer's projections + the int4 head
    assert ops.count("SparseBinaryMatMul") == per_layer
    if manifest["graph"] == "fused":
        # The int4 layer's nodes name their layers, so validation forces them as it forces the custom nodes;
        # the head's node names none (its output is the logits, checked as such).
        from pbs2p_edge.export.nbits import NBITS_LAYERS_KEY

        named = [
            p.value.split(",")
            for n in graph.graph.node
            if n.op_type == "MatMulNBits"
            for p in n.metadata_props
            if p.key == NBITS_LAYERS_KEY
        ]
        assert sorted(layer for layers in named for layer in layers) == sorted(
            name.removeprefix("model.") for name in nbits_layers(ckpt)
        )
        assert manifest["validation"]["teacher_forced"]["forced_int4_layers"] == 7


def test_version_1_checkpoints_still_load(budget_ckpt: Path, tmp_path: Path) -> None:
    from pbs2p_edge.checkpoint import load_checkpoint

    data = torch.load(budget_ckpt, weights_only=True)
    data["version"] = 1
    data.pop("nbits")
    old = tmp_path / "old.pt"
    torch.save(data, old)
    assert load_checkpoint(old)["nbits"] == {}


def test_greedy_choice_respects_the_budget() -> None:
    # 3 layers of 100 weights at 2 bits; int4 costs 5: each extra layer costs 300 bits = 1 bit/weight overall.
    packed, int4, weights = [200] * 3, [500] * 3, [100] * 3
    assert choose_int4_layers([0.1, 0.5, 0.3], packed, int4, weights, 2.0) == []
    assert choose_int4_layers([0.1, 0.5, 0.3], packed, int4, weights, 3.0) == [1]
    assert choose_int4_layers([0.1, 0.5, 0.3], packed, int4, weights, 4.5) == [1, 2]
    assert int4_bits(4, 64) == 4 * 64 * 5


def test_quick_binarize_keeps_n_of_m() -> None:
    w = torch.randn(8, 64)
    q = quick_binarize(w, 6, 8, 32)
    assert ((q != 0).reshape(8, 8, 8).sum(-1) == 6).all()


@pytest.mark.parametrize("value,fragment", [("1.0", "below"), ("-2", "budget"), ("40", "budget")])
def test_bad_budget(tiny_model_dir: Path, tmp_path: Path, value: str, fragment: str) -> None:
    result = CliRunner().invoke(
        compress_command,
        ["--model", str(tiny_model_dir), "--budget-bits", value, *FAST, "-o", str(tmp_path / "m.pt")],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and "Loading" not in line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "m.pt").exists()


def test_budget_from_keeps_layers_of_a_finished_model_in_int4(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    """bench/budget_from.py: a model compressed without the budget gets a decoder layer in int4 made from the
    FP weights (q/k/v biases moved to the dense state), honest bits recounted, the result loadable."""
    import subprocess
    import sys

    from test_lowmem import _qwen2_dir

    from pbs2p_edge.checkpoint import build_model, load_checkpoint, nbits_layers
    from pbs2p_edge.compress.budget import int4_entry
    from pbs2p_edge.compress.lowmem import LayerStore

    folder = _qwen2_dir(tmp_path, tiny_model_dir)
    plain = tmp_path / "plain.pt"
    args = ["--model", str(folder), "--text", str(corpus_text_file), "--nm", "6:8", "--no-budget"]
    result = CliRunner().invoke(compress_command, [*args, *FAST, "--recover-steps", "1", "-o", str(plain)])
    assert result.exit_code == 0, result.output
    script = Path(__file__).resolve().parents[1] / "bench" / "budget_from.py"
    base = [sys.executable, str(script), "--from", str(plain), "--model", str(folder), "--tokens", "256"]
    base += ["--ctx", "64", "--out-dir", str(tmp_path)]
    out = tmp_path / "int4.pt"
    done = subprocess.run([*base, "--layers", "1", "--save", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "budget-from.json").read_text())
    first, second = report["rows"]
    assert first["int4_layers"] == [] and second["int4_layers"] == [1]
    assert second["bits_per_weight"] > first["bits_per_weight"]

    before, after = load_checkpoint(plain), load_checkpoint(out)
    names = sorted(n for n in before["packed"] if n.startswith("model.layers.1."))
    assert len(names) == 7 and sorted(after["nbits"]) == names and not set(names) & set(after["packed"])
    fp = LayerStore(folder).tensors([f"{n}.weight" for n in names])
    for name in names:
        expected, _ = int4_entry(fp[f"{name}.weight"])
        for key, tensor in expected.items():
            assert torch.equal(after["nbits"][name][key], tensor), f"{name}.{key}"
        if int(before["packed"][name]["header"][7]) & 2:  # the bias flag
            bias = before["packed"][name]["bias"].float()
            assert torch.equal(after["dense_state"][f"{name}.bias"], bias), name
    assert sum(f"{n}.bias" in after["dense_state"] for n in names) == 3  # q, k, v
    results = after["compression"]["results"]
    stored = sum(t.numel() * t.element_size() for arrays in after["packed"].values() for t in arrays.values())
    stored += sum(e["packed"].numel() + 4 * e["scales"].numel() for e in after["nbits"].values())
    assert results["packed_bytes"] == stored and results["budget"]["int4_layers"] == [1]
    assert results["bits_per_weight"] == pytest.approx(8 * stored / results["compressed_weights"])
    model, _ = build_model(after)
    for name, q in nbits_layers(after).items():
        assert torch.equal(model.get_submodule(name).weight, torch.from_numpy(q.dequantize()))
    plan = str(tmp_path / "budget-from.json")
    for bad in (["--layers", "7"], ["--layers", "1", "--plan", plan], ["--layers", "1", "--ctx", "0"]):
        done = subprocess.run([*base, *bad], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr

"""Format version 2 end to end: a tiny compressed LLaMA whose packed layers carry column scales is exported with
the teacher-forced validation, its graph carries the 10-input v2 nodes, and it generates like PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_runtime import torch_greedy

from pbs2p_edge.format import PackedWeight, pack, unpack

VALIDATION_GATE_DB = 80.0


def _fast_checkpoint(root: Path, tiny_model_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from pbs2p_edge.checkpoint import read_tokenizer_files, save_checkpoint
    from pbs2p_edge.compress.pipeline import compress
    from pbs2p_edge.config import PBS2PConfig

    path = root / "model_v1_scales.pt"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = PBS2PConfig(calib_samples=4, calib_len=32, arb_iters=3, cfs=False)
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    compressed = compress(
        model, config, calib, tokenizer_files=read_tokenizer_files(tiny_model_dir), progress=False
    )
    save_checkpoint(compressed, path)
    return path


def _with_col_scales(src: Path, dst: Path) -> int:
    """Copy of checkpoint `src` whose every packed layer gets column scales c in [2^-0.5, 2^0.5] (fp16); the
    row/group scales are divided by the mean of c over each group so W_hat stays of comparable size."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    rng = np.random.default_rng(11)
    for name, arrays in ckpt["packed"].items():
        w = unpack(PackedWeight.from_arrays({key: t.numpy() for key, t in arrays.items()}))
        c = np.exp2(rng.uniform(-0.5, 0.5, w.k)).astype(np.float16).astype(np.float32)
        groups = np.arange(w.k) // w.group_size
        mean_c = np.bincount(groups, weights=c) / np.bincount(groups)
        w.alpha = (w.alpha / mean_c[None, :]).astype(np.float32)
        w.mu = (w.mu / mean_c[None, :]).astype(np.float32)
        if w.alpha2 is not None:
            w.alpha2 = (w.alpha2 / mean_c[None, :]).astype(np.float32)
        w.col_scales = c
        ckpt["packed"][name] = {k: torch.from_numpy(v.copy()) for k, v in pack(w).arrays.items()}
    torch.save(ckpt, dst)
    return len(ckpt["packed"])


def test_col_scales_export_validate_and_generate(tmp_path: Path, tiny_model_dir: Path) -> None:
    from pbs2p_edge.checkpoint import build_model, load_checkpoint, packed_layers
    from pbs2p_edge.export.bundle import export_bundle
    from pbs2p_edge.runtime import Generator

    plain = _fast_checkpoint(tmp_path, tiny_model_dir)
    scaled = tmp_path / "model_v2_col_scales.pt"
    layers = _with_col_scales(plain, scaled)
    packed = packed_layers(load_checkpoint(scaled))
    assert all(p.version == 2 and p.has_col_scales for p in packed.values()) and len(packed) == layers

    out = tmp_path / "bundle"
    # validation is on: export_bundle raises below the gate; the figures are checked here as well
    # one-block nodes; fp32 MatMulNBits compute for any int4 budget layer, so the greedy tokens below can be
    # compared with the float PyTorch model
    manifest = export_bundle(scaled, out, weights="pbs2p", head="fp32", graph="unfused", accuracy_level=0)
    forced = manifest["validation"]["teacher_forced"]
    assert forced["custom_layers"] == layers
    worst = min(forced["sqnr_db"], forced["ops_min_sqnr_db"], forced["wiring_min_sqnr_db"])
    assert worst >= VALIDATION_GATE_DB, forced

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "SparseBinaryMatMul"]
    assert len(nodes) == layers
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        assert len(node.input) == 10 and attrs["has_col_scales"] == 1

    model, _ = build_model(load_checkpoint(scaled))
    generator = Generator(out, threads=1)
    eos = list(generator.bundle.eos_token_ids)
    for prompt in ("The model of a small", "binary weights and sparse"):
        ids = generator.encode(prompt)
        assert generator.generate(ids, 24).token_ids == torch_greedy(model.eval(), ids, 24, eos), prompt


@pytest.mark.parametrize(("salient", "bias", "k"), [(0, False, 320), (2, True, 200)])
def test_pytorch_kernel_twin_applies_col_scales(salient: int, bias: bool, k: int) -> None:
    """The PyTorch twin used by export validation computes kernel_matmul's arithmetic with column scales."""
    from torch import nn

    from pbs2p_edge.export.patch import SparseBinaryLinear
    from pbs2p_edge.format import kernel_matmul, random_weight

    weight = random_weight(48, k, salient=salient, bias=bias, seed=3, col_scales=True)
    linear = nn.Linear(k, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight.dense()))
        if bias:
            linear.bias.copy_(torch.from_numpy(weight.bias.astype(np.float32)))
    module = SparseBinaryLinear(linear, pack(weight))
    assert module.attributes["has_col_scales"] == 1 and len(module.input_names) == 9
    module.arithmetic = "kernel"
    x = np.random.default_rng(0).standard_normal((2, 5, k)).astype(np.float32)
    with torch.no_grad():
        ours = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, kernel_matmul(x, pack(weight)), rtol=1e-5, atol=1e-6)

"""Low-memory compression (one decoder layer in RAM) gives exactly what compressing the loaded model gives."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG
from test_model_families import tiny_family_dir
from transformers import AutoConfig

from pbs2p_edge import memcheck, sources
from pbs2p_edge.checkpoint import checkpoint_dict, read_tokenizer_files
from pbs2p_edge.compress import compress
from pbs2p_edge.compress.lowmem import LayerStore, has_safetensors, skeleton_model
from pbs2p_edge.config import PBS2PConfig
from pbs2p_edge.errors import Pbs2pError


def _qwen2_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A tiny Qwen2 (q/k/v biases, untied head) saved in two safetensors shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "tiny_qwen2"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    settings = {**TINY_CONFIG, "vocab_size": vocab, "tie_word_embeddings": False, "use_sliding_window": False}
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **settings)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn(param.shape))
    model.save_pretrained(out, max_shard_size="300KB")
    return out


def _family_dir(family: str, tmp_path: Path, tiny_model_dir: Path) -> Path:
    if family == "llama":
        return tiny_model_dir
    if family == "qwen2":
        return _qwen2_dir(tmp_path, tiny_model_dir)
    # Gemma 3: sliding and global layers get different masks and rotary tables (per-layer keyword arguments)
    tiny_family_dir(tmp_path / family, tiny_model_dir, family)
    return tmp_path / family


@pytest.mark.parametrize("family, cfs", [("llama", False), ("qwen2", True), ("gemma3_text", True)])
def test_streaming_compression_is_bit_identical(
    family: str, cfs: bool, tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    folder = _family_dir(family, tmp_path, tiny_model_dir)
    if family == "qwen2":
        assert (folder / "model.safetensors.index.json").is_file()  # the sharded reader is exercised
    config = PBS2PConfig(
        n=6,
        m=8,
        calib_samples=4,
        calib_len=32,
        cfs=cfs,
        cfs_samples=4,
        batch_size=2,
        arb_iters=3,
        recover_steps=3,  # step-budgeted recovery is reproducible
        e2e_steps=0,  # the streaming path has no whole model for the end-to-end pass
        budget=False,  # test_streaming_bit_budget_is_bit_identical covers it
    )
    model, tokenizer = sources.load_model(folder)
    calib = sources.calibration_ids(tokenizer, 4, 32, 0, corpus_text_file)
    files = read_tokenizer_files(folder)
    full = compress(model, config, calib, tokenizer_files=files, progress=False)

    skeleton, store = skeleton_model(folder)
    low = compress(skeleton, config, calib, tokenizer_files=files, progress=False, store=store)
    # no decoder linear stays materialized once the loop is done
    assert all(p.is_meta for n, p in skeleton.model.layers.named_parameters() if "proj" in n)

    timing = ("seconds", "cfs_seconds", "layer_seconds", "layers")
    assert {k: v for k, v in full.results.items() if k not in (*timing, "recovery")} == {
        k: v for k, v in low.results.items() if k not in (*timing, "recovery")
    }  # bits per weight (all three countings), per-layer N, cosines
    # block-wise recovery ran the same steps to the same errors (only its wall seconds differ)
    untimed = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in m.results["recovery"]] for m in (full, low)
    ]
    assert untimed[0] == untimed[1] and all(r["steps"] == 3 for r in untimed[0])
    assert full.weights.keys() == low.weights.keys()
    name = next(iter(full.weights))
    np.testing.assert_array_equal(full.weights[name].mask, low.weights[name].mask)
    assert full.results["layer_cosine"] == low.results["layer_cosine"]
    assert full.results["layer_n"] == low.results["layer_n"]
    assert full.packed.keys() == low.packed.keys()
    for name in full.packed:
        for key, array in full.packed[name].arrays.items():
            np.testing.assert_array_equal(array, low.packed[name].arrays[key], err_msg=f"{name}.{key}")
    a, b = checkpoint_dict(full), checkpoint_dict(low)
    assert a["dense_state"].keys() == b["dense_state"].keys()
    for key, tensor in a["dense_state"].items():
        assert torch.equal(tensor, b["dense_state"][key]), key
    assert a["model_config"] == b["model_config"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_streaming_bit_budget_is_bit_identical(
    family: str, tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    """The bit budget on the layer-streaming path: the same sensitivities (probed one layer at a time), the
    same layers kept in int4 (their biases too), then an end-to-end pass over them, exactly as in memory."""
    from pbs2p_edge.compress.budget import layer_sensitivity, quick_binarize
    from pbs2p_edge.compress.pipeline import linear_names

    folder = _family_dir(family, tmp_path, tiny_model_dir)
    config = PBS2PConfig(
        n=6, m=8, calib_samples=4, calib_len=32, cfs=False, batch_size=2, arb_iters=3, recover_steps=2,
        e2e_steps=2, e2e_samples=4, e2e_lr=0.01, e2e_dtype="float32", budget_bits=4.2, budget_probe_len=24,
    )  # fmt: skip
    model, tokenizer = sources.load_model(folder)
    calib = sources.calibration_ids(tokenizer, 4, 32, 0, corpus_text_file)
    probe = calib[:2, :24]
    names = linear_names(model)
    whole = layer_sensitivity(model, probe, names, 6, 8, config.group_size)
    # layer 0's sensitivity, computed the plain way: the model's loss with only layer 0 quick-binarized
    loss = lambda: float(model(input_ids=probe, labels=probe).loss.detach())  # noqa: E731
    base = loss()
    saved = {n: model.model.layers[0].get_submodule(n).weight.data.clone() for n in names}
    for n, w in saved.items():
        model.model.layers[0].get_submodule(n).weight.data.copy_(quick_binarize(w, 6, 8, config.group_size))
    assert whole[0] == pytest.approx(loss() - base, rel=1e-4, abs=1e-6)
    for n, w in saved.items():
        model.model.layers[0].get_submodule(n).weight.data.copy_(w)
    skeleton, store = skeleton_model(folder)
    assert layer_sensitivity(skeleton, probe, names, 6, 8, config.group_size, store=store) == whole

    files = read_tokenizer_files(folder)
    full = compress(model, config, calib, tokenizer_files=files, progress=False)
    skeleton, store = skeleton_model(folder)
    low = compress(skeleton, config, calib, tokenizer_files=files, progress=False, store=store)
    assert full.results["budget"]["sensitivity"] == whole
    chosen = full.results["budget"]["int4_layers"]
    assert chosen and len(chosen) < len(whole)  # the tiny model's 2 layers: 1 kept in int4 at 4.2 bits
    untimed = [{k: v for k, v in m.results["budget"].items() if k != "probe_seconds"} for m in (full, low)]
    assert untimed[0] == untimed[1]
    e2e = [{k: v for k, v in m.results["e2e"].items() if k != "seconds"} for m in (full, low)]
    assert e2e[0] == e2e[1] and e2e[0]["steps"] == 2
    assert full.nbits.keys() == low.nbits.keys() and full.packed.keys() == low.packed.keys()
    for name, entry in full.nbits.items():
        for key, tensor in entry.items():
            assert torch.equal(tensor, low.nbits[name][key]), f"{name}.{key}"
    for name in full.packed:
        for key, array in full.packed[name].arrays.items():
            np.testing.assert_array_equal(array, low.packed[name].arrays[key], err_msg=f"{name}.{key}")
    a, b = checkpoint_dict(full), checkpoint_dict(low)
    assert a["dense_state"].keys() == b["dense_state"].keys()  # an int4 layer's q/k/v biases included
    for key, tensor in a["dense_state"].items():
        assert torch.equal(tensor, b["dense_state"][key]), key


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_streaming_end_to_end_pass_is_bit_identical(
    family: str, tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    """An explicit end-to-end pass on the layer-streaming path (teacher streamed layer by layer, pass run on
    the packed layers after the loop) tunes to exactly the in-memory path's packed arrays."""
    from pbs2p_edge.compress.lowmem import teacher_topk_streaming
    from pbs2p_edge.compress.recover import teacher_topk

    folder = _family_dir(family, tmp_path, tiny_model_dir)
    config = PBS2PConfig(
        n=6, m=8, calib_samples=4, calib_len=32, cfs=False, batch_size=2, arb_iters=3, recover_steps=2,
        e2e_steps=3, e2e_samples=6, e2e_lr=0.01, e2e_dtype="float32", budget=False,
    )  # fmt: skip
    model, tokenizer = sources.load_model(folder)
    calib = sources.calibration_ids(tokenizer, 4, 32, 0, corpus_text_file)
    e2e_ids = sources.calibration_ids(tokenizer, 6, 32, 0, corpus_text_file)
    skeleton, store = skeleton_model(folder)
    streamed = teacher_topk_streaming(skeleton, store, e2e_ids, 8, 2, progress=False)
    whole = teacher_topk(model, e2e_ids, 8, 2)
    assert torch.equal(streamed[0], whole[0]) and torch.equal(streamed[1], whole[1])
    # the bf16 teacher: the same per-layer calls, so the same targets
    skeleton, store = skeleton_model(folder)
    streamed = teacher_topk_streaming(skeleton, store, e2e_ids, 8, 2, progress=False, dtype="bfloat16")
    whole_bf16 = teacher_topk(model, e2e_ids, 8, 2, dtype="bfloat16")
    assert torch.equal(streamed[0], whole_bf16[0]) and torch.equal(streamed[1], whole_bf16[1])
    assert not torch.equal(whole_bf16[0], whole[0])  # autocast did reach the matmuls
    # close to the float32 targets: log-probs of the top token within bf16's rounding
    assert (whole_bf16[0][..., 0].float() - whole[0][..., 0].float()).abs().max() < 0.1

    files = read_tokenizer_files(folder)
    full = compress(model, config, calib, tokenizer_files=files, progress=False, e2e_ids=e2e_ids)
    skeleton, store = skeleton_model(folder)
    low = compress(
        skeleton, config, calib, tokenizer_files=files, progress=False, store=store, e2e_ids=e2e_ids
    )
    assert all(p.is_meta for n, p in skeleton.model.layers.named_parameters() if "proj" in n)
    untimed = [{k: v for k, v in m.results["e2e"].items() if k != "seconds"} for m in (full, low)]
    assert untimed[0] == untimed[1] and untimed[0]["steps"] == 3
    for name in full.packed:
        for key, array in full.packed[name].arrays.items():
            np.testing.assert_array_equal(array, low.packed[name].arrays[key], err_msg=f"{name}.{key}")
    assert untimed[0]["kept"] and untimed[0]["after"] < untimed[0]["before"]
    skeleton, store = skeleton_model(folder)
    no_e2e = PBS2PConfig(**{**config.to_dict(), "e2e_steps": 0})
    plain = compress(skeleton, no_e2e, calib, tokenizer_files=files, progress=False, store=store)
    assert any(  # the tuned scales reached the packed arrays
        not np.array_equal(plain.packed[n].arrays["scales"], low.packed[n].arrays["scales"])
        for n in low.packed
    )
    a, b = checkpoint_dict(full), checkpoint_dict(low)
    for key, tensor in a["dense_state"].items():  # the tuned RMSNorm weights too
        assert torch.equal(tensor, b["dense_state"][key]), key


def test_layer_store_refuses_a_folder_without_safetensors(tmp_path: Path) -> None:
    assert not has_safetensors(tmp_path)
    with pytest.raises(Pbs2pError, match="no safetensors"):
        LayerStore(tmp_path)


def test_memory_prediction_and_refusal(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model, _ = sources.load_model(tiny_model_dir)
    total, _layer = memcheck.config_params(config)
    assert total == sum(p.numel() for p in model.parameters())  # tied head counted once
    monkeypatch.setattr(memcheck, "available_bytes", lambda: 2 * memcheck.GIB)
    memcheck.require(memcheck.compress_bytes(config, 32, 256), "compressing tiny")
    with pytest.raises(Pbs2pError, match=r"needs about 3\.0 GiB of memory, 2\.0 GiB is available"):
        memcheck.require(3 * memcheck.GIB, "evaluating tiny")
    monkeypatch.setenv("PBS2P_EDGE_SKIP_MEMORY_CHECK", "1")
    memcheck.require(3 * memcheck.GIB, "evaluating tiny")


def test_low_memory_e2e_prediction_at_the_large_models_shapes() -> None:
    """Qwen2.5-Coder-1.5B's shapes: the end-to-end pass after the layer loop holds 7 bytes per compressed weight
    at its peak, about twice the layer loop's prediction."""
    qwen = AutoConfig.for_model(
        "qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    )  # fmt: skip
    total, layer = memcheck.config_params(qwen)
    assert 1.30e9 < 28 * layer < 1.33e9 and 1.5e9 < total < 1.6e9
    e2e = memcheck.lowmem_e2e_bytes(qwen, 2, 256)
    assert 12 * memcheck.GIB < e2e < 16 * memcheck.GIB
    assert e2e > 1.5 * memcheck.compress_bytes(qwen, 32, 256)


def test_qwen2_config_params_match_the_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = _qwen2_dir(tmp_path, tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder)
    total, _ = memcheck.config_params(model.config)
    assert total == sum(p.numel() for p in model.parameters())  # untied head, q/k/v biases


@pytest.mark.parametrize("salient, bias", [(0, False), (2, True)])
def test_export_modules_without_dense_copies_compute_the_same(salient: int, bias: bool) -> None:
    """SparseBinaryLinear with W_hat held, and with no dense weight (meta: decoded at 1 byte per weight), agree
    with W_hat (float) and with the kernels' numpy reference (`kernel_matmul`, kernel) to rounding."""
    from pbs2p_edge.export.patch import SparseBinaryLinear
    from pbs2p_edge.format import kernel_matmul, pack, random_weight

    w = random_weight(40, 320, n=6, m=8, group_size=64, salient=salient, bias=bias, seed=5)
    packed = pack(w)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(1))
    expected = kernel_matmul(x.numpy(), packed)
    linear = torch.nn.Linear(320, 40, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w.dense()))
        if bias:
            linear.bias.copy_(torch.from_numpy(w.bias))
    held = SparseBinaryLinear(linear, packed)
    linear.weight = torch.nn.Parameter(linear.weight.to("meta"), requires_grad=False)
    lazy = SparseBinaryLinear(linear, packed)
    for module in (held, lazy):
        module.arithmetic = "float"
        np.testing.assert_allclose(
            module(x).detach().numpy(),
            x.numpy() @ w.dense().T + (w.bias if bias else 0),
            rtol=1e-5,
            atol=1e-5,
        )
        module.arithmetic = "kernel"
        np.testing.assert_allclose(module(x).detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    decoded = held._weights()
    assert decoded.ternary.dtype == torch.int8 and decoded.ternary.numel() == 40 * 320
    if salient:
        assert decoded.cols.numel() == 2 * (320 // 64) and decoded.residual.shape == (
            40,
            decoded.cols.numel(),
        )


def test_cli_low_memory_path_spends_the_budget_and_runs_the_e2e_pass_where_it_fits(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer-streaming path (forced here; large models take it by size) compresses with the bit budget and
    runs the default end-to-end pass (the in-memory path's step count, windows each seen once) where its
    predicted memory is available. Where it is not, the default pass is skipped with the reason and an explicit
    one is refused in one line."""
    from click.testing import CliRunner

    from pbs2p_edge import config as config_module
    from pbs2p_edge.compress.cli import compress_command

    monkeypatch.setenv("PBS2P_EDGE_LOW_MEMORY", "1")
    monkeypatch.setattr(config_module, "E2E_STEPS", 3)  # the default pass, kept short
    base = ["--model", str(tiny_model_dir), "--text", str(corpus_text_file), "--nm", "6:8"]
    fast = ["--calib-samples", "4", "--calib-len", "32", "--no-progress", "--recover-steps", "2"]
    fast += ["--e2e-dtype", "float32"]
    out = tmp_path / "low.pt"
    result = CliRunner().invoke(compress_command, [*base, *fast, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "  bit budget 2.5 (pattern alone" in result.output and out.is_file()
    # without --e2e-samples the streamed teacher covers the windows the steps use (3 x 2), not 1024
    assert "end-to-end recovery: top-k KL" in result.output and "3 steps over 6 windows" in result.output
    stages = re.search(
        r"time: ([\d.]+) s \(decoder layers ([\d.]+) s, end-to-end pass ([\d.]+) s, the rest", result.output
    )
    assert stages and float(stages[1]) >= float(stages[2]) + float(stages[3]) > 0, result.output
    e2e = ["--e2e-steps", "2"]
    wide = [*e2e, "--e2e-samples", "6"]
    result = CliRunner().invoke(compress_command, [*base, *fast, *wide, "-o", str(tmp_path / "w.pt")])
    assert result.exit_code == 0 and "2 steps over 6 windows" in result.output, result.output
    result = CliRunner().invoke(
        compress_command, [*base, *fast, "--e2e-steps", "0", "-o", str(tmp_path / "z.pt")]
    )
    assert result.exit_code == 0 and "end-to-end recovery" not in result.output, result.output
    # at 1.5B the pass needs more than the layer loop (qwen-1.5b: about 14 GiB against 7); here it is made so
    layer_loop = memcheck.compress_bytes(AutoConfig.from_pretrained(tiny_model_dir), 4, 32)
    monkeypatch.setattr(memcheck, "lowmem_e2e_bytes", lambda *_: 2 * layer_loop)
    monkeypatch.setattr(memcheck, "available_bytes", lambda: int(1.5 * layer_loop))
    result = CliRunner().invoke(compress_command, [*base, *fast, *e2e, "-o", str(tmp_path / "f.pt")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "GiB of memory" in result.output and not (tmp_path / "f.pt").exists()
    result = CliRunner().invoke(compress_command, [*base, *fast, "-o", str(tmp_path / "g.pt")])
    assert result.exit_code == 0, result.output  # the layer loop alone fits; the default pass is skipped
    assert "end-to-end recovery skipped: it needs about" in result.output, result.output
    assert torch.load(tmp_path / "g.pt", weights_only=True)["compression"]["results"]["e2e"]["skipped"]


def test_sensitivity_script_plans_the_same_layers_streamed_or_not(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    """bench/sensitivity.py reports compress's plan (per-layer N, sensitivities, int4 layers) without
    compressing; the layer-streaming path gives the same plan; a bad pattern is one error line, exit 2."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "sensitivity.py"
    base = [sys.executable, str(script), "--model", str(tiny_model_dir), "--text", str(corpus_text_file)]
    base += ["--budget-bits", "4.2"]
    reports = []
    for low in ("0", "1"):
        out = tmp_path / f"plan-{low}"
        env = {**os.environ, "PBS2P_EDGE_LOW_MEMORY": low}
        done = subprocess.run(
            [*base, "--out", str(out)], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]
        reports.append(json.loads(out.with_name(out.name + ".json").read_text()))
        table = out.with_name(out.name + ".md").read_text()
        assert table.count("\n| ") == 1 + len(reports[-1]["layer_n"])  # header + one row per decoder layer
    assert [r["streamed"] for r in reports] == [False, True]
    plans = [(r["layer_n"], r["budget"]["sensitivity"], r["budget"]["int4_layers"]) for r in reports]
    assert plans[0] == plans[1] and len(plans[0][2]) == 1
    done = subprocess.run(
        [*base, "--nm", "9:8", "--out", str(tmp_path / "bad")], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error:"), (
        done.stderr
    )

"""Recovery (compress/recover.py): exact gradients, lower block error with frozen signs and mask, fp16
write-back that survives the checkpoint, and one-line errors for bad budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pbs2p_edge.compress.cli import compress_command
from pbs2p_edge.compress.recover import TunableLinear, recover_layer
from pbs2p_edge.format.random import random_weight

FAST = ["--calib-samples", "4", "--calib-len", "32", "--no-progress"]


def _explicit(w, alpha, mu, alpha2, cols):
    """W_hat by a plain differentiable formula (autograd reference for the custom backward)."""
    cg = torch.arange(w.k) // w.group_size
    sign = torch.where(torch.from_numpy(w.signs), 1.0, -1.0)
    mask = torch.from_numpy(w.mask).float()
    out = (alpha[:, cg] * sign + mu[:, cg]) * mask
    s2 = torch.where(torch.from_numpy(w.salient_signs).reshape(w.rows, -1), 1.0, -1.0)
    extra = torch.zeros_like(out)
    extra[:, cols] = alpha2[:, cg[cols]] * s2 * mask[:, cols]
    return out + extra


@pytest.mark.parametrize("col_scales", [False, True])
def test_tunable_linear_matches_dense_and_its_gradients_are_exact(col_scales: bool) -> None:
    w = random_weight(24, 320, salient=2, seed=3, col_scales=col_scales)
    lin = TunableLinear(w, None)
    assert torch.allclose(lin.weight(), torch.from_numpy(w.dense()), atol=1e-7)
    x = torch.randn(5, 320)
    target = torch.randn(5, 24)
    loss = (lin(x) - target).square().sum()
    loss.backward()
    cols = torch.from_numpy(np.asarray(w.salient_cols)).reshape(-1)
    ref = [(p.detach() * lin.ref).requires_grad_() for p in (lin.alpha, lin.mu, lin.alpha2)]
    w_ref = _explicit(w, *ref, cols)
    if col_scales:
        c = (lin.col_scales.detach() * lin.c_ref).requires_grad_()
        w_ref = w_ref * c[None, :]
    ref_loss = (x @ w_ref.T - target).square().sum()
    ref_loss.backward()
    for p, r in zip((lin.alpha, lin.mu, lin.alpha2), ref, strict=True):
        assert torch.allclose(p.grad, r.grad * lin.ref, rtol=1e-4, atol=1e-4)
    if col_scales:
        assert torch.allclose(lin.col_scales.grad, c.grad * lin.c_ref, rtol=1e-4, atol=1e-4)


def _tiny_compressed(tiny_model_dir: Path, corpus_text_file: Path):
    from pbs2p_edge import sources
    from pbs2p_edge.compress.pipeline import capture_layer_inputs, compress
    from pbs2p_edge.config import PBS2PConfig

    model, tokenizer = sources.load_model(str(tiny_model_dir))
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    # No recovery inside compress: the test starts from the post-training layer.
    config = PBS2PConfig(n=6, m=8, calib_samples=4, calib_len=32, salient=1, recover_steps=0)
    ids = sources.calibration_ids(tokenizer, 4, 32, 0, str(corpus_text_file))
    compressed = compress(model, config, ids, tokenizer_files={"x": "y"}, progress=False)
    return compressed, fp, ids, capture_layer_inputs


def test_recovery_lowers_block_error_and_keeps_signs_and_mask(
    tiny_model_dir: Path, corpus_text_file: Path
) -> None:
    import copy

    compressed, fp, ids, capture = _tiny_compressed(tiny_model_dir, corpus_text_file)
    model = compressed.model
    layer = model.model.layers[1]
    fp_layer = copy.deepcopy(layer)
    fp_layer.load_state_dict({k[len("model.layers.1.") :]: v for k, v in fp.items() if ".layers.1." in k})
    chunks = capture(model, ids, 2)
    with torch.no_grad():
        for lay in model.model.layers[:1]:
            chunks = [
                (lay(h, **kw)[0] if isinstance(lay(h, **kw), tuple) else lay(h, **kw), kw) for h, kw in chunks
            ]
        targets = [fp_layer(h, **kw) for h, kw in chunks]
        targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    names = [n for n in compressed.weights if n.startswith("model.layers.1.")]
    local = {n[len("model.layers.1.") :]: compressed.weights[n] for n in names}
    frozen = {n: (w.mask.copy(), w.signs.copy(), w.salient_signs.copy()) for n, w in local.items()}
    stats, _ = recover_layer(layer, local, chunks, targets, steps=40, lr=5e-3, micro_batch=1)
    assert stats["steps"] == 40 and stats["kept"] and not stats["capped"]
    assert stats["after"] < 0.9 * stats["before"]
    for name, w in local.items():
        mask, signs, signs2 = frozen[name]
        assert np.array_equal(w.mask, mask) and np.array_equal(w.signs, signs)
        assert np.array_equal(w.salient_signs, signs2)
        for values in (w.alpha, w.mu, w.alpha2):
            assert np.array_equal(values, values.astype(np.float16).astype(np.float32))
        assert torch.equal(layer.get_submodule(name).weight, torch.from_numpy(w.dense()))


def test_recovered_checkpoint_round_trips(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    from pbs2p_edge.checkpoint import build_model, load_checkpoint

    out = tmp_path / "model.pt"
    args = ["--model", str(tiny_model_dir), "--text", str(corpus_text_file), "--nm", "6:8"]
    result = CliRunner().invoke(
        compress_command, [*args, *FAST, "--recover-steps", "8", "--e2e-steps", "3", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "block recovery" in result.output and "end-to-end recovery" in result.output
    ckpt = load_checkpoint(out)
    rebuilt, _ = build_model(ckpt)
    results = ckpt["compression"]["results"]
    assert len(results["recovery"]) == 2 and results["e2e"]["steps"] == 3
    assert [r["steps"] for r in results["recovery"]] == [8, 8]
    # The stored scales are what the rebuilt model uses, and they are fp16 values.
    for name, arrays in ckpt["packed"].items():
        assert arrays["scales"].dtype == torch.float16
        assert torch.isfinite(rebuilt.get_submodule(name).weight).all()


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--recover-seconds", "0", "--recover-seconds"),
        ("--recover-seconds", "-5", "--recover-seconds"),
        ("--recover-seconds", "nan", "--recover-seconds"),
        ("--recover-steps", "0", "--recover-steps"),
        ("--recover-steps", "-3", "--recover-steps"),
        ("--recover-steps", "2000000", "--recover-steps"),
        ("--e2e-steps", "-1", "--e2e-steps"),
        ("--e2e-seconds", "-1", "--e2e-seconds"),
        ("--e2e-seconds", "0", "--e2e-seconds"),
        ("--e2e-seconds", "30 --e2e-steps 0", "--e2e-steps"),  # a cap does not turn the pass on
        ("--recover-seconds", "30 --no-recover", "--no-recover"),
        ("--e2e-samples", "0", "e2e samples"),
        ("--e2e-schedule", "linear", "--e2e-schedule"),
        ("--e2e-head", "int3", "--e2e-head"),
        ("--e2e-chat", "1.5", "--e2e-chat"),
        ("--e2e-chat", "-0.1", "--e2e-chat"),
        ("--e2e-chat", "nan", "--e2e-chat"),
        ("--e2e-dtype", "float16", "--e2e-dtype"),
        ("--e2e-teacher-dtype", "int8", "--e2e-teacher-dtype"),
    ],
)
def test_bad_recovery_options(
    tiny_model_dir: Path, tmp_path: Path, flag: str, value: str, fragment: str
) -> None:
    result = CliRunner().invoke(
        compress_command,
        ["--model", str(tiny_model_dir), flag, *value.split(), *FAST, "-o", str(tmp_path / "m.pt")],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.output


def test_fp_states_target_runs_and_is_recorded(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    from pbs2p_edge.checkpoint import load_checkpoint

    out = tmp_path / "model.pt"
    args = ["--model", str(tiny_model_dir), "--text", str(corpus_text_file), "--recover-target", "fp_states"]
    result = CliRunner().invoke(compress_command, [*args, *FAST, "--recover-steps", "5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert ckpt["compression"]["recover_target"] == "fp_states"
    assert all(r["after"] <= r["before"] for r in ckpt["compression"]["results"]["recovery"])


def test_same_command_twice_gives_bit_identical_packed_arrays(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    """Recovery is budgeted in steps, so a rerun reproduces the model exactly (block-wise and E2E on)."""
    from pbs2p_edge.checkpoint import load_checkpoint

    args = ["--model", str(tiny_model_dir), "--text", str(corpus_text_file), "--nm", "6:8", *FAST]
    args += ["--recover-steps", "6", "--e2e-steps", "4"]
    ckpts = []
    for name in ("a.pt", "b.pt"):
        result = CliRunner().invoke(compress_command, [*args, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        ckpts.append(load_checkpoint(tmp_path / name))
    a, b = ckpts
    assert a["compression"]["results"]["e2e"]["steps"] == 4
    assert set(a["packed"]) == set(b["packed"]) and a["packed"]
    for name, arrays in a["packed"].items():
        for key, tensor in arrays.items():
            assert torch.equal(tensor, b["packed"][name][key]), (name, key)
    for key, tensor in a["dense_state"].items():  # the tuned RMSNorm weights too
        assert torch.equal(tensor, b["dense_state"][key]), key


def test_default_step_budget_scales_down_for_larger_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from pbs2p_edge import config as config_module
    from pbs2p_edge.config import (
        E2E_MIN_STEPS,
        E2E_STEPS,
        RECOVER_FULL_WEIGHTS,
        RECOVER_STEPS_PER_LAYER,
        PBS2PConfig,
    )
    from pbs2p_edge.errors import Pbs2pError

    config = PBS2PConfig()
    assert config.recover_steps_for(1_000_000) == RECOVER_STEPS_PER_LAYER
    assert config.recover_steps_for(int(RECOVER_FULL_WEIGHTS)) == RECOVER_STEPS_PER_LAYER
    assert config.recover_steps_for(int(4 * RECOVER_FULL_WEIGHTS)) == round(RECOVER_STEPS_PER_LAYER / 4)
    assert config.recover_steps_for(int(1e15)) == 1
    assert PBS2PConfig(recover_steps=7).recover_steps_for(10**12) == 7
    assert PBS2PConfig(recover_seconds=0).recover_steps_for(10) == 0  # 0 s still means off
    assert PBS2PConfig(e2e_steps=5, e2e_seconds=0).e2e_steps_for(10) == 0
    assert PBS2PConfig(e2e_steps=5).e2e_steps_for(10**15) == 5
    assert config.e2e_steps_for(1000) == E2E_STEPS
    assert config.e2e_steps_for(int(1e15)) == min(E2E_STEPS, E2E_MIN_STEPS)
    with monkeypatch.context() as patch:  # the release's step count, not the suite's short one
        patch.setattr(config_module, "E2E_STEPS", 512)
        assert config.e2e_steps_for(int(RECOVER_FULL_WEIGHTS)) == 512
        assert config.e2e_steps_for(int(2 * RECOVER_FULL_WEIGHTS)) == 256
        assert config.e2e_steps_for(1_310_000_000) == E2E_MIN_STEPS == 128  # 1.5B: 41 scaled, floored
        assert PBS2PConfig(e2e_steps=5).e2e_steps_for(1_310_000_000) == 5  # an explicit count is kept
    bad_values = (
        {"recover_steps": 1.5},
        {"recover_steps": -1},
        {"e2e_steps": True},
        {"e2e_seconds": -2.0},
        {"e2e_samples": 0},
        {"e2e_schedule": "linear"},
        {"e2e_chat": 2.0},
        {"e2e_chat": True},
        {"e2e_dtype": "fp16"},
    )
    for bad in bad_values:
        with pytest.raises(Pbs2pError):
            PBS2PConfig(**bad)


def test_calibration_windows_keep_the_block_windows_whatever_the_e2e_count(
    tiny_model_dir: Path, corpus_text_file: Path
) -> None:
    from pbs2p_edge import sources
    from pbs2p_edge.compress.pipeline import calibration_windows
    from pbs2p_edge.config import PBS2PConfig

    tokenizer = sources.load_tokenizer(str(tiny_model_dir))
    alone = sources.calibration_ids(tokenizer, 4, 32, 3, str(corpus_text_file))
    for e2e_samples in (2, 4, 11):
        config = PBS2PConfig(calib_samples=4, calib_len=32, seed=3, e2e_samples=e2e_samples)
        block, e2e = calibration_windows(tokenizer, config, str(corpus_text_file))
        assert torch.equal(block, alone)
        assert e2e.shape == (e2e_samples, 32)
        assert torch.equal(e2e[: min(4, e2e_samples)], alone[:e2e_samples])


def test_chat_share_defaults_only_for_a_chat_template_and_the_builtin_corpus() -> None:
    from pbs2p_edge.config import E2E_CHAT, PBS2PConfig
    from pbs2p_edge.errors import Pbs2pError

    assert PBS2PConfig().e2e_chat_share(chat_template=True, builtin_corpus=True) == E2E_CHAT
    assert PBS2PConfig().e2e_chat_share(chat_template=True, builtin_corpus=False) == 0.0
    assert PBS2PConfig().e2e_chat_share(chat_template=False, builtin_corpus=True) == 0.0
    assert PBS2PConfig(e2e_chat=0.5).e2e_chat_share(chat_template=True, builtin_corpus=False) == 0.5
    assert PBS2PConfig(e2e_chat=0.0).e2e_chat_share(chat_template=False, builtin_corpus=True) == 0.0
    with pytest.raises(Pbs2pError, match="chat template"):
        PBS2PConfig(e2e_chat=0.5).e2e_chat_share(chat_template=False, builtin_corpus=True)


def test_chat_windows_follow_the_plain_ones_and_use_only_calibration_articles(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from pbs2p_edge import sources
    from pbs2p_edge.compress.pipeline import calibration_windows
    from pbs2p_edge.config import PBS2PConfig

    articles = {f"Topic{i}": {"extract": f"Topic{i} is a thing number {i} of the world."} for i in range(40)}
    evaluation = [t for t, a in articles.items() if sources.is_evaluation_text(a["extract"])]
    assert evaluation and len(evaluation) < len(articles)  # the fixture has both sides
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(articles), encoding="utf-8")
    monkeypatch.setattr(sources, "corpus_path", lambda: corpus)
    tokenizer = sources.load_tokenizer(str(tiny_model_dir))
    plain = PBS2PConfig(calib_samples=4, calib_len=48, seed=3, e2e_samples=12, e2e_chat=0.0)
    mixed = PBS2PConfig(calib_samples=4, calib_len=48, seed=3, e2e_samples=12, e2e_chat=0.25)
    block0, e2e0 = calibration_windows(tokenizer, plain, str(corpus_text_file))
    block1, e2e1 = calibration_windows(tokenizer, mixed, str(corpus_text_file))
    assert torch.equal(block0, block1) and e2e1.shape == (12, 48)
    assert torch.equal(
        e2e1[:9], e2e0[:9]
    )  # the plain share first: the keep-or-revert check sees block windows
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    chat_text = tokenizer.decode(e2e1[9:].flatten().tolist())
    assert all(start in window.tolist() for window in e2e1[9:]) and start not in e2e1[:9].flatten().tolist()
    assert "Topic" in chat_text
    assert not any(f"about {t}." in chat_text or f"is {t}?" in chat_text for t in evaluation)
    assert not any(articles[t]["extract"][:20] in chat_text for t in evaluation)


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_e2e_dtype_sets_the_steps_precision_but_not_the_check(
    tiny_model_dir: Path,
    corpus_text_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    dtype: str,
    expected: torch.dtype,
) -> None:
    from pbs2p_edge.compress import recover
    from pbs2p_edge.format import unpack

    compressed, _, ids, _ = _tiny_compressed(tiny_model_dir, corpus_text_file)
    teacher = recover.teacher_topk(compressed.model, ids, 8, 2)
    weights = {name: unpack(p) for name, p in compressed.packed.items()}
    seen: list[tuple[bool, torch.dtype]] = []
    original = recover._kl_topk

    def kl(logits, *args):
        seen.append((torch.is_grad_enabled(), logits.dtype))
        return original(logits, *args)

    monkeypatch.setattr(recover, "_kl_topk", kl)
    recover.recover_e2e(compressed.model, weights, ids, teacher, steps=3, lr=0.01, micro_batch=2, dtype=dtype)
    steps = [d for grad, d in seen if grad]
    checks = [d for grad, d in seen if not grad]
    assert steps == [expected] * 3
    assert checks and set(checks) == {torch.float32}
    with pytest.raises(ValueError, match="dtype"):
        recover.recover_e2e(
            compressed.model, weights, ids, teacher, steps=1, lr=0.01, micro_batch=2, dtype="fp16"
        )


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_e2e_schedule_sets_each_steps_learning_rate(
    tiny_model_dir: Path, corpus_text_file: Path, monkeypatch: pytest.MonkeyPatch, schedule: str
) -> None:
    import math

    from pbs2p_edge.compress.recover import recover_e2e, teacher_topk
    from pbs2p_edge.format import unpack

    compressed, _, ids, _ = _tiny_compressed(tiny_model_dir, corpus_text_file)
    fp_logits_source = compressed.model  # any fixed teacher works: the test watches the learning rates
    teacher = teacher_topk(fp_logits_source, ids, 8, 2)
    weights = {name: unpack(p) for name, p in compressed.packed.items()}
    seen: list[float] = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    stats = recover_e2e(
        compressed.model, weights, ids, teacher, steps=4, lr=0.01, micro_batch=2, schedule=schedule
    )
    assert stats["steps"] == 4
    expected = [
        0.01 * (0.5 * (1 + math.cos(math.pi * i / 4)) if schedule == "cosine" else 1.0) for i in range(4)
    ]
    assert seen == pytest.approx(expected)
    with pytest.raises(ValueError, match="schedule"):
        recover_e2e(compressed.model, weights, ids, teacher, steps=1, lr=0.01, micro_batch=2, schedule="step")


def test_deployed_head_swaps_in_the_bundles_int4_weights_and_restores_the_float_ones(
    tiny_model_dir: Path,
) -> None:
    from pbs2p_edge import sources
    from pbs2p_edge.compress.head import deployed_head
    from pbs2p_edge.export.head import make_head

    model, _ = sources.load_model(str(tiny_model_dir))
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    before = (embed.detach().clone(), head.detach().clone())
    embed_q, head_q = make_head(model, "int4").reference_weights()
    assert not torch.equal(embed_q, before[0])  # int4 changes the values, so the swap is visible
    with deployed_head(model, "int4"):
        assert torch.equal(model.get_input_embeddings().weight, embed_q)
        assert torch.equal(model.get_output_embeddings().weight, head_q)
    assert torch.equal(embed, before[0]) and torch.equal(head, before[1])
    with deployed_head(model, "float"):
        assert torch.equal(embed, before[0])
    with pytest.raises(ValueError, match="head"), deployed_head(model, "int3"):
        pass


def test_e2e_options_run_through_compress_and_keep_the_float_embedding(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import load_checkpoint

    out = tmp_path / "model.pt"
    args = ["--model", str(tiny_model_dir), "--text", str(corpus_text_file), *FAST, "--recover-steps", "2"]
    args += ["--e2e-steps", "3", "--e2e-samples", "6", "--e2e-schedule", "cosine", "--e2e-head", "int4"]
    args += ["--e2e-chat", "0.5", "--e2e-dtype", "bfloat16", "--e2e-teacher-dtype", "bfloat16"]
    result = CliRunner().invoke(compress_command, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    compression = ckpt["compression"]
    assert (compression["e2e_samples"], compression["e2e_schedule"], compression["e2e_head"]) == (
        6,
        "cosine",
        "int4",
    )
    assert compression["results"]["e2e"]["steps"] == 3
    assert (compression["results"]["e2e"]["windows"], compression["results"]["e2e"]["head"]) == (6, "int4")
    assert compression["e2e_chat"] == 0.5 and compression["results"]["e2e"]["chat_windows"] == 3
    assert compression["e2e_dtype"] == "bfloat16" and compression["results"]["e2e"]["dtype"] == "bfloat16"
    assert compression["e2e_teacher_dtype"] == compression["results"]["e2e"]["teacher_dtype"] == "bfloat16"
    assert "over 6 windows (3 chat-formatted), int4 head, bfloat16 steps, bfloat16 teacher)" in result.output
    fp, _ = sources.load_model(str(tiny_model_dir))
    name = next(k for k in ckpt["dense_state"] if k.endswith("embed_tokens.weight"))
    assert torch.equal(ckpt["dense_state"][name], fp.get_input_embeddings().weight.detach())


@pytest.mark.parametrize(
    "flags,expected",
    [
        ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n", "bfloat16"),
        ("flags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n", "bfloat16"),
        ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", "float32"),
        ("Features\t: fp asimd asimddp bf16 i8mm\n", "bfloat16"),
        ("Features\t: fp asimd evtstrm crc32 cpuid\n", "float32"),
        ("", "float32"),
    ],
)
def test_auto_e2e_dtype_follows_the_cpus_native_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, expected: str
) -> None:
    from pbs2p_edge import config, cpu
    from pbs2p_edge.config import PBS2PConfig

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\n" + flags)
    assert cpu.native_bf16(info) == (expected == "bfloat16")
    monkeypatch.setattr(config, "native_bf16", lambda: cpu.native_bf16(info))
    assert PBS2PConfig().e2e_dtype == expected
    assert PBS2PConfig(e2e_dtype="auto").e2e_dtype == expected
    assert PBS2PConfig(e2e_dtype="float32").e2e_dtype == "float32"  # an explicit choice is kept
    assert PBS2PConfig().e2e_teacher_dtype == expected
    assert PBS2PConfig(e2e_teacher_dtype="float32", e2e_dtype="bfloat16").e2e_teacher_dtype == "float32"
    assert not cpu.native_bf16(tmp_path / "missing")

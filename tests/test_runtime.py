"""The torch-free runtime on tiny random-weight bundles: greedy parity with PyTorch, sampling, chat, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli

from pbs2p_edge.errors import Pbs2pError

PROMPTS = ["the model runs on the edge", "binary weights and sparse masks"]
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def runtime_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, kind: str) -> Path:
    """Export (once per test session, shared by the runtime test modules) a tiny bundle of `kind`.

    fp32: the tiny model as it is. pbs2p: compressed with a fast setting, exported with an fp32 head so the
    PyTorch model from `checkpoint.build_model` computes the same function.
    """
    from pbs2p_edge.export.bundle import export_bundle

    root = tmp_path_factory.getbasetemp() / "runtime_bundles"
    out = root / kind
    if out.is_dir():
        return out
    if kind == "fp32":
        export_bundle(tiny_model_dir, out, weights="fp32")
    elif kind == "pbs2p":
        # validate=False: export validation is the exporter's test; the greedy comparison below is this one's.
        export_bundle(
            tiny_checkpoint(root, tiny_model_dir), out, weights="pbs2p", head="fp32", validate=False
        )
    else:
        raise ValueError(kind)
    return out


def tiny_checkpoint(root: Path, tiny_model_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from pbs2p_edge.checkpoint import read_tokenizer_files, save_checkpoint
    from pbs2p_edge.compress.pipeline import compress
    from pbs2p_edge.config import PBS2PConfig

    path = root / "model.pt"
    if path.is_file():
        return path
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = PBS2PConfig(calib_samples=4, calib_len=32, arb_iters=3, cfs=False)
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    compressed = compress(
        model, config, calib, tokenizer_files=read_tokenizer_files(tiny_model_dir), progress=False
    )
    save_checkpoint(compressed, path)
    return path


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return runtime_bundle(tmp_path_factory, tiny_model_dir, "fp32")


@pytest.fixture(scope="module")
def pbs2p_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return runtime_bundle(tmp_path_factory, tiny_model_dir, "pbs2p")


@pytest.fixture(scope="module")
def fp32_generator(fp32_bundle: Path):
    from pbs2p_edge.runtime import Generator

    return Generator(fp32_bundle, threads=1)


def torch_greedy(
    model, ids: list[int], max_new_tokens: int, eos: list[int], penalty: float = 1.0
) -> list[int]:
    """Hugging Face greedy decoding, new tokens only, without the final EOS (the runtime does not emit it)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=penalty,
            eos_token_id=eos,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
    return out[:-1] if out and out[-1] in eos else out


@pytest.mark.parametrize("penalty", [1.0, 20.0])  # a strong penalty makes the random model's greedy path vary
def test_greedy_matches_pytorch_fp32(fp32_generator, tiny_model_dir: Path, penalty: float) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eos = list(fp32_generator.bundle.eos_token_ids)
    for prompt in PROMPTS:
        ids = fp32_generator.encode(prompt)
        result = fp32_generator.generate(ids, 40, repetition_penalty=penalty)
        assert result.token_ids == torch_greedy(model, ids, 40, eos, penalty), prompt
        assert result.stop_reason in ("eos", "max_new_tokens")


def test_greedy_matches_pytorch_pbs2p(pbs2p_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from pbs2p_edge.checkpoint import build_model, load_checkpoint
    from pbs2p_edge.runtime import Generator

    generator = Generator(pbs2p_bundle, threads=1)
    assert generator.bundle.weights == "pbs2p" and generator.bundle.ops_library is not None
    model, _ = build_model(load_checkpoint(tmp_path_factory.getbasetemp() / "runtime_bundles" / "model.pt"))
    eos = list(generator.bundle.eos_token_ids)
    for prompt in PROMPTS:
        ids = generator.encode(prompt)
        assert generator.generate(ids, 32).token_ids == torch_greedy(model.eval(), ids, 32, eos), prompt


def test_prefill_then_decode_equals_one_long_prefill(fp32_generator) -> None:
    """The KV-cache path (OrtValues fed back as past) gives the logits a full recomputation gives."""
    session = fp32_generator.session
    ids = fp32_generator.encode(PROMPTS[0] + " " + PROMPTS[1])
    session.reset()
    full = session.forward(ids, all_logits=True)
    session.reset()
    steps = [session.forward(ids[:5])] + [session.forward([token]) for token in ids[5:]]
    np.testing.assert_allclose(np.stack(steps), full[4:], atol=1e-4)
    assert session.past_len == len(ids)
    per_token = fp32_generator.bundle.kv_bytes_per_token()
    if session.fused:  # fixed-length buffers, whole KV_BUFFER_STEP multiples, long enough for the sequence
        from pbs2p_edge.runtime.session import KV_BUFFER_STEP

        assert session.kv_cache_bytes() >= len(ids) * per_token
        assert session.kv_cache_bytes() % (KV_BUFFER_STEP * per_token) == 0
    else:
        assert session.kv_cache_bytes() == len(ids) * per_token


def test_chunked_prefill_gives_the_same_logits(fp32_bundle: Path, fp32_generator) -> None:
    from pbs2p_edge.runtime.session import DecoderSession

    chunked = DecoderSession(fp32_generator.bundle, threads=1, prefill_chunk=3)
    ids = fp32_generator.encode(PROMPTS[0] + " " + PROMPTS[1])
    fp32_generator.session.reset()
    whole = fp32_generator.session.prefill(ids)
    np.testing.assert_allclose(chunked.prefill(ids), whole, atol=1e-4)
    assert chunked.past_len == len(ids)
    with pytest.raises(Pbs2pError, match="prefill chunk"):
        DecoderSession(fp32_generator.bundle, prefill_chunk=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT and /proc are Linux")
def test_repacked_initializer_pages_are_released(fp32_generator) -> None:
    """onnxruntime maps external data; releasing those pages keeps results identical (they fault back in)."""
    from pbs2p_edge.runtime.memory import file_mappings, release_file_pages

    data = fp32_generator.bundle.model_path.with_name("model.onnx.data")
    ids = fp32_generator.encode(PROMPTS[0])
    fp32_generator.session.reset()
    before = fp32_generator.session.prefill(ids)
    assert release_file_pages(data) > 0
    fp32_generator.session.reset()
    np.testing.assert_array_equal(fp32_generator.session.prefill(ids), before)
    # ... and marked random-access (smaps VmFlags "rr"): a gathered row faults in one page, not a read-ahead
    flags = [mapping["VmFlags"].split() for mapping in file_mappings(data)]
    assert flags and all("rr" in f for f in flags)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise and /proc/self/fd are Linux")
def test_released_file_pages_leave_the_page_cache(fp32_generator, monkeypatch) -> None:
    """Cached large folios would fault back whole: the file's cache is dropped once its mappings are paged out."""
    from pbs2p_edge.runtime import memory

    data = fp32_generator.bundle.model_path.with_name("model.onnx.data")
    advised: list[tuple[str, int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(memory.os, "posix_fadvise", record)
    assert memory.release_file_pages(data) > 0
    assert advised == [(str(data.resolve()), 0, 0, os.POSIX_FADV_DONTNEED)]
    advised.clear()
    assert memory.release_file_pages(data.with_name("not-mapped.data")) == 0
    assert advised == []  # nothing of ours mapped it: leave other processes' cache alone
    ids = fp32_generator.encode(PROMPTS[0])
    fp32_generator.session.reset()
    assert np.isfinite(fp32_generator.session.prefill(ids)).all()


def test_session_collapses_what_its_load_added(fp32_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pbs2p_edge.runtime import session as session_module
    from pbs2p_edge.runtime.bundle import load_bundle

    calls: list[set[int]] = []
    monkeypatch.setattr(
        session_module, "collapse_to_huge_pages", lambda exclude: calls.append(exclude) or 4096
    )
    monkeypatch.setattr(session_module, "resident_huge_blocks", lambda: {1 << 21})
    bundle = load_bundle(fp32_bundle)
    monkeypatch.delenv(session_module.HUGE_PAGES_ENV, raising=False)
    assert session_module.DecoderSession(bundle).huge_page_bytes == 0 and calls == []  # off by default
    assert session_module.DecoderSession(bundle, huge_pages=True).huge_page_bytes == 4096
    assert calls == [{1 << 21}]  # what was resident before the load is left alone
    monkeypatch.setenv(session_module.HUGE_PAGES_ENV, "1")
    assert session_module.DecoderSession(bundle).huge_page_bytes == 4096
    assert len(calls) == 2
    monkeypatch.setenv(session_module.HUGE_PAGES_ENV, "yes")
    with pytest.raises(Pbs2pError, match="PBS2P_EDGE_HUGE_PAGES must be 0 or 1"):
        session_module.DecoderSession(bundle)


def test_huge_pages_bench_runs_both_variants(fp32_bundle: Path, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "bench" / "huge_pages.py"
    out = tmp_path / "huge"
    args = [sys.executable, str(script), str(fp32_bundle), "--reps", "2", "--pp", "4", "--tg", "4"]
    done = subprocess.run([*args, "--threads", "1", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    (result,) = report["results"]
    on, off = result["rows"]
    assert (on["variant"], off["variant"]) == ("huge pages", "4 KiB pages")
    assert off["huge_page_bytes"] == 0 and on["huge_page_bytes"] >= 0
    assert len(on["tg_tokens_per_second"]) == 2 and len(result["first_over_second"]["pp"]) == 2
    assert "| huge pages |" in out.with_suffix(".md").read_text()
    assert set(report["variants"]) == {"huge pages", "4 KiB pages"}  # what each variant ran with, recorded
    assert "Variants: huge pages: env={'PBS2P_EDGE_HUGE_PAGES': '1'}" in out.with_suffix(".md").read_text()
    bad = subprocess.run([*args[:2], str(tmp_path), "--reps", "1"], capture_output=True, text=True)
    assert (
        bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path} is not a bundle (no manifest.json)"
    )


def test_sampling_is_reproducible_with_a_seed(fp32_generator) -> None:
    options = dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    first = fp32_generator.generate(PROMPTS[0], 24, seed=7, **options)
    again = fp32_generator.generate(PROMPTS[0], 24, seed=7, **options)
    other = fp32_generator.generate(PROMPTS[0], 24, seed=8, **options)
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.token_ids != other.token_ids  # a near-uniform random model: 24 draws never all coincide
    assert len(set(first.token_ids)) > 1


def test_stream_pieces_make_the_text(fp32_generator) -> None:
    generation = fp32_generator.start(PROMPTS[1], 30, temperature=0.8, seed=1)
    pieces = list(generation)
    assert "".join(pieces) == generation.result.text
    assert generation.result.text == fp32_generator.tokenizer.decode(generation.result.token_ids)
    assert len(generation.result.token_ids) <= 30


def test_generation_stops_at_the_context(fp32_generator) -> None:
    context = fp32_generator.context_length
    ids = fp32_generator.encode(PROMPTS[0])
    result = fp32_generator.generate(ids, context, temperature=1.0, seed=0)
    if result.stop_reason != "eos":
        assert result.stop_reason == "context"
        assert len(ids) + len(result.token_ids) == context
    with pytest.raises(Pbs2pError, match="context"):
        fp32_generator.encode("word " * context)


def test_chat_template_native_chatml_equals_jinja() -> None:
    from pbs2p_edge.runtime.text import ChatTemplate

    template = ChatTemplate(SMOLLM2_TEMPLATE, {"eos_token": "<|im_end|>"})
    assert template.is_chatml
    assert template.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for system in (None, "Be brief."):
        native = template.render("What is 2+2?", system)
        assert native == template.render_jinja(
            ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": "What is 2+2?"}]
        )
    assert template.render("hi").endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_prompt_uses_the_bundle_template(fp32_generator) -> None:
    ids = fp32_generator.encode("hello", chat=True)
    text = fp32_generator.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user") and text.endswith("<|im_start|>assistant\n")
    assert fp32_generator.tokenizer.token_to_id("<|im_end|>") in fp32_generator.stop_ids(chat=True)


def test_sampling_filters() -> None:
    from pbs2p_edge.runtime.sampling import (
        Sampler,
        SamplingConfig,
        apply_repetition_penalty,
        filtered_probabilities,
    )

    logits = np.array([1.0, 3.0, 2.0, -1.0, 0.5], dtype=np.float32)
    assert Sampler(SamplingConfig()).choose(logits) == 1
    assert all(
        Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=s)).choose(logits) == 1 for s in range(5)
    )
    assert all(
        Sampler(SamplingConfig(temperature=5.0, top_p=0.01, seed=s)).choose(logits) == 1 for s in range(5)
    )
    probs = filtered_probabilities(logits, SamplingConfig(temperature=1.0, top_k=3))
    assert probs[[3, 4]].sum() == 0 and (probs[[0, 1, 2]] > 0).all() and probs.sum() == pytest.approx(1.0)
    penalized = apply_repetition_penalty(logits, [1, 3], 2.0)
    assert penalized[1] == 1.5 and penalized[3] == -2.0 and penalized[0] == 1.0
    draws = [Sampler(SamplingConfig(temperature=1.0, seed=s)).choose(logits) for s in range(400)]
    counts = np.bincount(draws, minlength=5) / 400
    expected = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(counts - expected).max() < 0.08


@pytest.mark.parametrize(
    "options",
    [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0)],
)
def test_bad_sampling_options(fp32_generator, options: dict) -> None:
    with pytest.raises(Pbs2pError):
        fp32_generator.generate(PROMPTS[0], 4, **options)


def test_bundle_errors(fp32_bundle: Path, tmp_path: Path) -> None:
    from pbs2p_edge.runtime.bundle import load_bundle

    with pytest.raises(Pbs2pError, match="does not exist"):
        load_bundle(tmp_path / "missing")
    with pytest.raises(Pbs2pError, match="no manifest.json"):
        load_bundle(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(Pbs2pError, match="version 99"):
        load_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(Pbs2pError, match="not a pbs2p-edge bundle"):
        load_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "ops_library": "/usr/lib/libfoo.so"}))
    with pytest.raises(Pbs2pError, match="absolute path"):
        load_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "ops_library": "../libfoo.so"}))
    with pytest.raises(Pbs2pError, match="escapes the bundle"):
        load_bundle(copy)


def test_ops_library_for_another_cpu_is_refused(fp32_bundle: Path, tmp_path: Path) -> None:
    import platform

    from pbs2p_edge.runtime.bundle import load_bundle

    other = 0xB7 if platform.machine().lower() in ("x86_64", "amd64") else 0x3E  # aarch64 or x86-64
    header = b"\x7fELF\x02\x01\x01" + bytes(11) + other.to_bytes(2, "little") + bytes(44)
    (tmp_path / "libpbs2p_edge_ops.so").write_bytes(header)
    with pytest.raises(Pbs2pError, match="is built for"):
        load_bundle(fp32_bundle, ops_library=tmp_path / "libpbs2p_edge_ops.so")


def test_manifest_layers_must_match_the_graph(fp32_bundle: Path, tmp_path: Path) -> None:
    from pbs2p_edge.runtime import Generator

    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "num_layers": manifest["num_layers"] + 1}))
    with pytest.raises(Pbs2pError, match="does not match its manifest"):
        Generator(copy)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_generate_streams_text(fp32_bundle: Path, fp32_generator) -> None:
    result = run_cli("generate", fp32_bundle, "--prompt", PROMPTS[0], "-n", "12", "--threads", "1", "--stats")
    assert result.returncode == 0, result.stderr
    expected = fp32_generator.generate(PROMPTS[0], 12)
    assert result.stdout == expected.text + "\n"
    assert f"{len(expected.token_ids)} generated" in result.stderr
    chat = run_cli(
        "generate", fp32_bundle, "-p", "hi", "--chat", "-n", "5", "--temperature", "0.7", "--seed", "3"
    )
    assert chat.returncode == 0, chat.stderr


def test_cli_generate_reads_stdin(fp32_bundle: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pbs2p_edge.cli", "generate", str(fp32_bundle), "-p", "-", "-n", "3"],
        input=PROMPTS[0].encode(),
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt", ""], "empty"),
        (["--prompt", "   "], "empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--prompt", "word " * 400], "context"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--threads", "0"], "threads"),
    ],
)
def test_cli_generate_bad_input(fp32_bundle: Path, args: list[str], needle: str) -> None:
    assert_one_line_error(run_cli("generate", fp32_bundle, *args), needle)


def test_cli_generate_bad_bundles(fp32_bundle: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("generate", tmp_path / "missing", "-p", "hi"), "does not exist")
    assert_one_line_error(run_cli("generate", tmp_path, "-p", "hi"), "not a pbs2p-edge bundle")
    fake = tmp_path / "libpbs2p_edge_ops.so"
    assert_one_line_error(run_cli("generate", fp32_bundle, "-p", "hi", "--ops-library", fake), "no such file")
    fake.write_bytes(b"not a shared library")
    result = run_cli("generate", fp32_bundle, "-p", "hi", "--ops-library", fake)
    assert_one_line_error(result, "cannot load the ops library")


def test_cli_generate_rejects_non_utf8(fp32_bundle: Path) -> None:
    argv = subprocess.run(
        [sys.executable, "-m", "pbs2p_edge.cli", "generate", str(fp32_bundle), "--prompt", b"caf\xe9"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(argv, "UTF-8")
    stdin = subprocess.run(
        [sys.executable, "-m", "pbs2p_edge.cli", "generate", str(fp32_bundle), "--prompt", "-"],
        input=b"caf\xe9",
        capture_output=True,
        timeout=300,
    )
    assert stdin.returncode == 2 and b"UTF-8" in stdin.stderr and b"Traceback" not in stdin.stderr


def test_cli_ctrl_c_prints_what_was_generated(fp32_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C mid-generation: the streamed text stays, a newline ends it, exit code 130."""
    from click.testing import CliRunner

    from pbs2p_edge.runtime import cli as runtime_cli
    from pbs2p_edge.runtime.generate import Generation

    original = Generation._run

    def interrupted_run(self, *args, **kwargs):
        for index, piece in enumerate(original(self, *args, **kwargs)):
            if index == 3:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(Generation, "_run", interrupted_run)
    result = CliRunner().invoke(
        runtime_cli.generate_command,
        [
            str(fp32_bundle),
            "-p",
            PROMPTS[0],
            "-n",
            "50",
            "--temperature",
            "1",
            "--seed",
            "0",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 130
    assert result.stdout.endswith("\n") and len(result.stdout.strip()) > 0
    assert "interrupted after" in result.stderr

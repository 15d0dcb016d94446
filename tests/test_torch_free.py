"""The runtime imports and generates in a process where torch, transformers and onnx cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtime import PROMPTS, runtime_bundle

# Setting a sys.modules entry to None makes every later `import torch` raise ImportError, as on a device
# where the package is not installed.
BLOCK_TORCH = """
import sys
for name in ("torch", "transformers", "onnx", "onnxscript", "accelerate", "safetensors", "gguf"):
    sys.modules[name] = None
"""

GENERATE = """
import importlib, json, pkgutil
import pbs2p_edge.runtime as runtime
for module in pkgutil.iter_modules(runtime.__path__):
    importlib.import_module(f"pbs2p_edge.runtime.{module.name}")
from pbs2p_edge.runtime import Generator
from pbs2p_edge.runtime.bench_worker import Worker
out = {}
for bundle in sys.argv[1:]:
    generator = Generator(bundle, threads=1)
    greedy = generator.generate(PROMPT, 16)
    sampled = generator.generate(PROMPT, 16, temperature=0.9, top_k=40, top_p=0.9, seed=5)
    worker = Worker(bundle, 1, None)
    worker.pp(8, 0)
    worker.tg(4, 0)
    out[bundle] = {"greedy": greedy.token_ids, "sampled": sampled.token_ids, "text": greedy.text}
print(json.dumps(out))
"""

RUN_CLI = (
    "import runpy\nsys.argv = ['pbs2p-edge', *sys.argv[1:]]\n"
    "runpy.run_module('pbs2p_edge.cli', run_name='__main__')"
)


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code, *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[Path]:
    return [runtime_bundle(tmp_path_factory, tiny_model_dir, kind) for kind in ("fp32", "pbs2p")]


def test_blocking_works() -> None:
    result = run_blocked("import torch")
    assert result.returncode != 0 and "import of torch halted" in result.stderr


def test_generate_without_torch(bundles: list[Path]) -> None:
    from pbs2p_edge.runtime import Generator

    result = run_blocked(f"PROMPT = {PROMPTS[0]!r}\n" + GENERATE, *map(str, bundles))
    assert result.returncode == 0, result.stderr
    produced = json.loads(result.stdout)
    for bundle in bundles:
        generator = Generator(bundle, threads=1)  # the same code with torch importable: same tokens
        got = produced[str(bundle)]
        assert got["greedy"] == generator.generate(PROMPTS[0], 16).token_ids
        sampled = generator.generate(PROMPTS[0], 16, temperature=0.9, top_k=40, top_p=0.9, seed=5)
        assert got["sampled"] == sampled.token_ids
        assert len(got["greedy"]) > 0


def test_cli_without_torch(bundles: list[Path]) -> None:
    for bundle in bundles:
        result = run_blocked(
            RUN_CLI, "generate", str(bundle), "-p", PROMPTS[1], "-n", "6", "--chat", "--threads", "1"
        )
        assert result.returncode == 0, result.stderr
    missing = run_blocked(RUN_CLI, "generate", str(bundles[0].parent / "nowhere"), "-p", "hi")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_eval_bundle_without_torch(bundles: list[Path], corpus_text_file: Path) -> None:
    """`pbs2p-edge eval BUNDLE` runs torch-free and gives what the same scorer gives with torch importable."""
    from pbs2p_edge import sources
    from pbs2p_edge.runtime.perplexity import BundleScorer

    options = ["--text", str(corpus_text_file), "--ctx", "32", "--tokens", "128", "--threads", "1"]
    for bundle, kind in zip(bundles, ("fp32", "pbs2p"), strict=True):
        result = run_blocked(RUN_CLI, "eval", str(bundle), *options, "--json", "--no-progress")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["kind"] == kind and data["windows"] == 4 and data["predicted_tokens"] == 4 * 31
        scorer = BundleScorer(bundle, threads=1)
        ids = sources.evaluation_token_list(scorer.encode, 128, corpus_text_file)
        assert data["ppl"] == pytest.approx(scorer.perplexity(ids, ctx=32, progress=False)["ppl"], rel=1e-6)

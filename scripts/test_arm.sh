#!/usr/bin/env bash
# `make test-arm`: the runtime end to end on arm64 (Raspberry Pi 4/5 class), under qemu-user.
#  1. an arm64 Debian trixie rootfs (scripts/arm_rootfs.sh; cached in .cache/arm-rootfs);
#  2. `pip install` of this checkout inside it: builds libpbs2p_edge_ops.so natively for aarch64 (sdot + NEON)
#     against Debian's libonnxruntime-dev headers, with the onnxruntime aarch64 wheel;
#  3. two PBS2P bundles exported on x86 (cached in .cache/arm-test): a tiny random one, and the default model
#     compressed with a small calibration (16 x 128 tokens, 5 ARB iterations: a quick compression, not the
#     demo's; the kernels and graph are the same);
#  4. greedy tokens on x86 and on arm64 compared (scripts/arm_greedy.py), `pbs2p-edge generate` text compared,
#     and `pbs2p-edge verify` + `pbs2p-edge bench` run on arm64. Times under emulation are not figures.
# Writes bench/results/arm.md (or $ARM_RESULTS). Exit status non-zero if anything fails or tokens differ.
# Env: ARM_ROOTFS, ARM_CACHE (default .cache/arm-test), ARM_REEXPORT=1 to re-export the cached bundles,
#      ARM_DEFAULT=0 to run the tiny bundle only (no compression of the default model; the report says so).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
root="${ARM_ROOTFS:-$repo/.cache/arm-rootfs}"
cache="${ARM_CACHE:-$repo/.cache/arm-test}"
results="${ARM_RESULTS:-$repo/bench/results/arm.md}"
py="$repo/.venv/bin/python"
prompt="What is the capital of France?"
tokens=32
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*" >&2; }

ORT_VERSION="$("$py" -c 'import onnxruntime; print(onnxruntime.__version__)')" bash scripts/arm_rootfs.sh

in_arm() { bash scripts/arm_run.sh "$root" "$cache" "$@"; }  # chroot + qemu-user, bundles at /bundles

step "copy the checkout (tracked + untracked, not ignored) into the rootfs at /src; keep its build/ cache"
mkdir -p "$root/src"
find "$root/src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$root/src"

step "pip install the runtime inside the rootfs (native aarch64 build of the ops library; slow under qemu)"
in_arm python3 -m pip install -q --no-build-isolation /src >"$cache.pip.log" 2>&1 || { tail -n 40 "$cache.pip.log"; exit 1; }
in_arm python3 -c 'from pbs2p_edge import ops; p = ops.library_path(); print(p, ops.library_info(p).describe())'

mkdir -p "$cache"
if [[ ! -f "$cache/tiny/manifest.json" || "${ARM_REEXPORT:-0}" == 1 ]]; then
  step "export the tiny PBS2P bundle on x86"
  nice -n 10 "$py" scripts/make_tiny_bundle.py "$cache/tiny"
fi
default="${ARM_DEFAULT:-1}"
if [[ $default == 1 && ( ! -f "$cache/pbs2p/manifest.json" || "${ARM_REEXPORT:-0}" == 1 ) ]]; then
  step "compress the default model (small calibration) and export it on x86"
  if [[ ! -f "$cache/model.pt" || "${ARM_REEXPORT:-0}" == 1 ]]; then
    nice -n 10 .venv/bin/pbs2p-edge compress --nm 6:8 --calib-samples 16 --calib-len 128 --arb-iters 5 \
      -o "$cache/model.pt" --force --no-progress
  fi
  nice -n 10 .venv/bin/pbs2p-edge export "$cache/model.pt" -o "$cache/pbs2p" --format pbs2p --force
fi

step "greedy tokens on x86"
"$py" scripts/arm_greedy.py "$cache/tiny" --prompt "$prompt" -n $tokens --out "$cache/x86-tiny.json"
PBS2P_KERNEL=generic "$py" scripts/arm_greedy.py "$cache/tiny" --prompt "$prompt" -n $tokens \
  --out "$cache/x86-generic.json"
if [[ $default == 1 ]]; then
  "$py" scripts/arm_greedy.py "$cache/pbs2p" --prompt "$prompt" -n $tokens --penalties 1.0 \
    --out "$cache/x86-pbs2p.json"
  .venv/bin/pbs2p-edge generate "$cache/pbs2p" --prompt "$prompt" -n $tokens >"$cache/x86.txt"
fi

step "arm64: pbs2p-edge verify, greedy tokens, pbs2p-edge generate"
in_arm pbs2p-edge verify /bundles/tiny
in_arm python3 scripts/arm_greedy.py /bundles/tiny --prompt "$prompt" -n $tokens --out /bundles/arm-tiny.json
if [[ $default == 1 ]]; then
  in_arm pbs2p-edge verify /bundles/pbs2p
  in_arm python3 scripts/arm_greedy.py /bundles/pbs2p --prompt "$prompt" -n $tokens --penalties 1.0 \
    --out /bundles/arm-pbs2p.json
  in_arm pbs2p-edge generate /bundles/pbs2p --prompt "$prompt" -n $tokens >"$cache/arm.txt"
fi
in_arm PBS2P_KERNEL=generic python3 scripts/arm_greedy.py /bundles/tiny --prompt "$prompt" -n $tokens \
  --out /bundles/arm-generic.json
# the default path under qemu's `max` CPU is sdot+neon (dot product); neon alone is what a Pi 4 runs
in_arm PBS2P_KERNEL=neon python3 scripts/arm_greedy.py /bundles/tiny --prompt "$prompt" -n $tokens \
  --out /bundles/arm-neon.json

if [[ $default == 1 ]]; then
  step "node by node: every node output of one prefill on x86 and arm64; the custom nodes replayed on x86's inputs"
  nice -n 10 "$py" scripts/arm_nodes.py instrument "$cache/pbs2p" "$cache/nodes"
  "$py" scripts/arm_nodes.py run "$cache/nodes" --out "$cache/nodes/x86.npz"
  in_arm python3 scripts/arm_nodes.py run /bundles/nodes --out /bundles/nodes/arm.npz --replay /bundles/nodes/x86.npz
fi

step "arm64: pbs2p-edge bench (emulated: the times are not figures)"
bench_bundles=(/bundles/tiny)
[[ $default == 1 ]] && bench_bundles+=(/bundles/pbs2p)
in_arm pbs2p-edge bench "${bench_bundles[@]}" --pp 8 --tg 8 --reps 1 --warmup 0 --threads 1 >"$cache/arm-bench.md"
grep -q "| tiny |" "$cache/arm-bench.md" || { cat "$cache/arm-bench.md"; echo "error: bench on arm64 failed" >&2; exit 1; }

status=0
{
  echo "# make test-arm: greedy tokens on x86-64 vs arm64 (qemu-user, sdot + NEON kernels)"
  echo
  echo "Prompt \"$prompt\", $tokens new tokens, 1 thread; prefill logits compared at the prompt's last position."
  echo "Required: plain greedy tokens of the tiny bundle identical; on each machine the custom op's kernels"
  echo "identical to its scalar kernels (PBS2P_KERNEL=generic: 0 logit difference); and every SparseBinaryMatMul"
  echo "node of the default bundle, run on arm64 with the inputs recorded on x86-64, bit-identical to x86-64."
  echo "The default bundle's tokens are reported, not required: onnxruntime's own float kernels (Cos, MatMul,"
  echo "Softmax, ...) round differently on the two ISAs (the node-by-node section below). Greedy with repetition"
  echo "penalty 20 (which makes near-ties) is reported, not required."
  echo
  "$py" scripts/arm_greedy.py --compare "$cache/x86-tiny.json" "$cache/arm-tiny.json" || true
  if [[ $default == 1 ]]; then
    "$py" scripts/arm_greedy.py --compare "$cache/x86-pbs2p.json" "$cache/arm-pbs2p.json" | tail -n +3 || true
  fi
  echo
  "$py" - "$cache" $default <<'PY' || status=1
import json, sys
from pathlib import Path
cache, default = Path(sys.argv[1]), sys.argv[2] == "1"
load = lambda name: json.loads((cache / name).read_text())
x86, arm = load("x86-tiny.json")["tiny"], load("arm-tiny.json")["tiny"]
ok = x86["greedy"]["1.0"]["token_ids"] == arm["greedy"]["1.0"]["token_ids"]
print(f"- tiny, plain greedy: x86-64 = arm64: {ok}")
if default:
    same = load("x86-pbs2p.json")["pbs2p"]["greedy"]["1.0"]["token_ids"] == load("arm-pbs2p.json")["pbs2p"]["greedy"]["1.0"]["token_ids"]
    print(f"- default PBS2P bundle, plain greedy: x86-64 = arm64: {same} (reported, not required)")
for machine, fast_name, generic_name in (("x86-64", "x86-tiny.json", "x86-generic.json"), ("arm64", "arm-tiny.json", "arm-generic.json"), ("arm64 (PBS2P_KERNEL=neon)", "arm-neon.json", "arm-generic.json")):
    fast, generic = load(fast_name)["tiny"], load(generic_name)["tiny"]
    diff = max(abs(a - b) for a, b in zip(fast["prefill_logits"], generic["prefill_logits"]))
    tokens = all(fast["greedy"][p]["token_ids"] == generic["greedy"][p]["token_ids"] for p in fast["greedy"])
    print(f"- {machine}: SIMD kernels ({fast['ops']}) vs PBS2P_KERNEL=generic: max |logit diff| {diff:g}, tokens identical: {tokens}")
    ok &= diff == 0 and tokens
sys.exit(0 if ok else 1)
PY
  echo
  if [[ $default != 1 ]]; then
    echo "Default PBS2P bundle: skipped (ARM_DEFAULT=0)."
  else
    if cmp -s "$cache/x86.txt" "$cache/arm.txt"; then
      echo "\`pbs2p-edge generate\` text of the default PBS2P bundle: identical on x86-64 and arm64."
    else
      echo "\`pbs2p-edge generate\` text of the default PBS2P bundle: differs between x86-64 and arm64."
    fi
    echo
    "$py" scripts/arm_nodes.py compare "$cache/nodes" "$cache/nodes/x86.npz" "$cache/nodes/arm.npz" | tail -n +3
    "$py" scripts/arm_nodes.py compare "$cache/nodes" "$cache/nodes/x86.npz" "$cache/nodes/arm.npz" \
      | grep -Eq "x86's recorded inputs: ([0-9]+) of \1 outputs" || status=1
  fi
  echo
  echo "\`pbs2p-edge bench\` on arm64 ran (qemu emulation: its times are not figures, so not shown)."
  echo
  echo "Wall time of this run: $((SECONDS - start)) s (shared machine)."
} >"$results"  # not a pipe: status must survive the block
cat "$results"
[[ $status == 0 ]] && echo "TEST-ARM PASSED" || echo "TEST-ARM FAILED"
exit $status

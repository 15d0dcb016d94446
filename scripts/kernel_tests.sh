#!/usr/bin/env bash
# Build and run the C++ kernel tests (custom_ops/tests, no ONNX Runtime needed) three ways:
#   native (Release), native with ASan + UBSan, and cross-built for aarch64 under qemu (NEON path);
# then a short fixed-seed fuzz run of the packed-weight parser + repack + matmul under ASan + UBSan
# (scripts/fuzz_ops.sh, FUZZ_RUNS cases, default 5000; the long run is `make fuzz-ops`).
# Ends with one summary line; exit status is non-zero if any configuration fails.
# Env: BUILD_ROOT (default build/kernel-tests), SKIP_AARCH64=1 to skip the cross build, FUZZ_RUNS.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${BUILD_ROOT:-$repo/build/kernel-tests}"
jobs="${JOBS:-2}"
declare -a results=()
failed=0

run_config() {  # name, run-prefix, cmake args...
  local name="$1" prefix="$2"
  shift 2
  local dir="$root/$name" log="$root/$name.log"
  mkdir -p "$dir"
  echo "== $name: configure + build"
  if ! cmake -S "$repo/custom_ops" -B "$dir" -DPBS2P_BUILD_OP=OFF -DPBS2P_BUILD_TESTS=ON "$@" >"$log" 2>&1 \
    || ! cmake --build "$dir" --target pbs2p_kernel_tests -j "$jobs" >>"$log" 2>&1; then
    tail -n 30 "$log"
    results+=("$name: BUILD FAILED (log: $log)")
    failed=1
    return
  fi
  echo "== $name: run"
  local out
  if out="$(timeout 300 $prefix "$dir/pbs2p_kernel_tests" 2>&1)"; then
    echo "$out" | tail -n 1
    results+=("$name: $(echo "$out" | tail -n 1)")
  else
    echo "$out" | tail -n 40
    results+=("$name: FAILED")
    failed=1
  fi
}

run_config native "" -DCMAKE_BUILD_TYPE=Release
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  run_config sanitizers "" -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS=-O1 $san" \
  "-DCMAKE_EXE_LINKER_FLAGS=$san"

if [[ "${SKIP_AARCH64:-0}" == 1 ]]; then
  results+=("aarch64-qemu: skipped (SKIP_AARCH64=1)")
elif ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  results+=("aarch64-qemu: MISSING TOOLS (apt-get install g++-aarch64-linux-gnu qemu-user)")
  failed=1
else
  run_config aarch64-qemu "qemu-aarch64 -L /usr/aarch64-linux-gnu" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++
fi

echo "== fuzz: ${FUZZ_RUNS:-5000} cases, seed 1"
fuzz_line="$(BUILD_ROOT="$root/fuzz" JOBS="$jobs" bash "$repo/scripts/fuzz_ops.sh" "${FUZZ_RUNS:-5000}" 1 | tail -n 40)"
echo "$fuzz_line" | tail -n 1
results+=("fuzz: $(echo "$fuzz_line" | tail -n 1)")
if ! echo "$fuzz_line" | tail -n 1 | grep -q '^FUZZ PASSED'; then
  echo "$fuzz_line"
  failed=1
fi

echo "== kernel test summary"
printf '  %s\n' "${results[@]}"
if [[ $failed == 0 ]]; then
  echo "KERNEL TESTS PASSED (native, sanitizers, aarch64-qemu, fuzz)"
else
  echo "KERNEL TESTS FAILED"
fi
exit $failed

#!/usr/bin/env bash
# Fuzz the packed-weight parser, validation, repack and a small matmul (custom_ops/tests/fuzz_ops.cpp) under
# ASan + UBSan. With clang: a libFuzzer build (coverage-guided); without: the seeded stand-alone driver built with
# the default C++ compiler. Fixed seed, so a run is repeatable.
#   scripts/fuzz_ops.sh [RUNS] [SEED]      (default 5000 runs, seed 1)
# Env: BUILD_ROOT (default build/fuzz), FUZZ_ENGINE=libfuzzer|standalone (default: libfuzzer if clang has it).
# Prints one summary line "FUZZ PASSED: <engine>, <runs> cases, 0 crashes ..." or "FUZZ FAILED ..."; exit 0/1.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-5000}"
seed="${2:-1}"
root="${BUILD_ROOT:-$repo/build/fuzz}"
jobs="${JOBS:-2}"
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
mkdir -p "$root"

engine="${FUZZ_ENGINE:-}"
if [[ -z "$engine" ]]; then
  engine=standalone
  if command -v clang++ >/dev/null \
    && echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' \
      | clang++ -x c++ -fsanitize=fuzzer - -o "$root/probe" >/dev/null 2>&1; then
    engine=libfuzzer
  fi
fi

log="$root/$engine.log"
if [[ "$engine" == libfuzzer ]]; then
  dir="$root/libfuzzer"
  target=pbs2p_fuzz_ops_libfuzzer
  cfg=(-DCMAKE_CXX_COMPILER=clang++ -DPBS2P_BUILD_FUZZER=ON -DPBS2P_BUILD_TESTS=OFF)
else
  dir="$root/standalone"
  target=pbs2p_fuzz_ops
  cfg=(-DPBS2P_BUILD_TESTS=ON)
fi
if ! cmake -S "$repo/custom_ops" -B "$dir" -DPBS2P_BUILD_OP=OFF -DCMAKE_BUILD_TYPE=Debug "${cfg[@]}" \
  "-DCMAKE_CXX_FLAGS=$san" "-DCMAKE_EXE_LINKER_FLAGS=$san" >"$log" 2>&1 \
  || ! cmake --build "$dir" --target "$target" -j "$jobs" >>"$log" 2>&1; then
  tail -n 30 "$log"
  echo "FUZZ FAILED: $engine build failed (log: $log)"
  exit 1
fi

export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=0:malloc_limit_mb=2048"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
start=$(date +%s)
if [[ "$engine" == libfuzzer ]]; then
  corpus="$root/corpus"  # fresh per run, so a seed gives the same run; crash inputs land in artifacts/
  rm -rf "$corpus"
  mkdir -p "$corpus" "$root/artifacts"
  # -len_control=0: long inputs from the start (the structured mode needs ~20 bytes before its mutations)
  "$dir/$target" -runs="$runs" -seed="$seed" -max_len=1024 -len_control=0 -rss_limit_mb=2048 -timeout=20 \
    -artifact_prefix="$root/artifacts/" -print_final_stats=1 "$corpus" >"$root/run.log" 2>&1
  status=$?
else
  "$dir/$target" --runs "$runs" --seed "$seed" --max-len 1024 >"$root/run.log" 2>&1
  status=$?
fi
secs=$(( $(date +%s) - start ))
summary="$(grep -h '^pbs2p fuzz:' "$root/run.log" | tail -n 1)"
if [[ $status == 0 ]]; then
  echo "FUZZ PASSED: $engine, $runs cases, seed $seed, 0 crashes, ${secs}s (${summary#pbs2p fuzz: })"
else
  tail -n 40 "$root/run.log"
  echo "FUZZ FAILED: $engine, seed $seed, exit $status after ${secs}s (log: $root/run.log)"
fi
exit $(( status != 0 ))

#!/usr/bin/env bash
# Build and run the C++ kernel tests (custom_ops/tests, no ONNX Runtime needed) three ways:
#   native (Release), native with ASan + UBSan, and cross-built for aarch64 under qemu: `-cpu max` (has the dot
#   product: sdot, sdot+neon, neon, generic), again on `-cpu cortex-a72` (no dot product, as a Raspberry Pi 4:
#   dispatch must fall back to neon and refuse PBS2P_KERNEL=sdot), and with ASan + UBSan (LeakSanitizer does not
#   run under qemu-user) plus a short seeded fuzz run (FUZZ_RUNS_AARCH64 cases, default 1000) so the fuzz
#   driver compares the aarch64 kernels too;
# on x86-64, the AVX-VNNI path: its object holds no EVEX (AVX-512) instruction, a CPU reporting avx_vnni must have
# tested avxvnni-tile natively (else it is reported as skipped), and the same binary under qemu-x86_64 -cpu
# Haswell-v4 (AVX2 + FMA + F16C, neither AVX-VNNI nor AVX-512) must dispatch avx2 and refuse PBS2P_KERNEL=avxvnni-tile;
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

# A run's verdict: its last line on success; its last 40 lines, a FAILED entry and the failure flag otherwise.
record_pass() {  # name, output
  echo "$2" | tail -n 1
  results+=("$1: $(echo "$2" | tail -n 1)")
}
record_fail() {  # name, output, FAILED detail
  echo "$2" | tail -n 40
  results+=("$1: FAILED${3:+ ($3)}")
  failed=1
}

# An already built test binary on an emulated CPU that lacks some paths: dispatch must pick $3, and the paths
# named in $4 must be listed as refused.
run_restricted() {  # name, command, expected dispatch, expected refused
  local out
  echo "== $1: run"
  if out="$(timeout 300 $2 2>/dev/null)" \
    && [[ "$out" == *"dispatch picks $3)"* && "$out" == *"refused on this CPU: "*"$4"* ]]; then
    record_pass "$1" "$out"
  else
    record_fail "$1" "$out" "want dispatch $3 and $4 refused"
  fi
}

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
    record_pass "$name" "$out"
    last_out="$out"
  else
    record_fail "$name" "$out"
  fi
}

last_out=""
run_config native "" -DCMAKE_BUILD_TYPE=Release
native_out="$last_out"
if [[ "$(uname -m)" == x86_64 ]]; then
  obj="$root/native/CMakeFiles/pbs2p_kernels.dir/kernels/avx2/tile_gemm_avxvnni.cpp.o"
  if [[ ! -f "$obj" ]]; then
    results+=("avxvnni: SKIPPED (not built: the compiler lacks -mavxvnni)")
  else
    # in 64-bit mode an instruction whose first byte is 0x62 is EVEX-encoded (AVX-512); zmm / k registers likewise
    evex="$(objdump -d --insn-width=16 "$obj" | awk -F'\t' 'NF >= 3 && ($2 ~ /^62 / || $3 ~ /zmm|%k[0-7]|mm(1[6-9]|2[0-9]|3[01])/)' | wc -l)"
    if [[ "$evex" != 0 ]]; then
      results+=("avxvnni: FAILED ($evex EVEX / AVX-512 instructions in tile_gemm_avxvnni.cpp.o)")
      failed=1
    else
      results+=("avxvnni: object holds no EVEX / AVX-512 instruction")
    fi
    if grep -qw avx_vnni /proc/cpuinfo; then
      if [[ "$native_out" == *"kernels tested: "*"avxvnni-tile"* ]]; then
        results+=("avxvnni-tile: tested in the native run (this CPU reports avx_vnni)")
      else
        results+=("avxvnni-tile: FAILED (this CPU has avx_vnni but the native run did not test avxvnni-tile)")
        failed=1
      fi
    else
      results+=("avxvnni-tile: SKIPPED natively (this CPU reports no avx_vnni)")
    fi
    if ! command -v qemu-x86_64 >/dev/null; then
      results+=("x86-qemu-haswell: MISSING TOOLS (apt-get install qemu-user)")
      failed=1
    elif [[ -x "$root/native/pbs2p_kernel_tests" ]]; then
      # AVX2, no AVX-VNNI, no AVX-512
      run_restricted x86-qemu-haswell "qemu-x86_64 -cpu Haswell-v4 $root/native/pbs2p_kernel_tests" avx2 avxvnni-tile
    fi
  fi
fi
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
  cross=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++)
  qemu="qemu-aarch64 -L /usr/aarch64-linux-gnu"
  last_out=""
  run_config aarch64-qemu "$qemu -cpu max" -DCMAKE_BUILD_TYPE=Release "${cross[@]}"
  if [[ "$last_out" == *"kernels tested: sdot+neon,sdot,neon,generic;"* ]]; then
    # the same binary on a core without the dot product (Pi 4 class): neon chosen, sdot refused
    run_restricted aarch64-qemu-a72 "$qemu -cpu cortex-a72 $root/aarch64-qemu/pbs2p_kernel_tests" neon sdot+neon,sdot
  elif [[ -n "$last_out" ]]; then
    results+=("aarch64-qemu: FAILED (the sdot paths were not tested under -cpu max)")
    failed=1
  fi
  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
    run_config aarch64-sanitizers "$qemu -cpu max" -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS=-O1 $san" \
    "-DCMAKE_EXE_LINKER_FLAGS=$san" "${cross[@]}"
  aruns="${FUZZ_RUNS_AARCH64:-1000}"
  echo "== aarch64 fuzz: $aruns cases, seed 1, ASan + UBSan, qemu -cpu max"
  adir="$root/aarch64-sanitizers"
  if cmake --build "$adir" --target pbs2p_fuzz_ops -j "$jobs" >>"$root/aarch64-sanitizers.log" 2>&1 \
    && out="$(ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=0:malloc_limit_mb=2048 \
      UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      timeout 600 $qemu -cpu max "$adir/pbs2p_fuzz_ops" --runs "$aruns" --seed 1 --max-len 1024 2>&1)"; then
    record_pass aarch64-fuzz "$out"
  else
    record_fail aarch64-fuzz "$out" "log: $root/aarch64-sanitizers.log"
  fi
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
  echo "KERNEL TESTS PASSED (native, sanitizers, x86-qemu haswell, aarch64-qemu max + cortex-a72 + sanitizers, fuzz x86 + aarch64)"
else
  echo "KERNEL TESTS FAILED"
fi
exit $failed

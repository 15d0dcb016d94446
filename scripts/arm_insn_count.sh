#!/usr/bin/env bash
# Dynamic instruction counts of the aarch64 kernels per weight (and token), under qemu-user: qemu runs one
# instruction per translation block (-singlestep) and logs every executed block (-d exec,nochain); the program
# counter of each is binned into the kernel functions' address ranges (nm of a non-PIE build). Counts are exact
# for the instruction stream (the same on any ARMv8.2 core); they are not timings. docs/FORMAT.md section 6.
#   scripts/arm_insn_count.sh [ROWS] [K] [TOKENS...]     (default 64 512, tokens 1 4 16 64)
# Env: BUILD_ROOT (default build/kernel-tests). Needs aarch64-linux-gnu-g++ and qemu-aarch64.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rows="${1:-64}"
k="${2:-512}"
shift $(($# < 2 ? $# : 2))
tokens=("$@")
[[ ${#tokens[@]} -gt 0 ]] || tokens=(1 4 16 64)
dir="${BUILD_ROOT:-$repo/build/kernel-tests}/aarch64-insn-count"
if ! cmake -S "$repo/custom_ops" -B "$dir" -DPBS2P_BUILD_OP=OFF -DPBS2P_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
  -DCMAKE_EXE_LINKER_FLAGS=-no-pie >"$dir.log" 2>&1 \
  || ! cmake --build "$dir" --target pbs2p_kernel_bench -j "${JOBS:-2}" >>"$dir.log" 2>&1; then
  tail -n 30 "$dir.log"
  echo "error: build failed (log: $dir.log)" >&2
  exit 2
fi
bin="$dir/pbs2p_kernel_bench"
# function ranges: "start end name" (hex start, decimal size), kernel text only
ranges="$(aarch64-linux-gnu-nm -S -C --defined-only "$bin" | awk '$2 ~ /^[0-9a-f]+$/ && ($3 == "T" || $3 == "t") {
  name = ""; for (i = 4; i <= NF; ++i) name = name (i > 4 ? " " : "") $i
  if (name ~ /^pbs2p::(rows_sdot|tile_neon|build_tables_generic|quantize_tokens|quantize_chunk|add_salient_and_bias)/ \
      || name ~ /take_bits/) print $1, $2, name }')"
count() {  # kernel tokens -> "name=count" lines
  qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu -singlestep -d exec,nochain -D /dev/stderr \
    "$bin" "$rows" "$k" "$2" "$1" 1 2>&1 >/dev/null \
    | python3 -c '
import sys
rng = []
for line in sys.argv[1].splitlines():
    start, size, name = line.split(" ", 2)
    rng.append((int(start, 16), int(start, 16) + int(size, 16), name.split("(")[0]))
counts = {}
for line in sys.stdin:
    if line.startswith("Trace"):
        pc = int(line.split("/")[1], 16)
        for s, e, name in rng:
            if s <= pc < e:
                counts[name] = counts.get(name, 0) + 1
                break
for name, c in counts.items():
    print(f"{name}={c}")
' "$ranges"
}
w=$((rows * k))
echo "| path | tokens | kernel instructions | per weight and token | activation side (tables / quantization) |"
echo "|---|---|---|---|---|"
for t in "${tokens[@]}"; do
  for kern in sdot neon; do
    out="$(count "$kern" "$t")"
    main=0 side=0
    while IFS='=' read -r name c; do
      [[ -z "$name" ]] && continue
      case "$name" in
        *rows_sdot* | *take_bits* | *tile_neon*) main=$((main + c)) ;;
        *build_tables* | *quantize*) side=$((side + c)) ;;
      esac
    done <<<"$out"
    awk -v k="$kern" -v t="$t" -v m="$main" -v s="$side" -v w="$w" \
      'BEGIN { printf "| %s | %d | %d | %.3f | %.3f |\n", k, t, m, m / (w * t), s / (w * t) }'
  done
done
echo "($rows x $k weight, 6:8, group 128, no salient / bias; qemu-aarch64 -cpu max, one call per path)"

// Quick single-thread kernel timing without ONNX Runtime (development aid; bench/kernels.py is the benchmark).
// Table-lookup kernels also print the median time of building the activation tables alone.
// usage: pbs2p_kernel_bench [rows] [k] [tokens] [kernel] [iterations]; weights stay warm in the caches (one 6:8
// weight, group 128). With a kernel name only that kernel runs (scripts/arm_insn_count.py counts its instructions);
// a tile kernel with a GEMM takes a suffix forcing one form at any token count (the kHybridGemv crossover):
// `avxvnni-tile/gemm` (the tile GEMM) or `avxvnni-tile/tables` (the table lookups).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../kernels/kernels.h"
#include "test_disk.h"

using namespace pbs2p;
using namespace pbs2p::test;

int main(int argc, char** argv) {
  const int rows = argc > 1 ? std::atoi(argv[1]) : 4096, k = argc > 2 ? std::atoi(argv[2]) : 4096;
  const int tokens = argc > 3 ? std::atoi(argv[3]) : 1;
  std::mt19937 rng(1);
  const Case c{rows, k, 6, 8, 128, 0, tokens, false};
  std::vector<float> wl;
  Disk d = make_disk(c, rng, &wl);
  std::vector<float> x(size_t(tokens) * k), y(size_t(tokens) * rows);
  std::normal_distribution<float> nx(0.0f, 1.0f);
  for (auto& v : x) v = nx(rng);
  std::string only = argc > 4 ? argv[4] : "", form;
  if (const size_t slash = only.find('/'); slash != std::string::npos) {
    form = only.substr(slash + 1);
    only = only.substr(0, slash);
    if (form != "gemm" && form != "tables") {
      std::fprintf(stderr, "error: kernel suffix /%s: want /gemm or /tables\n", form.c_str());
      return 2;
    }
  }
  for (const Kernel* kn : built_kernels()) {
    if (!kernel_supported(*kn) || (!only.empty() && only != kn->name)) continue;
    if (form == "gemm" && (kn->compact || kn->gemm == nullptr)) {
      std::fprintf(stderr, "error: kernel %s has no tile GEMM\n", kn->name);
      return 2;
    }
    int iters = std::string(kn->name) == "generic" ? 2 : 30;
    if (argc > 5) iters = std::max(1, std::atoi(argv[5]));
    CompactWeight cw;
    RuntimeWeight rw;
    if (kn->compact) prepare(d.view(), &cw);
    else repack(d.view(), &rw, kn->layout);
    const ChunkMap cm = make_chunks(k, 128);
    QuantActs a;
    ActTables t;
    t.tokens = tokens;
    t.k = k;
    t.chunks = int(cm.group.size());
    t.tables.resize(size_t(tokens) * k / 4);
    t.scale.resize(size_t(tokens) * t.chunks);
    std::vector<double> all, table_build;  // table_build: the activation tables' share of a table-lookup call
    for (int it = 0; it < iters; ++it) {
      const auto t0 = std::chrono::steady_clock::now();
      if (kn->compact) {
        quantize(x.data(), k, tokens, cw.cm, &a);
        kn->rows(cw, a, x.data(), 0, rows, 0, tokens, y.data(), size_t(rows));
      } else if (kn->gemm != nullptr && (form == "gemm" || (form.empty() && tokens > kHybridGemv))) {  // as the op
        quantize(x.data(), k, tokens, cm, &a);
        for (int tile = 0; tile < rw.tiles; ++tile) kn->gemm(rw, cm, a, tile, 0, tokens, y.data());
      } else {
        kn->tables(x.data(), 0, tokens, cm, &t);
        table_build.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        run_tiles(*kn, rw, cm, t, 0, rw.tiles, 0, tokens, y.data());
      }
      all.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(all.begin(), all.end());
    const std::string label = std::string(kn->name) + (form.empty() ? "" : "/" + form);
    std::printf("%-16s rows=%d k=%d tokens=%d: best %.3f ms, median %.3f ms", label.c_str(), rows, k, tokens,
                all[0] * 1e3, all[all.size() / 2] * 1e3);
    if (!table_build.empty()) {
      std::sort(table_build.begin(), table_build.end());
      std::printf(" (activation tables: median %.4f ms)", table_build[table_build.size() / 2] * 1e3);
    }
    std::printf("\n");
  }
  return 0;
}

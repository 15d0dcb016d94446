// Quick single-thread kernel timing without ONNX Runtime (development aid; bench/kernels.py is the benchmark).
// Table-lookup kernels also print the median time of building the activation tables alone.
// usage: pbs2p_kernel_bench [rows] [k] [tokens] [kernel] [iterations]; weights stay warm in the caches (one 6:8
// weight, group 128). With a kernel name only that kernel runs (scripts/arm_insn_count.py counts its instructions);
// a tile kernel with a GEMM takes a suffix forcing one form at any token count (the kHybridGemv crossover):
// `avxvnni-tile/gemm` (the tile GEMM) or `avxvnni-tile/tables` (the table lookups).
// Cold decode: pbs2p_kernel_bench rows k 1 KERNEL PASSES cold COPIES THREADS [INTERLEAVE] streams COPIES copies
// of the weight in turn (enough to outgrow the last-level cache, as a model's decode step does), THREADS threads
// taking its tile groups from one counter as the op's ParallelFor does, and prints the code stream's GB/s in the
// best and the median pass; INTERLEAVE overrides the copy's tile interleave (default: the kernel's, repack_for).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../kernels/kernels.h"
#include "test_disk.h"

using namespace pbs2p;
using namespace pbs2p::test;

namespace {

// Decode (one token) over `copies` copies of one weight, `iterations` timed passes over all of them, each pass's
// tile groups taken by `threads` threads from one counter; returns the GB/s of the copies' runtime bytes in the
// best and the median pass (the best is the machine's rate with the least interference from its neighbours).
std::pair<double, double> cold_decode(const Disk& d, const Kernel& kn, const std::vector<float>& x, int iterations,
                                      int copies, int threads, int interleave) {
  std::vector<RuntimeWeight> ws(static_cast<size_t>(copies));
  for (auto& w : ws) repack(d.view(), &w, kn.layout, interleave);
  const RuntimeWeight& w0 = ws[0];
  const ChunkMap cm = make_chunks(w0.p.k, w0.p.group_size);
  ActTables t;
  size_tables(t, 1, w0.p.k, int(cm.group.size()));
  kn.tables(x.data(), 0, 1, cm, &t);
  std::vector<std::vector<float>> ys(size_t(threads), std::vector<float>(size_t(w0.p.rows)));
  const int per = kn.multi_tiles, groups = (w0.tiles + per - 1) / per;
  const size_t items = size_t(copies) * size_t(groups);
  std::vector<double> rates;
  for (int pass = 0; pass <= iterations; ++pass) {  // pass 0: warm-up, not counted
    std::atomic<size_t> next{0};
    auto walk = [&](int id) {
      for (size_t i = next++; i < items; i = next++) {
        const RuntimeWeight& w = ws[i / size_t(groups)];
        const int tb = int(i % size_t(groups)) * per;
        run_tiles(kn, w, cm, t, tb, std::min(w.tiles, tb + per), 0, 1, ys[size_t(id)].data());
      }
    };
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int id = 1; id < threads; ++id) pool.emplace_back(walk, id);
    walk(0);
    for (auto& th : pool) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (pass > 0) rates.push_back(double(w0.runtime_bytes()) * double(copies) / s * 1e-9);
  }
  std::sort(rates.begin(), rates.end());
  return {rates.back(), rates[rates.size() / 2]};
}

}  // namespace

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
  if (argc > 6 && std::string(argv[6]) == "cold") {
    const Kernel* kn = kernel_by_name(only.c_str());
    const int copies = argc > 7 ? std::atoi(argv[7]) : 0, threads = argc > 8 ? std::atoi(argv[8]) : 1;
    const int iterations = argc > 5 ? std::atoi(argv[5]) : 0;
    if (kn == nullptr || kn->compact || tokens != 1 || copies < 1 || threads < 1 || iterations < 1) {
      std::fprintf(stderr, "error: cold wants a supported tile kernel, 1 token, iterations, copies, threads >= 1\n");
      return 2;
    }
    const int interleave = argc > 9 ? std::atoi(argv[9]) : kn->multi_tiles;
    if (interleave < 1 || interleave > kMaxInterleave) {
      std::fprintf(stderr, "error: interleave %d outside [1, %d]\n", interleave, kMaxInterleave);
      return 2;
    }
    const auto [best, median] = cold_decode(d, *kn, x, iterations, copies, threads, interleave);
    std::printf("%-16s rows=%d k=%d cold copies=%d threads=%d interleave=%d: %.1f GB/s (median pass %.1f)\n",
                kn->name, rows, k, copies, threads, interleave, best, median);
    return 0;
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
    else repack_for(d.view(), *kn, &rw);
    const ChunkMap cm = make_chunks(k, 128);
    QuantActs a;
    ActTables t;
    size_tables(t, tokens, k, int(cm.group.size()));
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

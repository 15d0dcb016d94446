// Quick single-thread kernel timing without ONNX Runtime (development aid; bench/kernels.py is the benchmark).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../kernels/kernels.h"

using namespace pbs2p;

int main(int argc, char** argv) {
  const int rows = argc > 1 ? std::atoi(argv[1]) : 4096, k = argc > 2 ? std::atoi(argv[2]) : 4096;
  const int tokens = argc > 3 ? std::atoi(argv[3]) : 1, n = 6, m = 8, gs = 128;
  const int copies = std::getenv("COPIES") ? std::atoi(std::getenv("COPIES")) : 12;  // distinct weights cycled
  std::mt19937 rng(1);
  std::vector<RuntimeWeight> ws(copies);
  for (auto& w : ws) {
    w.p = Params{n, m, gs, rows, k, 0, (k + gs - 1) / gs, false};
    w.tiles = (rows + kTileRows - 1) / kTileRows;
    w.codes.resize(size_t(w.tiles) * k / 4 * kTileRows);
    for (auto& c : w.codes) c = uint8_t(rng() & 0x55);  // codes 0/1 per 2 bits
    w.scales.assign(size_t(w.tiles) * w.p.groups * 2 * kTileRows, float_to_half(0.01f));
  }
  std::vector<float> x(size_t(tokens) * k, 0.5f), y(size_t(tokens) * rows);
  const ChunkMap cm = make_chunks(k, gs);
  ActTables t;
  t.tokens = tokens;
  t.k = k;
  t.chunks = int(cm.group.size());
  t.tables.resize(size_t(tokens) * k / 4);
  t.scale.resize(size_t(tokens) * t.chunks);
  for (const char* name : {"generic", "avx2", "neon"}) {
    TileFn fn = tile_fn_by_name(name);
    if (!fn) continue;
    const int iters = std::string(name) == "generic" ? 3 : 60;
    double best = 1e9, best_tab = 1e9;
    std::vector<double> all;
    for (int it = 0; it < iters; ++it) {
      const RuntimeWeight& w = ws[size_t(it % copies)];
      const auto t0 = std::chrono::steady_clock::now();
      build_tables(x.data(), 0, tokens, cm, &t);
      const auto t1 = std::chrono::steady_clock::now();
      for (int tile = 0; tile < w.tiles; ++tile) fn(w, cm, t, tile, 0, tokens, y.data());
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, s);
      all.push_back(s);
      best_tab = std::min(best_tab, std::chrono::duration<double>(t1 - t0).count());
    }
    std::sort(all.begin(), all.end());
    std::printf("  (tables: %.3f ms; median %.3f ms)\n", best_tab * 1e3, all[all.size() / 2] * 1e3);
    const double bytes = double(ws[0].codes.size() + ws[0].scales.size() * 2);
    std::printf("%-8s rows=%d k=%d tokens=%d: %.3f ms, %.1f GB/s of runtime weights\n", name, rows, k, tokens,
                best * 1e3, bytes / best / 1e9);
  }
  return 0;
}

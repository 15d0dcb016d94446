// C++ kernel tests (no ONNX Runtime): packer/decoder consistency, every built kernel vs an exact double
// reference with a rigorous quantization error bound, SIMD vs scalar, bad inputs; and with --from DIR,
// arrays written by the Python packer (tests/test_kernels_native.py) must decode bit-exactly here.
#include <algorithm>
#include <cmath>
#include <iterator>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../kernels/kernels.h"
#include "test_disk.h"

using namespace pbs2p;
using namespace pbs2p::test;

namespace {

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// Exact y in double, and a rigorous bound on the kernels' activation-quantization error:
// |x_j - q_j * scale| <= scale / 2 per column, so |err_r| <= sum_chunks scale_c / 2 * sum_{j in c} |w_rj| (the
// salient term uses exact x, its weight part is excluded by subtracting it from |w|... we keep it: bound stays valid).
void exact_and_bound(const Case& c, const std::vector<float>& w, const std::vector<float>& x, const Disk& d,
                     std::vector<double>* y, std::vector<double>* bound) {
  const ChunkMap cm = make_chunks(c.k, c.group_size);
  y->assign(size_t(c.tokens) * c.rows, 0.0);
  bound->assign(size_t(c.tokens) * c.rows, 0.0);
  for (int t = 0; t < c.tokens; ++t)
    for (int r = 0; r < c.rows; ++r) {
      double acc = c.bias ? d.bias[size_t(r)] : 0.0, b = 0.0, mag = 0.0;
      for (size_t ch = 0; ch + 1 < cm.begin.size(); ++ch) {
        double amax = 0.0, wsum = 0.0;
        for (int j = cm.begin[ch]; j < cm.begin[ch + 1]; ++j) {
          const double xv = x[size_t(t) * c.k + j], wv = w[size_t(r) * c.k + j];
          acc += xv * wv;
          amax = std::max(amax, std::fabs(xv));
          wsum += std::fabs(wv);
          mag += std::fabs(xv * wv);
        }
        b += amax / kActMax / 2.0 * wsum;
      }
      (*y)[size_t(t) * c.rows + r] = acc;
      (*bound)[size_t(t) * c.rows + r] = b * 1.0001 + 1e-5 * (mag + std::fabs(acc)) + 1e-6;
    }
}

std::vector<const char*> built_kernels() {
  std::vector<const char*> out;
  for (const char* n : {"generic", "avx2", "neon"})
    if (tile_fn_by_name(n)) out.push_back(n);
  return out;
}

void run_case(const Case& c, std::mt19937& rng) {
  const std::string name = name_of(c);
  std::vector<float> w_logical, w_v1;
  Disk d = make_disk(c, rng, &w_logical, &w_v1);
  std::vector<float> w_dec;
  const std::string e = decode_dense(d.view(), &w_dec);
  check(e.empty(), name + ": decode_dense: " + e);
  check(e.empty() && std::memcmp(w_dec.data(), w_logical.data(), w_dec.size() * 4) == 0,
        name + ": packer -> decode_dense not bit-exact");
  RuntimeWeight rw;
  const std::string e2 = repack(d.view(), &rw);
  check(e2.empty(), name + ": repack: " + e2);
  if (!e2.empty()) return;
  std::normal_distribution<float> nx(0.0f, 1.0f);
  std::vector<float> x(size_t(c.tokens) * c.k);
  for (auto& v : x) v = nx(rng);
  if (c.k >= 8 && c.tokens > 1) {  // awkward activations: an outlier, an all-zero chunk, exact .5 ties
    x[3] = 40.0f;
    for (int j = 0; j < std::min(c.k, 64); ++j) x[size_t(c.k) + j] = 0.0f;
  }
  {  // every table builder writes the same bytes as the generic one
    const ChunkMap cm = make_chunks(c.k, c.group_size);
    ActTables ref;
    ref.tokens = c.tokens;
    ref.k = c.k;
    ref.chunks = int(cm.group.size());
    ref.tables.resize(size_t(c.tokens) * size_t(c.k / 4));
    ref.scale.resize(size_t(c.tokens) * size_t(ref.chunks));
    build_tables_generic(x.data(), 0, c.tokens, cm, &ref);
    for (const char* kn : built_kernels()) {
      ActTables other = ref;
      std::fill(other.scale.begin(), other.scale.end(), -1.0f);
      std::memset(other.tables.data(), 0x5a, other.tables.size() * sizeof(QuadTable));
      table_fn_by_name(kn)(x.data(), 0, c.tokens, cm, &other);
      check(std::memcmp(other.tables.data(), ref.tables.data(), ref.tables.size() * sizeof(QuadTable)) == 0 &&
                std::memcmp(other.scale.data(), ref.scale.data(), ref.scale.size() * 4) == 0,
            name + " tables=" + kn + ": differ from generic tables");
    }
  }
  // The kernels see x * c (float32 products) and W_hat without c; the bound is over those.
  std::vector<float> scratch;
  const float* xs = scale_activations(rw, x.data(), size_t(c.tokens), &scratch);
  check(c.col_scales == (xs != x.data()), name + ": scale_activations applies exactly when col_scales are set");
  const std::vector<float> x_scaled(xs, xs + x.size());
  std::vector<double> y_exact, bound;
  exact_and_bound(c, w_v1, x_scaled, d, &y_exact, &bound);
  std::vector<float> y_generic(size_t(c.tokens) * c.rows, NAN);
  for (const char* kn : built_kernels()) {
    std::vector<float> y(size_t(c.tokens) * c.rows, NAN);
    matmul(rw, tile_fn_by_name(kn), x.data(), c.tokens, y.data(), table_fn_by_name(kn));
    double worst = 0.0;
    bool ok = true;
    for (size_t i = 0; i < y.size(); ++i) {
      const double err = std::fabs(double(y[i]) - y_exact[i]);
      ok = ok && std::isfinite(y[i]) && err <= bound[i];
      worst = std::max(worst, err / bound[i]);
    }
    check(ok, name + " kernel=" + kn + ": error above the quantization bound (worst err/bound " +
                  std::to_string(worst) + ")");
    if (std::strcmp(kn, "generic") == 0) {
      y_generic = y;
    } else {
      double diff = 0.0;
      for (size_t i = 0; i < y.size(); ++i)
        diff = std::max(diff, std::fabs(double(y[i]) - y_generic[i]) / (1e-3 + std::fabs(y_generic[i])));
      check(diff <= 1e-5, name + " kernel=" + kn + ": differs from generic by rel " + std::to_string(diff));
    }
  }
}

// A NaN or inf activation must give NaN outputs for that token (never a silently clamped finite value).
void non_finite_activations(std::mt19937& rng) {
  const Case c{40, 128, 6, 8, 64, 0, 2, false};
  std::vector<float> w;
  Disk d = make_disk(c, rng, &w);
  RuntimeWeight rw;
  repack(d.view(), &rw);
  for (const float bad : {NAN, INFINITY}) {
    std::vector<float> x(size_t(c.tokens) * c.k, 0.5f);
    x[100] = bad;  // token 0, second chunk
    for (const char* kn : built_kernels()) {
      std::vector<float> y(size_t(c.tokens) * c.rows);
      matmul(rw, tile_fn_by_name(kn), x.data(), c.tokens, y.data(), table_fn_by_name(kn));
      bool ok = true;
      for (int r = 0; r < c.rows; ++r) ok = ok && std::isnan(y[size_t(r)]) && std::isfinite(y[size_t(c.rows + r)]);
      check(ok, std::string("non-finite activation -> NaN outputs for that token only, kernel=") + kn);
    }
  }
}

void bad_inputs(std::mt19937& rng) {
  const Case c{40, 64, 6, 8, 32, 1, 1, true};
  std::vector<float> w;
  RuntimeWeight rw;
  {
    Disk d = make_disk(c, rng, &w);
    d.header[kHdrMagic] = 0x1234;
    check(repack(d.view(), &rw).find("magic") != std::string::npos, "bad magic rejected");
  }
  {
    Disk d = make_disk(c, rng, &w);
    for (int32_t v : {0, 3, -1, 1 << 30}) {
      d.header[kHdrVersion] = v;
      check(repack(d.view(), &rw).find("version") != std::string::npos, "bad version rejected");
    }
  }
  {
    Disk d = make_disk(c, rng, &w);
    d.header[kHdrVersion] = 1;  // a version 1 weight (no col_scales) is still read
    check(repack(d.view(), &rw).empty(), "version 1 header accepted");
    d.header[kHdrFlags] |= kFlagColScales;
    d.col_scales.assign(size_t(c.k), float_to_half(1.0f));
    check(repack(d.view(), &rw).find("unknown header flags") != std::string::npos,
          "col_scales flag refused in a version 1 header");
  }
  {
    Case cc = c;
    cc.col_scales = true;
    Disk d = make_disk(cc, rng, &w);
    d.col_scales.pop_back();
    check(repack(d.view(), &rw).find("col_scales has") != std::string::npos, "short col_scales rejected");
    d.col_scales.clear();
    check(repack(d.view(), &rw).find("col_scales has") != std::string::npos, "missing col_scales rejected");
  }
  {
    Disk d = make_disk(c, rng, &w);
    d.mask[0] ^= 1;  // breaks N:M in row 0
    check(repack(d.view(), &rw).find("N:M") != std::string::npos, "N:M violation rejected");
  }
  {
    Disk d = make_disk(c, rng, &w);
    d.signs.pop_back();
    check(repack(d.view(), &rw).find("signs has") != std::string::npos, "short signs rejected");
  }
  {
    Disk d = make_disk(c, rng, &w);
    d.header[kHdrK] = 60;  // not a multiple of M
    check(repack(d.view(), &rw).find("multiple of M") != std::string::npos, "K % M != 0 rejected");
  }
  {
    Disk d = make_disk(c, rng, &w);
    d.salient_cols[0] = 63;  // outside group 0
    check(repack(d.view(), &rw).find("outside group") != std::string::npos, "salient column outside group rejected");
  }
  {  // hostile headers: huge / negative fields never reach an allocation or an out-of-bounds read
    const struct {
      int field;
      int32_t value;
      const char* want;
    } hostile[] = {
        {kHdrRows, INT32_MAX, "mask has"},        {kHdrRows, -40, "bad weight shape"},
        {kHdrK, -64, "bad weight shape"},         {kHdrGroupSize, 1 << 30, "group_size"},
        {kHdrSalient, INT32_MAX, "salient count"}, {kHdrSalient, -1, "salient count"},
        {kHdrGroups, INT32_MAX, "groups="},       {kHdrN, 0, "N must be"},
        {kHdrFlags, 64 | kFlagSalient | kFlagBias, "unknown header flags"},
    };
    for (const auto& h : hostile) {
      Disk d = make_disk(c, rng, &w);
      d.header[size_t(h.field)] = h.value;
      const std::string e = repack(d.view(), &rw);
      check(e.find(h.want) != std::string::npos, "hostile header field " + std::to_string(h.field) + "=" +
                                                     std::to_string(h.value) + " -> '" + e + "'");
    }
    Disk d = make_disk(c, rng, &w);
    d.header[kHdrK] = INT32_MAX - 7;  // consistent groups, arrays far too small
    d.header[kHdrGroups] = int32_t((int64_t(INT32_MAX) - 7 + c.group_size - 1) / c.group_size);
    check(repack(d.view(), &rw).find("mask has") != std::string::npos, "K near INT32_MAX rejected by array sizes");
  }
  {
    Case c2 = c;
    c2.salient = 2;
    Disk d2 = make_disk(c2, rng, &w);
    d2.salient_cols[1] = d2.salient_cols[0];
    check(repack(d2.view(), &rw).find("appears twice") != std::string::npos, "repeated salient column rejected");
  }
  {
    Disk d = make_disk(c, rng, &w);
    d.scales[5] = 0x7c00;  // +inf
    check(repack(d.view(), &rw).find("non-finite") != std::string::npos, "non-finite fp16 scale rejected");
  }
  {
    Disk d = make_disk(c, rng, &w);
    check(repack(d.view(), &rw).empty(), "valid weight accepted");
  }
}

// fp16 conversion agrees with IEEE round-to-nearest-even on every half value and on ties.
void fp16_roundtrip() {
  bool ok = true;
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) continue;  // NaN payloads
    ok = ok && float_to_half(half_to_float(uint16_t(h))) == uint16_t(h);
  }
  check(ok, "fp16 round trip of all 65536 values");
  check(float_to_half(1.0f + 1.0f / 2048.0f) == 0x3c00u, "fp16 tie rounds to even (down)");
  check(float_to_half(1.0f + 3.0f / 2048.0f) == 0x3c02u, "fp16 tie rounds to even (up)");
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

template <typename T>
std::vector<T> read_array(const std::string& dir, const char* name) {
  const std::vector<char> raw = read_file(dir + "/" + name + ".bin");
  std::vector<T> out(raw.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), raw.data(), out.size() * sizeof(T));
  return out;
}

// Arrays from the Python packer: decode here must equal Python's dense() bit for bit, and every kernel must
// match Python's kernel_matmul() (same arithmetic, double vs float accumulation).
int from_python(const std::string& dir) {
  Disk d;
  d.header = read_array<int32_t>(dir, "header");
  d.mask = read_array<uint8_t>(dir, "mask");
  d.signs = read_array<uint8_t>(dir, "signs");
  d.scales = read_array<uint16_t>(dir, "scales");
  d.salient_cols = read_array<int32_t>(dir, "salient_cols");
  d.salient_signs = read_array<uint8_t>(dir, "salient_signs");
  d.alpha2 = read_array<uint16_t>(dir, "alpha2");
  d.bias = read_array<float>(dir, "bias");
  d.col_scales = read_array<uint16_t>(dir, "col_scales");  // absent file (version 1 arrays) = empty
  const std::vector<float> w_py = read_array<float>(dir, "w_dense");
  const std::vector<float> x = read_array<float>(dir, "x");
  const std::vector<float> y_py = read_array<float>(dir, "y_kernel");
  std::vector<float> w;
  const std::string e = decode_dense(d.view(), &w);
  check(e.empty(), "python arrays decode: " + e);
  check(e.empty() && w.size() == w_py.size() && std::memcmp(w.data(), w_py.data(), w.size() * 4) == 0,
        "python dense() == C++ decode_dense() bit for bit");
  RuntimeWeight rw;
  const std::string e2 = repack(d.view(), &rw);
  check(e2.empty(), "python arrays repack: " + e2);
  if (e2.empty()) {
    const int tokens = int(x.size() / size_t(rw.p.k));
    for (const char* kn : built_kernels()) {
      std::vector<float> y(size_t(tokens) * rw.p.rows);
      matmul(rw, tile_fn_by_name(kn), x.data(), tokens, y.data(), table_fn_by_name(kn));
      double worst = 0.0;
      for (size_t i = 0; i < y.size(); ++i)
        worst = std::max(worst, std::fabs(double(y[i]) - y_py[i]) / (1e-4 + std::fabs(y_py[i])));
      check(y.size() == y_py.size() && worst <= 1e-4,
            std::string("python kernel_matmul vs kernel=") + kn + " rel " + std::to_string(worst));
    }
  }
  std::printf("%s: %d checks, %d failed (python arrays from %s)\n", g_failures ? "FAILED" : "PASSED", g_checks,
              g_failures, dir.c_str());
  return g_failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--from") == 0) return from_python(argv[2]);
  std::mt19937 rng(1234);
  const Case cases[] = {
      {1, 8, 6, 8, 128, 0, 1, false},      // one row, one run, K < group
      {1, 8, 6, 8, 128, 0, 3, false},      // one row, several tokens
      {31, 64, 2, 4, 64, 0, 1, true},      // 2:4, rows < one tile
      {33, 200, 5, 8, 48, 2, 3, true},     // K not a multiple of the group, rows not of the tile, salient
      {64, 576, 6, 8, 128, 0, 1, false},   // SmolLM2 width, GEMV
      {64, 576, 4, 8, 128, 0, 16, false},  // GEMM
      {100, 1000, 4, 8, 128, 1, 5, true},  // K % 128 != 0, salient
      {45, 96, 8, 8, 4, 0, 2, false},      // dense 8:8, tiny groups
      {37, 384, 6, 8, 256, 0, 2, false},   // group > chunk: several chunks per group
      {70, 640, 9, 16, 160, 3, 4, true},   // M = 16, group not a multiple of 64
      {300, 1536, 4, 8, 128, 0, 9, false}, // many rows
      // column scales (format v2), on the awkward shapes above
      {33, 200, 5, 8, 48, 2, 3, true, true},
      {1, 8, 6, 8, 128, 0, 3, false, true},
      {100, 1000, 4, 8, 128, 1, 5, false, true},
      {70, 640, 9, 16, 160, 3, 4, true, true},
      {37, 384, 6, 8, 256, 0, 17, false, true},
  };
  for (const Case& c : cases) run_case(c, rng);
  bad_inputs(rng);
  non_finite_activations(rng);
  fp16_roundtrip();
  const char* best = nullptr;
  best_tile_fn(&best);
  std::string kernels;
  for (const char* n : built_kernels()) kernels += std::string(kernels.empty() ? "" : ",") + n;
  std::printf("%s: %d checks, %d failed (kernels: %s; dispatch picks %s)\n", g_failures ? "FAILED" : "PASSED",
              g_checks, g_failures, kernels.c_str(), best);
  return g_failures ? 1 : 0;
}

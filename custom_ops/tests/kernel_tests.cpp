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

using namespace pbs2p;

namespace {

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// Disk arrays owned by the test.
struct Disk {
  std::vector<int32_t> header = std::vector<int32_t>(kHeaderLen, 0);
  std::vector<uint8_t> mask, signs, salient_signs;
  std::vector<uint16_t> scales, alpha2;
  std::vector<int32_t> salient_cols;
  std::vector<float> bias;
  std::vector<uint16_t> col_scales;
  DiskView view() const {
    DiskView d;
    d.header = header.data();
    d.header_len = header.size();
    d.mask = mask.data();
    d.mask_len = mask.size();
    d.signs = signs.data();
    d.signs_len = signs.size();
    d.scales = scales.data();
    d.scales_len = scales.size();
    d.salient_cols = salient_cols.data();
    d.salient_cols_len = salient_cols.size();
    d.salient_signs = salient_signs.data();
    d.salient_signs_len = salient_signs.size();
    d.alpha2 = alpha2.data();
    d.alpha2_len = alpha2.size();
    d.bias = bias.data();
    d.bias_len = bias.size();
    d.col_scales = col_scales.data();
    d.col_scales_len = col_scales.size();
    return d;
  }
};

struct Case {
  int rows, k, n, m, group_size, salient, tokens;
  bool bias;
  bool col_scales = false;
};

std::string name_of(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "rows=%d k=%d %d:%d group=%d salient=%d bias=%d col_scales=%d tokens=%d", c.rows,
                c.k, c.n, c.m, c.group_size, c.salient, int(c.bias), int(c.col_scales), c.tokens);
  return buf;
}

void set_bit(std::vector<uint8_t>& v, size_t i) { v[i / 8] |= uint8_t(1u << (i % 8)); }

// Random logical layer packed by this (independent) C++ packer; also returns W_hat computed from the logical
// values directly, so decode_dense() and the packer check each other, and (if asked) W_hat without the column
// scales (the weight the kernels apply to x * c).
Disk make_disk(const Case& c, std::mt19937& rng, std::vector<float>* w_hat, std::vector<float>* w_v1 = nullptr) {
  Disk d;
  const int G = (c.k + c.group_size - 1) / c.group_size;
  d.header = {kMagic, kVersion, c.n, c.m, c.group_size, c.rows, c.k,
              (c.salient ? kFlagSalient : 0) | (c.bias ? kFlagBias : 0) | (c.col_scales ? kFlagColScales : 0),
              c.salient, G, 0, 0, 0, 0, 0, 0};
  const size_t mask_row = size_t((c.k + 7) / 8), sign_row = size_t((c.k / c.m * c.n + 7) / 8);
  d.mask.assign(size_t(c.rows) * mask_row, 0);
  d.signs.assign(size_t(c.rows) * sign_row, 0);
  std::uniform_real_distribution<float> ua(0.01f, 0.03f), um(-0.006f, 0.006f), u01(0.0f, 1.0f);
  d.scales.resize(size_t(c.rows) * G * 2);
  for (auto& s : d.scales) s = 0;
  for (size_t i = 0; i < d.scales.size(); i += 2) {
    d.scales[i] = float_to_half(ua(rng));
    d.scales[i + 1] = float_to_half(um(rng));
  }
  std::vector<int> code(size_t(c.rows) * c.k, 0);
  for (int r = 0; r < c.rows; ++r) {
    size_t kept = 0;
    for (int j0 = 0; j0 < c.k; j0 += c.m) {
      std::vector<int> idx(size_t(c.m));
      for (int i = 0; i < c.m; ++i) idx[size_t(i)] = i;
      std::shuffle(idx.begin(), idx.end(), rng);
      std::vector<bool> keep(size_t(c.m), false);
      for (int i = 0; i < c.n; ++i) keep[size_t(idx[size_t(i)])] = true;
      for (int i = 0; i < c.m; ++i) {
        if (!keep[size_t(i)]) continue;
        const int j = j0 + i;
        set_bit(d.mask, size_t(r) * mask_row * 8 + size_t(j));
        const bool plus = u01(rng) < 0.5f;
        if (plus) set_bit(d.signs, size_t(r) * sign_row * 8 + kept);
        ++kept;
        code[size_t(r) * c.k + j] = plus ? 1 : -1;
      }
    }
  }
  if (c.salient) {
    const size_t sal_row = size_t((G * c.salient + 7) / 8);
    d.salient_signs.assign(size_t(c.rows) * sal_row, 0);
    d.alpha2.resize(size_t(c.rows) * G);
    for (auto& a : d.alpha2) a = float_to_half(ua(rng) * 0.5f);
    for (int g = 0; g < G; ++g) {
      const int b = g * c.group_size, width = std::min(c.k, b + c.group_size) - b;
      std::vector<int> cols(static_cast<size_t>(width));
      for (int i = 0; i < width; ++i) cols[size_t(i)] = b + i;
      std::shuffle(cols.begin(), cols.end(), rng);
      for (int s = 0; s < c.salient; ++s) d.salient_cols.push_back(cols[size_t(s)]);
    }
    for (int r = 0; r < c.rows; ++r)
      for (int i = 0; i < G * c.salient; ++i)
        if (u01(rng) < 0.5f) set_bit(d.salient_signs, size_t(r) * sal_row * 8 + size_t(i));
  }
  if (c.bias) {
    std::normal_distribution<float> nb(0.0f, 0.1f);
    for (int r = 0; r < c.rows; ++r) d.bias.push_back(nb(rng));
  }
  if (c.col_scales) {  // log-uniform in [1/4, 4], some exactly 1
    std::uniform_real_distribution<float> ue(-2.0f, 2.0f);
    for (int j = 0; j < c.k; ++j) d.col_scales.push_back(float_to_half(j % 7 == 0 ? 1.0f : std::exp2(ue(rng))));
  }
  // W_hat from the logical values (same float32 operation order as the Python dense()).
  w_hat->assign(size_t(c.rows) * c.k, 0.0f);
  if (w_v1) w_v1->assign(size_t(c.rows) * c.k, 0.0f);
  const size_t sal_row = size_t((G * c.salient + 7) / 8);
  for (int r = 0; r < c.rows; ++r)
    for (int j = 0; j < c.k; ++j) {
      const int cd = code[size_t(r) * c.k + j];
      if (!cd) continue;
      const int g = j / c.group_size;
      const float a = half_to_float(d.scales[(size_t(r) * G + g) * 2]);
      float v = (cd > 0 ? a : -a) + half_to_float(d.scales[(size_t(r) * G + g) * 2 + 1]);
      for (int s = 0; s < c.salient; ++s)
        if (d.salient_cols[size_t(g) * c.salient + s] == j) {
          const float a2 = half_to_float(d.alpha2[size_t(r) * G + g]);
          const size_t bi = size_t(r) * sal_row * 8 + size_t(g) * c.salient + s;
          v += ((d.salient_signs[bi / 8] >> (bi % 8)) & 1) ? a2 : -a2;
        }
      if (w_v1) (*w_v1)[size_t(r) * c.k + j] = v;
      (*w_hat)[size_t(r) * c.k + j] = c.col_scales ? v * half_to_float(d.col_scales[size_t(j)]) : v;
    }
  return d;
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

// C++ kernel tests (no ONNX Runtime): packer/decoder consistency, every built kernel vs an exact double
// reference with a rigorous quantization error bound, SIMD vs scalar, bad inputs; and with --from DIR,
// arrays written by the Python packer (tests/test_kernels_native.py) must decode bit-exactly here.
#include <algorithm>
#include <cmath>
#include <iterator>
#include <cstdio>
#include <cstdlib>
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

// Every kernel this CPU can run (the others are reported as skipped once, in main).
std::vector<const Kernel*> usable_kernels() {
  std::vector<const Kernel*> out;
  for (const Kernel* k : built_kernels())
    if (kernel_supported(*k)) out.push_back(k);
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A compact kernel run piecewise (row ranges not multiples of 16, token ranges on both sides of the GEMM
// threshold, y written with a row stride) must give the whole call's bits.
void compact_pieces(const Kernel& k, const DiskView& d, const std::vector<float>& x, int tokens,
                    const std::vector<float>& whole, const std::string& name) {
  CompactWeight w;
  if (!prepare(d, &w).empty()) return;
  std::vector<float> scaled;
  const float* xs = scale_activations(w, x.data(), size_t(tokens), &scaled);
  QuantActs a;
  quantize(xs, w.p.k, tokens, w.cm, &a);
  const int rows = w.p.rows;
  const size_t ldy = size_t(rows) + 3;  // a wider output, as in a multi-block node
  std::vector<float> y(size_t(tokens) * ldy, NAN);
  const int rcut[] = {0, std::min(rows, 5), std::min(rows, 21), rows};
  const int tcut[] = {0, std::min(tokens, 1), std::min(tokens, 6), tokens};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      if (rcut[i] < rcut[i + 1] && tcut[j] < tcut[j + 1])
        k.rows(w, a, xs, rcut[i], rcut[i + 1], tcut[j], tcut[j + 1], y.data(), ldy);
  bool ok = true;
  for (int t = 0; t < tokens; ++t)
    ok = ok && std::memcmp(&y[size_t(t) * ldy], &whole[size_t(t) * rows], size_t(rows) * 4) == 0;
  check(ok, name + " kernel=" + k.name + ": row/token pieces differ from the whole call");
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
  {  // the row-pairs arrangement holds the same nibbles, each at the place format.h gives it
    RuntimeWeight pairs;
    check(repack(d.view(), &pairs, kLayoutRowPairs).empty() && pairs.codes.size() == rw.codes.size(),
          name + ": repack to row pairs");
    bool same = pairs.codes.size() == rw.codes.size() && pairs.scales == rw.scales;
    for (size_t b = 0; same && b < rw.codes.size(); b += kTileRows)
      for (int i = 0; i < kTileRows; ++i)
        for (int pair = 0; pair < 2; ++pair)
          same = same && quad_nibble(&pairs.codes[b], kLayoutRowPairs, i, pair) ==
                             ((rw.codes[b + size_t(i)] >> (4 * pair)) & 15);
    check(same, name + ": row-pairs nibbles differ from the row bytes'");
    for (int n : {2, 3, 4}) {  // interleaved groups (and the tiles after them) hold the same quad blocks
      RuntimeWeight il;
      check(repack(d.view(), &il, kLayoutRowPairs, n).empty() && il.codes.size() == pairs.codes.size(),
            name + ": repack interleaved " + std::to_string(n));
      bool same_blocks = il.codes.size() == pairs.codes.size() && il.interleave == n;
      for (int tile = 0; same_blocks && tile < il.tiles; ++tile) {
        const TileView a = tile_view(il, tile), b = tile_view(pairs, tile);
        same_blocks = a.stride == (tile / n * n + n <= il.tiles ? size_t(32 * n) : size_t(32));
        for (size_t q = 0; same_blocks && q < a.quads; ++q)
          same_blocks = std::memcmp(quad_block(a, q), quad_block(b, q), kTileRows) == 0;
      }
      check(same_blocks, name + ": interleave " + std::to_string(n) + " moved a quad block");
    }
  }
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
    ActTables paired = ref;
    pair_quad_tables(0, c.tokens, cm, &paired);
    for (const Kernel* kn : usable_kernels()) {
      if (kn->compact) continue;  // table builders belong to the tile kernels
      const ActTables& want = kn->paired_tables ? paired : ref;
      ActTables other = ref;
      std::fill(other.scale.begin(), other.scale.end(), -1.0f);
      std::memset(other.tables.data(), 0x5a, other.tables.size() * sizeof(QuadTable));
      kn->tables(x.data(), 0, c.tokens, cm, &other);
      check(std::memcmp(other.tables.data(), want.tables.data(), want.tables.size() * sizeof(QuadTable)) == 0 &&
                std::memcmp(other.scale.data(), want.scale.data(), want.scale.size() * 4) == 0,
            name + " tables=" + kn->name + ": differ from generic tables" + (kn->paired_tables ? " (paired)" : ""));
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
  const std::string eg = matmul_disk(d.view(), *kernel_by_name("generic"), x.data(), c.tokens, y_generic.data());
  check(eg.empty(), name + ": generic matmul: " + eg);
  for (const Kernel* kn : usable_kernels()) {
    std::vector<float> y(size_t(c.tokens) * c.rows, NAN);
    const std::string ek = matmul_disk(d.view(), *kn, x.data(), c.tokens, y.data());
    check(ek.empty(), name + " kernel=" + kn->name + ": " + ek);
    double worst = 0.0;
    bool ok = true;
    for (size_t i = 0; i < y.size(); ++i) {
      const double err = std::fabs(double(y[i]) - y_exact[i]);
      ok = ok && std::isfinite(y[i]) && err <= bound[i];
      worst = std::max(worst, err / bound[i]);
    }
    check(ok, name + " kernel=" + kn->name + ": error above the quantization bound (worst err/bound " +
                  std::to_string(worst) + ")");
    // every path computes the same integer sums and the same float operations in the same order
    check(same_bits(y, y_generic), name + " kernel=" + kn->name + ": not bit-identical to the generic kernel");
    if (kn->compact) compact_pieces(*kn, d.view(), x, c.tokens, y_generic, name);
  }
  {  // the scalar tile kernel reads either arrangement
    RuntimeWeight pairs;
    repack(d.view(), &pairs, kLayoutRowPairs);
    std::vector<float> y(size_t(c.tokens) * c.rows, NAN);
    matmul(pairs, tile_generic, x.data(), c.tokens, y.data(), build_tables_generic);
    check(same_bits(y, y_generic), name + " tile_generic over row pairs: not bit-identical to the generic kernel");
    RuntimeWeight il;
    repack(d.view(), &il, kLayoutRowPairs, 3);
    std::fill(y.begin(), y.end(), NAN);
    matmul(il, tile_generic, x.data(), c.tokens, y.data(), build_tables_generic);
    check(same_bits(y, y_generic), name + " tile_generic over 3 interleaved tiles: not bit-identical");
  }
}

// A NaN or inf activation must give NaN outputs for that token (never a silently clamped finite value).
void non_finite_activations(std::mt19937& rng) {
  const Case c{40, 128, 6, 8, 64, 0, 2, false};
  std::vector<float> w;
  Disk d = make_disk(c, rng, &w);
  for (const float bad : {NAN, INFINITY}) {
    std::vector<float> x(size_t(c.tokens) * c.k, 0.5f);
    x[100] = bad;  // token 0, second chunk
    for (const Kernel* kn : usable_kernels()) {
      std::vector<float> y(size_t(c.tokens) * c.rows);
      matmul_disk(d.view(), *kn, x.data(), c.tokens, y.data());
      bool ok = true;
      for (int r = 0; r < c.rows; ++r) ok = ok && std::isnan(y[size_t(r)]) && std::isfinite(y[size_t(c.rows + r)]);
      check(ok, std::string("non-finite activation -> NaN outputs for that token only, kernel=") + kn->name);
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
    check(repack(d.view(), &rw, TileLayout(2)).find("layout") != std::string::npos, "unknown tile layout rejected");
    for (int n : {0, -1, kMaxInterleave + 1})
      check(repack(d.view(), &rw, kLayoutRowPairs, n).find("interleave") != std::string::npos,
            "tile interleave " + std::to_string(n) + " rejected");
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
  bool same = true;  // the branch-free converter of the post-passes: every finite fp16, same bits
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    if ((h & 0x7c00u) == 0x7c00u) continue;
    const float a = half_to_float(uint16_t(h)), b = half_to_float_finite(uint16_t(h));
    same = same && std::memcmp(&a, &b, 4) == 0;
  }
  check(same, "half_to_float_finite == half_to_float on every finite fp16");
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

// Arrays from the Python packer: decode here must equal Python's dense() bit for bit, and every kernel (or only
// `only`, when given) must match Python's kernel_matmul() (same arithmetic, double vs float accumulation).
// Exit status 3 with a "SKIP ..." line: `only` is not built or this CPU cannot run it.
int from_python(const std::string& dir, const char* only) {
  std::vector<const Kernel*> kernels = usable_kernels();
  if (only != nullptr) {
    const auto& built = built_kernels();
    const auto it = std::find_if(built.begin(), built.end(), [&](const Kernel* k) { return std::strcmp(k->name, only) == 0; });
    if (it == built.end()) {
      std::printf("SKIP kernel=%s: not built into this binary (this architecture or compiler lacks it)\n", only);
      return 3;
    }
    if (!kernel_supported(**it)) {
      std::printf("SKIP kernel=%s: built, but this CPU lacks its instructions\n", only);
      return 3;
    }
    kernels = {*it};
  }
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
  CompactWeight cw;
  const std::string e2 = prepare(d.view(), &cw);
  check(e2.empty(), "python arrays prepare: " + e2);
  if (e2.empty()) {
    const int tokens = int(x.size() / size_t(cw.p.k));
    for (const Kernel* kn : kernels) {
      std::vector<float> y(size_t(tokens) * cw.p.rows);
      const std::string ek = matmul_disk(d.view(), *kn, x.data(), tokens, y.data());
      // relative error, with a floor of about one float32 ulp of the largest output (an output near 0 that
      // comes from cancelling terms carries the rounding of those terms, not of itself)
      double ymax = 0.0, worst = 0.0;
      for (const float v : y_py) ymax = std::max(ymax, std::fabs(double(v)));
      for (size_t i = 0; i < y.size(); ++i)
        worst = std::max(worst, std::fabs(double(y[i]) - y_py[i]) / (1e-4 + 1e-3 * ymax + std::fabs(y_py[i])));
      check(ek.empty() && y.size() == y_py.size() && worst <= 1e-4,
            std::string("python kernel_matmul vs kernel=") + kn->name + " rel " + std::to_string(worst));
    }
  }
  std::string names;
  for (const Kernel* kn : kernels) names += std::string(names.empty() ? "" : ",") + kn->name;
  std::printf("%s: %d checks, %d failed (python arrays from %s; kernels: %s)\n", g_failures ? "FAILED" : "PASSED",
              g_checks, g_failures, dir.c_str(), names.c_str());
  return g_failures ? 1 : 0;
}

}  // namespace

// The swiglu epilogue (generic/epilogue*.cpp), every variant this CPU runs, on fixed inputs (clamps, signed zeros,
// NaN, infinities, a denormal): its output bits hash to the value the numpy twin gives (tests/test_ops_epilogue.py
// recomputes it there), so every target (x86 SSE2 / AVX2 / AVX-512, aarch64 under qemu, sanitizer builds) computes
// the same bits; close to silu in double; token pieces give the whole call's bits.
void swiglu_epilogue() {
  constexpr int kF = 509, kT = 3;
  std::vector<float> in(size_t(kT) * 2 * kF), out(size_t(kT) * kF), pieces(out.size());
  const float specials[12] = {0.0f, -0.0f, NAN, INFINITY, -INFINITY, 87.0f, -87.0f, 88.0f, -88.0f, 1e-30f, -1e-38f,
                              3e38f};
  for (int64_t i = 0; i < int64_t(kT) * kF; ++i) {
    const int64_t t = i / kF, j = i % kF;
    const float g = i < 12 ? specials[i] : float((i * 7919) % 4001 - 2000) / 16.0f;
    in[size_t(t * 2 * kF + j)] = g;
    in[size_t(t * 2 * kF + kF + j)] = float((i * 104729) % 2001 - 1000) / 64.0f;
  }
  std::string names;
  for (const SwigluVariant& v : swiglu_variants()) {
    const std::string name = std::string("swiglu epilogue ") + v.name + ": ";
    names += std::string(names.empty() ? "" : ",") + v.name;
    v.fn(in.data(), 0, kT, kF, out.data());
    uint64_t h = 0xcbf29ce484222325ull;
    bool close = true;
    for (size_t i = 0; i < out.size(); ++i) {
      uint32_t b;
      std::memcpy(&b, &out[i], sizeof(b));
      if (std::isnan(out[i])) b = 0x7FC00000u;
      h = (h ^ b) * 0x100000001b3ull;
      const size_t t = i / kF, j = i % kF;
      const double g = in[t * 2 * kF + j], u = in[t * 2 * kF + kF + j];
      if (std::isfinite(g) && std::fabs(g) < 80.0) {
        const double want = g / (1.0 + std::exp(-g)) * u;
        close = close && std::fabs(out[i] - want) <= 4e-7 * std::fabs(want) + 1e-30;
      }
    }
    check(h == 0x73faece2175db743ull, name + "output bits hash to the numpy twin's");
    check(close, name + "within 4e-7 relative of silu(gate) * up in double");
    check(std::isnan(out[2]) && out[0] == 0.0f && out[1] == 0.0f && std::isinf(out[3]), name + "NaN, zeros, inf");
    v.fn(in.data(), 0, 1, kF, pieces.data());
    v.fn(in.data(), 1, kT, kF, pieces.data());
    check(same_bits(out, pieces), name + "token pieces give the whole call's bits");
  }
  swiglu_rows(in.data(), 0, kT, kF, pieces.data());
  check(same_bits(out, pieces), "swiglu_rows gives the variants' bits");
  std::printf("swiglu epilogue variants tested: %s\n", names.c_str());
}

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--from") == 0) return from_python(argv[2], nullptr);
  if (argc == 5 && std::strcmp(argv[1], "--from") == 0 && std::strcmp(argv[3], "--kernel") == 0)
    return from_python(argv[2], argv[4]);
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
      // every N of every M, chunks that start inside an M-run (group % M != 0), GEMV and GEMM token counts
      {19, 96, 1, 4, 20, 0, 1, false},
      {19, 96, 4, 4, 20, 1, 7, true},
      {17, 160, 3, 8, 100, 0, 5, false, true},
      {17, 160, 7, 8, 100, 2, 2, true},
      {21, 320, 1, 16, 20, 0, 4, false},
      {21, 320, 16, 16, 36, 0, 1, true},
      {40, 256, 11, 16, 40, 2, 33, false, true},
      {48, 512, 6, 8, 128, 0, 64, true},
      // salient + bias as compress writes them (S = 1) past one tile, on both sides of the hybrid threshold
      {70, 640, 6, 8, 128, 1, 1, true},
      {70, 640, 6, 8, 128, 1, 13, true},
      {97, 1000, 6, 8, 128, 1, 9, true, true},
      {33, 200, 5, 8, 48, 2, 20, true},
      {65, 384, 6, 8, 64, 3, 8, false},
      // decode over interleaved four-tile groups: whole groups, then tiles after them (the last one short),
      // chunks starting at odd quads (group 36 = 9 quads)
      {300, 1000, 6, 8, 36, 1, 3, true},
      {230, 200, 5, 8, 48, 2, 1, false, true},
      {260, 576, 6, 8, 128, 1, 8, true},
  };
  for (const Case& c : cases) run_case(c, rng);
  bad_inputs(rng);
  non_finite_activations(rng);
  fp16_roundtrip();
  swiglu_epilogue();
  const Kernel* best = nullptr;
  const std::string es = select_kernel(&best);
  check(es.empty(), "select_kernel: " + es);
  // PBS2P_KERNEL=<built kernel>: selected when this CPU runs it, else refused with the one-line message
  std::string refused;
  for (const Kernel* k : built_kernels()) {
    setenv("PBS2P_KERNEL", k->name, 1);
    const Kernel* forced = nullptr;
    const std::string ef = select_kernel(&forced);
    if (kernel_supported(*k)) {
      check(ef.empty() && forced == k, std::string("PBS2P_KERNEL=") + k->name + " selects it: " + ef);
    } else {
      check(ef == std::string("PBS2P_KERNEL=") + k->name + ": this CPU cannot run that path",
            std::string("PBS2P_KERNEL=") + k->name + " refused on this CPU: '" + ef + "'");
      refused += std::string(refused.empty() ? "" : ",") + k->name;
    }
  }
  unsetenv("PBS2P_KERNEL");
  if (!refused.empty()) std::printf("PBS2P_KERNEL refused on this CPU: %s\n", refused.c_str());
  std::string kernels;
  for (const Kernel* k : built_kernels()) {
    if (kernel_supported(*k)) {
      kernels += std::string(kernels.empty() ? "" : ",") + k->name;
    } else {
      std::printf("SKIP kernel=%s: built, but this CPU lacks its instructions (not tested here)\n", k->name);
    }
  }
  std::printf("%s: %d checks, %d failed (kernels tested: %s; dispatch picks %s)\n", g_failures ? "FAILED" : "PASSED",
              g_checks, g_failures, kernels.c_str(), best ? best->name : "none");
  return g_failures ? 1 : 0;
}

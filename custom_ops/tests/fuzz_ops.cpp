// Fuzz target: the packed-weight header parser, the array validation, repack, decode and a small matmul with
// every built kernel, fed hostile headers and arrays (docs/FORMAT.md section "Hostile input").
//
// Two builds of the same target:
//  * clang libFuzzer (-fsanitize=fuzzer,address,undefined): LLVMFuzzerTestOneInput is driven by libFuzzer;
//  * PBS2P_FUZZ_STANDALONE (any compiler, with ASan + UBSan): main() runs a seeded generator of inputs
//    (`pbs2p_fuzz_ops --runs N --seed S`), for machines without libFuzzer.
// A crash, sanitizer report or broken invariant aborts the process; a finished run printed its case counts.
//
// Input layout (bytes are read in order; reads past the end yield 0):
//   byte 0 bit 0 = 0: STRUCTURED: parameters from the next bytes, a valid random weight (test_disk.h packer),
//                     then 0..7 mutations (header fields set to edge values, arrays truncated / extended / bytes
//                     flipped, salient columns and fp16 scales overwritten), then activations;
//   byte 0 bit 0 = 1: RAW: 16 header words (magic forced with bit 1), 9 arrays of byte-given lengths and bytes.
// Invariants checked on every input: validate(), repack() and prepare() agree; an accepted weight decodes,
// repacks to the sizes it implies, and every kernel this CPU runs (compact, tile, hybrid) gives the generic
// kernel's outputs bit for bit (NaN where the generic gives NaN), the compact ones also on row/token slices.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../kernels/kernels.h"
#include "test_disk.h"

using namespace pbs2p;
using namespace pbs2p::test;

namespace {

struct Reader {
  const uint8_t* p;
  size_t n, i = 0;
  uint8_t u8() { return i < n ? p[i++] : 0; }
  uint16_t u16() { return uint16_t(u8() | u8() << 8); }
  uint32_t u32() { return uint32_t(u16()) | uint32_t(u16()) << 16; }
};

struct Stats {
  uint64_t cases = 0, accepted = 0, rejected = 0, structured = 0, raw = 0;
  ~Stats() {
    if (cases)
      std::printf("pbs2p fuzz: %llu cases (%llu structured, %llu raw): %llu weights accepted and run, %llu rejected\n",
                  (unsigned long long)cases, (unsigned long long)structured, (unsigned long long)raw,
                  (unsigned long long)accepted, (unsigned long long)rejected);
  }
} g_stats;

[[noreturn]] void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "pbs2p fuzz invariant broken: %s: %s\n", what, detail.c_str());
  std::fflush(stderr);
  std::abort();
}

int32_t edge_value(Reader& r) {
  static const int32_t edges[] = {0,          1,          -1,         2,          3,        4,       7,
                                  8,          16,         31,         32,         33,       64,      4096,
                                  4097,       65536,      1 << 20,    1 << 24,    1 << 28,  1 << 30, INT32_MAX,
                                  INT32_MIN,  INT32_MAX - 7, INT32_MAX - 15, -4096, kMagic, kVersion, 3};
  const uint8_t pick = r.u8();
  if (pick < 200) return edges[pick % (sizeof edges / sizeof edges[0])];
  return int32_t(r.u32());
}

template <typename T>
void resize_array(std::vector<T>& v, Reader& r, bool grow) {
  const size_t by = r.u16() % 97;
  if (grow) {
    for (size_t i = 0; i < by; ++i) v.push_back(T(r.u32()));
  } else {
    v.resize(v.size() > by ? v.size() - by : 0);
  }
}

template <typename T>
void flip_byte(std::vector<T>& v, Reader& r) {
  if (v.empty()) return;
  uint8_t* b = reinterpret_cast<uint8_t*>(v.data());
  const size_t pos = r.u32() % (v.size() * sizeof(T));
  b[pos] ^= uint8_t(r.u8() | 1);
}

// Applies f to the array with index a (0..8, ARRAY_ORDER after the header: mask .. col_scales, 8 = header).
template <typename F>
void with_array(Disk& d, int a, F f) {
  switch (a) {
    case 0: f(d.mask); break;
    case 1: f(d.signs); break;
    case 2: f(d.scales); break;
    case 3: f(d.salient_cols); break;
    case 4: f(d.salient_signs); break;
    case 5: f(d.alpha2); break;
    case 6: f(d.bias); break;
    case 7: f(d.col_scales); break;
    default: f(d.header); break;
  }
}

void mutate(Disk& d, Reader& r) {
  const int count = r.u8() % 8;
  for (int i = 0; i < count; ++i) {
    const int op = r.u8() % 7, a = r.u8() % 9;
    switch (op) {
      case 0:
      case 1: {  // a header field, biased towards the fields the checks guard
        const int field = r.u8() % (kHdrGroups + 3);
        if (size_t(field) < d.header.size()) d.header[size_t(field)] = edge_value(r);
        break;
      }
      case 2: with_array(d, a, [&](auto& v) { resize_array(v, r, false); }); break;
      case 3: with_array(d, a, [&](auto& v) { resize_array(v, r, true); }); break;
      case 4: with_array(d, a, [&](auto& v) { flip_byte(v, r); }); break;
      case 5:
        if (!d.salient_cols.empty()) d.salient_cols[r.u16() % d.salient_cols.size()] = edge_value(r);
        break;
      default: {  // an fp16 scale: 0x7c00 inf, 0x7e00 NaN, or bytes
        std::vector<uint16_t>& v = (a % 3 == 0) ? d.scales : (a % 3 == 1) ? d.alpha2 : d.col_scales;
        const uint16_t special[] = {0x7c00, 0xfc00, 0x7e00, 0x0000, 0x0001, 0x7bff};
        if (!v.empty()) v[r.u16() % v.size()] = (r.u8() & 1) ? special[r.u8() % 6] : r.u16();
        break;
      }
    }
  }
}

Disk structured(Reader& r, int* tokens) {
  Case c{};
  const int ms[] = {4, 8, 16};
  c.m = ms[r.u8() % 3];
  c.n = 1 + r.u8() % c.m;
  c.group_size = 4 * (1 + r.u8() % 48);
  c.k = c.m * (1 + r.u8() % (384 / c.m));
  c.rows = 1 + r.u8() % 80;
  const int groups = (c.k + c.group_size - 1) / c.group_size;
  const int last = c.k - (groups - 1) * c.group_size;
  c.salient = std::min(int(r.u8() % 4), last);
  c.bias = r.u8() & 1;
  c.version = 1 + (r.u8() & 1);
  c.col_scales = c.version == 2 && (r.u8() & 1);
  c.tokens = 1 + r.u8() % 12;  // both sides of kHybridGemv (tile GEMM, compact GEMM)
  *tokens = c.tokens;
  std::mt19937 rng(r.u32());
  std::vector<float> w;
  Disk d = make_disk(c, rng, &w);
  mutate(d, r);
  return d;
}

Disk raw(Reader& r, uint8_t mode, int* tokens) {
  Disk d;
  for (auto& h : d.header) h = int32_t(r.u32());
  if (mode & 2) {
    d.header[kHdrMagic] = kMagic;
    d.header[kHdrVersion] = 1 + int32_t(mode >> 2) % 2;
  }
  for (int a = 0; a < 8; ++a)
    with_array(d, a, [&](auto& v) {
      v.resize(r.u16() % 2048);
      for (auto& e : v) e = decltype(+e)(r.u32());
    });
  *tokens = 1 + r.u8() % 3;
  return d;
}

// Every kernel this CPU runs (compact, tile and hybrid) on the accepted weight: bit for bit the generic
// kernel's outputs (NaN where generic gives NaN), and the compact kernels also piecewise (rows, tokens).
void check_kernels(const DiskView& view, const Params& p, Reader& r, int tokens) {
  const size_t k = size_t(p.k), rows = size_t(p.rows);
  std::vector<float> x(size_t(tokens) * k);
  std::mt19937 rng(r.u32());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : x) v = nd(rng);
  const uint8_t special = r.u8();  // sometimes a non-finite or huge activation
  if (special < 40 && !x.empty()) {
    const float vals[] = {NAN, INFINITY, -INFINITY, 3e38f, 0.0f};
    x[r.u32() % x.size()] = vals[special % 5];
  }
  std::vector<float> y_generic(size_t(tokens) * rows, -1.0f);
  const std::string eg = matmul_disk(view, *kernel_by_name("generic"), x.data(), tokens, y_generic.data());
  if (!eg.empty()) fail("generic matmul of an accepted weight", eg);
  for (const Kernel* kn : built_kernels()) {
    if (!kernel_supported(*kn) || std::strcmp(kn->name, "generic") == 0) continue;
    std::vector<float> y(y_generic.size(), -1.0f);
    const std::string ek = matmul_disk(view, *kn, x.data(), tokens, y.data());
    if (!ek.empty()) fail("kernel refused an accepted weight", std::string(kn->name) + ": " + ek);
    for (size_t i = 0; i < y.size(); ++i) {
      const float a = y[i], b = y_generic[i];
      if (!((std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 4) == 0))
        fail("kernel mismatch", std::string(kn->name) + " output " + std::to_string(i));
    }
  }
  // the compact kernels on a slice of rows and tokens, written with a wider row stride
  CompactWeight cw;
  if (!prepare(view, &cw).empty()) fail("prepare refused an accepted weight", "");
  std::vector<float> scaled;
  const float* xs = scale_activations(cw, x.data(), size_t(tokens), &scaled);
  QuantActs a;
  quantize(xs, p.k, tokens, cw.cm, &a);
  const int r0 = int(r.u8()) % p.rows, r1 = r0 + 1 + int(r.u8()) % (p.rows - r0);
  const int t0 = int(r.u8()) % tokens;
  const size_t ldy = rows + 1;
  for (const Kernel* kn : built_kernels()) {
    if (!kernel_supported(*kn) || !kn->compact) continue;
    std::vector<float> y(size_t(tokens) * ldy, -1.0f);
    kn->rows(cw, a, xs, r0, r1, t0, tokens, y.data(), ldy);
    for (int t = t0; t < tokens; ++t)
      for (int row = r0; row < r1; ++row) {
        const float u = y[size_t(t) * ldy + size_t(row)], v = y_generic[size_t(t) * rows + size_t(row)];
        if (!((std::isnan(u) && std::isnan(v)) || std::memcmp(&u, &v, 4) == 0))
          fail("compact kernel slice mismatch", std::string(kn->name) + " row " + std::to_string(row));
      }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader r{data, size};
  const uint8_t mode = r.u8();
  int tokens = 1;
  ++g_stats.cases;
  Disk d = (mode & 1) ? (++g_stats.raw, raw(r, mode, &tokens)) : (++g_stats.structured, structured(r, &tokens));
  const DiskView view = d.view();
  Params p;
  std::string e = parse_header(view.header, view.header_len, &p);
  if (e.empty()) e = validate(view, p);
  RuntimeWeight rw;
  const std::string e2 = repack(view, &rw);
  if (e.empty() != e2.empty()) fail("validate and repack disagree", e + " | " + e2);
  CompactWeight cw;
  const std::string e4 = prepare(view, &cw);
  if (e.empty() != e4.empty()) fail("validate and prepare disagree", e + " | " + e4);
  if (!e.empty()) {
    if (e.find('\n') != std::string::npos || e.size() > 400) fail("message is not one short line", e);
    ++g_stats.rejected;
    return 0;
  }
  ++g_stats.accepted;
  if (size_t(rw.tiles) * kTileRows < size_t(p.rows) || rw.codes.size() != size_t(rw.tiles) * kTileRows * (p.k / 4))
    fail("runtime sizes", std::to_string(rw.codes.size()));
  std::vector<float> dense;
  const std::string e3 = decode_dense(view, &dense);
  if (!e3.empty() || dense.size() != size_t(p.rows) * size_t(p.k)) fail("decode of an accepted weight", e3);
  check_kernels(view, p, r, tokens);
  return 0;
}

#if defined(PBS2P_FUZZ_STANDALONE)
// Seeded generator for machines without libFuzzer: random bytes of random length; every byte string is a valid
// input of the target (structured mode turns any bytes into a weight and mutations).
int main(int argc, char** argv) {
  unsigned long long runs = 1000, seed = 1;
  size_t max_len = 512;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--runs") == 0) runs = std::strtoull(argv[i + 1], nullptr, 10);
    else if (std::strcmp(argv[i], "--seed") == 0) seed = std::strtoull(argv[i + 1], nullptr, 10);
    else if (std::strcmp(argv[i], "--max-len") == 0) max_len = size_t(std::strtoull(argv[i + 1], nullptr, 10));
    else {
      std::fprintf(stderr, "usage: %s [--runs N] [--seed S] [--max-len L]\n", argv[0]);
      return 2;
    }
  }
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> buf;
  for (unsigned long long i = 0; i < runs; ++i) {
    buf.resize(size_t(rng() % (max_len + 1)));
    for (auto& b : buf) b = uint8_t(rng());
    LLVMFuzzerTestOneInput(buf.data(), buf.size());
  }
  std::printf("standalone fuzz driver: seed %llu, %llu runs, 0 crashes\n", seed, runs);
  return 0;
}
#endif

// Format parsing, validation, repacking, activation tables and the scalar reference tile kernel.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "../kernels.h"

#if defined(PBS2P_HAVE_AVX2)
#include <cpuid.h>
#endif

namespace pbs2p {
namespace {

std::string join_shape(std::initializer_list<long long> dims) {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (long long d : dims) {
    if (!first) os << ", ";
    os << d;
    first = false;
  }
  os << "]";
  return os.str();
}

size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

inline bool bit(const uint8_t* bits, size_t i) { return (bits[i >> 3] >> (i & 7)) & 1u; }

}  // namespace

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        mant <<= 1;
        ++e;
      } while ((mant & 0x400u) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 112) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even, as numpy's astype(float16)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow to inf
  if (ax < 0x38800000u) {                                   // subnormal or zero in fp16
    float af;
    std::memcpy(&af, &ax, 4);
    return uint16_t(sign | uint16_t(std::nearbyint(af * 16777216.0f)));  // af / 2^-24
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

namespace {

// a * b into *out; false on overflow of size_t (matters on 32-bit targets, and guards any future widening).
bool mul_size(size_t a, size_t b, size_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool add_size(size_t a, size_t b, size_t* out) { return !__builtin_add_overflow(a, b, out); }

bool half_is_finite(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

}  // namespace

std::string disk_sizes(const Params& p, DiskSizes* out) {
  // Parameters come from parse_header (1 <= rows, k <= INT32_MAX, 4 <= group_size <= 4096, 0 <= S <= group_size,
  // G = ceil(K / group_size)), so every factor below is non-negative; products are still checked.
  DiskSizes s{};
  const size_t rows = size_t(p.rows), k = size_t(p.k), g = size_t(p.groups), sal = size_t(p.salient);
  const size_t mask_row = ceil_div(k, 8), sign_row = ceil_div(k / size_t(p.m) * size_t(p.n), 8);
  size_t gs2 = 0, sal_bits = 0;
  bool ok = mul_size(rows, mask_row, &s.mask) && mul_size(rows, sign_row, &s.signs) && mul_size(g, 2, &gs2) &&
            mul_size(rows, gs2, &s.scales) && mul_size(g, sal, &s.salient_cols) && mul_size(g, sal, &sal_bits);
  if (ok && sal) ok = mul_size(rows, ceil_div(sal_bits, 8), &s.salient_signs) && mul_size(rows, g, &s.alpha2);
  if (!ok) return "array sizes of a [" + std::to_string(p.rows) + ", " + std::to_string(p.k) + "] weight overflow";
  s.bias = p.has_bias ? rows : 0;
  s.col_scales = p.has_col_scales ? k : 0;
  *out = s;
  return "";
}

std::string parse_header(const int32_t* h, size_t len, Params* out) {
  if (h == nullptr || len != size_t(kHeaderLen))
    return "header must hold " + std::to_string(kHeaderLen) + " int32 values, got " + std::to_string(len);
  if (h[kHdrMagic] != kMagic) return "header magic mismatch: not a pbs2p packed weight";
  if (h[kHdrVersion] < kMinVersion || h[kHdrVersion] > kVersion)
    return "unsupported packed format version " + std::to_string(h[kHdrVersion]) + " (this build reads versions " +
           std::to_string(kMinVersion) + ".." + std::to_string(kVersion) + ")";
  Params p;
  p.version = h[kHdrVersion];
  p.n = h[kHdrN];
  p.m = h[kHdrM];
  p.group_size = h[kHdrGroupSize];
  p.rows = h[kHdrRows];
  p.k = h[kHdrK];
  p.salient = h[kHdrSalient];
  p.groups = h[kHdrGroups];
  const int flags = h[kHdrFlags];
  p.has_bias = (flags & kFlagBias) != 0;
  p.has_col_scales = (flags & kFlagColScales) != 0;
  const int known_flags = kFlagSalient | kFlagBias | (p.version >= 2 ? kFlagColScales : 0);
  if (p.m != 4 && p.m != 8 && p.m != 16) return "header M must be 4, 8 or 16, got " + std::to_string(p.m);
  if (p.n < 1 || p.n > p.m)
    return "header N must be in [1, M], got N=" + std::to_string(p.n) + " M=" + std::to_string(p.m);
  if (p.rows < 1 || p.k < 1) return "bad weight shape " + join_shape({p.rows, p.k}) + " in the header";
  if (p.k % p.m != 0) return "header K=" + std::to_string(p.k) + " is not a multiple of M=" + std::to_string(p.m);
  if (p.group_size < 4 || p.group_size % 4 != 0 || p.group_size > kMaxGroupSize)
    return "header group_size must be a multiple of 4 in [4, " + std::to_string(kMaxGroupSize) + "], got " +
           std::to_string(p.group_size);
  const int64_t want_groups = (int64_t(p.k) + p.group_size - 1) / p.group_size;  // 64-bit: K may be INT32_MAX
  if (int64_t(p.groups) != want_groups)
    return "header groups=" + std::to_string(p.groups) + " != ceil(K / group_size) = " + std::to_string(want_groups);
  if (p.salient < 0 || p.salient > p.group_size)
    return "header salient count " + std::to_string(p.salient) + " is not in [0, group_size]";
  // every group, the last (shortest) included, must hold S distinct columns
  const int64_t last_width = int64_t(p.k) - int64_t(p.groups - 1) * p.group_size;
  if (p.salient > last_width)
    return "header salient count " + std::to_string(p.salient) + " exceeds the last group's " +
           std::to_string(last_width) + " columns";
  if (((flags & kFlagSalient) != 0) != (p.salient > 0)) return "header salient flag and salient count disagree";
  if ((flags & ~known_flags) != 0)
    return "unknown header flags " + std::to_string(flags) + " for format version " + std::to_string(p.version);
  for (int i = kHdrGroups + 1; i < kHeaderLen; ++i)
    if (h[i] != 0) return "reserved header entries must be 0";
  *out = p;
  return "";
}

std::string validate(const DiskView& d, const Params& p) {
  DiskSizes s;
  std::string e = disk_sizes(p, &s);
  if (!e.empty()) return e;
  // Every array's element count must be exactly what the header implies: this ties rows * K to the bytes the
  // graph really feeds, so no loop below (or in repack) can run past an array or size a giant allocation.
  auto check = [](const char* name, const void* ptr, size_t got, size_t want) -> std::string {
    if (got == want && (got == 0 || ptr != nullptr)) return "";
    return std::string(name) + " has " + std::to_string(got) + " elements, expected " + std::to_string(want) +
           " from the packed header";
  };
  if (!(e = check("mask", d.mask, d.mask_len, s.mask)).empty()) return e;
  if (!(e = check("signs", d.signs, d.signs_len, s.signs)).empty()) return e;
  if (!(e = check("scales", d.scales, d.scales_len, s.scales)).empty()) return e;
  if (!(e = check("salient_cols", d.salient_cols, d.salient_cols_len, s.salient_cols)).empty()) return e;
  if (!(e = check("salient_signs", d.salient_signs, d.salient_signs_len, s.salient_signs)).empty()) return e;
  if (!(e = check("alpha2", d.alpha2, d.alpha2_len, s.alpha2)).empty()) return e;
  if (!(e = check("bias", d.bias, d.bias_len, s.bias)).empty()) return e;
  if (!(e = check("col_scales", d.col_scales, d.col_scales_len, s.col_scales)).empty()) return e;
  const size_t mask_row = ceil_div(size_t(p.k), 8);
  for (int r = 0; r < p.rows; ++r) {
    const uint8_t* mrow = d.mask + size_t(r) * mask_row;
    for (int j0 = 0; j0 < p.k; j0 += p.m) {
      int count = 0;
      for (int j = j0; j < j0 + p.m; ++j) count += bit(mrow, size_t(j));
      if (count != p.n)
        return "row " + std::to_string(r) + " columns " + std::to_string(j0) + ".." + std::to_string(j0 + p.m - 1) +
               " keep " + std::to_string(count) + " weights, N:M requires " + std::to_string(p.n);
    }
  }
  if (p.salient) {
    std::vector<int32_t> cols(size_t(p.salient));
    for (int g = 0; g < p.groups; ++g) {
      const int64_t lo = int64_t(g) * p.group_size, hi = std::min<int64_t>(p.k, lo + p.group_size);
      for (int s2 = 0; s2 < p.salient; ++s2) {
        const int32_t c = d.salient_cols[size_t(g) * size_t(p.salient) + size_t(s2)];
        if (c < lo || c >= hi)
          return "salient column " + std::to_string(c) + " is outside group " + std::to_string(g) + " [" +
                 std::to_string(lo) + ", " + std::to_string(hi) + ")";
        cols[size_t(s2)] = c;
      }
      std::sort(cols.begin(), cols.end());
      if (std::adjacent_find(cols.begin(), cols.end()) != cols.end())
        return "salient column " + std::to_string(*std::adjacent_find(cols.begin(), cols.end())) +
               " appears twice in group " + std::to_string(g);
    }
  }
  auto finite = [](const char* name, const uint16_t* v, size_t n) -> std::string {
    for (size_t i = 0; i < n; ++i)
      if (!half_is_finite(v[i])) return std::string(name) + " holds a non-finite fp16 value at element " + std::to_string(i);
    return "";
  };
  if (!(e = finite("scales", d.scales, d.scales_len)).empty()) return e;
  if (!(e = finite("alpha2", d.alpha2, d.alpha2_len)).empty()) return e;
  if (!(e = finite("col_scales", d.col_scales, d.col_scales_len)).empty()) return e;
  return "";
}

// Calls fn(row, col, code) for every weight of the disk layout, in row-major order.
template <typename Fn>
static void for_each_code(const DiskView& d, const Params& p, Fn fn) {
  const size_t mask_row = size_t(p.k) / 8 + (p.k % 8 ? 1 : 0);
  const size_t sign_row = ceil_div(size_t(p.k) / size_t(p.m) * size_t(p.n), 8);
  for (int r = 0; r < p.rows; ++r) {
    const uint8_t* mrow = d.mask + size_t(r) * mask_row;
    const uint8_t* srow = d.signs + size_t(r) * sign_row;
    size_t kept = 0;
    for (int j = 0; j < p.k; ++j) {
      uint8_t code = kCodeZero;
      if (bit(mrow, size_t(j))) code = bit(srow, kept++) ? kCodePlus : kCodeMinus;
      fn(r, j, code);
    }
  }
}

std::string decode_dense(const DiskView& d, std::vector<float>* w) {
  Params p;
  std::string e = parse_header(d.header, d.header_len, &p);
  if (e.empty()) e = validate(d, p);
  if (!e.empty()) return e;
  size_t n = 0;
  if (!mul_size(size_t(p.rows), size_t(p.k), &n)) return "dense size overflows";
  w->assign(n, 0.0f);
  const size_t sal_row = p.salient ? ceil_div(size_t(p.groups) * p.salient, 8) : 0;
  for_each_code(d, p, [&](int r, int j, uint8_t code) {
    if (code == kCodeZero) return;
    const int g = j / p.group_size;
    const size_t sc = (size_t(r) * p.groups + g) * 2;
    const float a = half_to_float(d.scales[sc]), mu = half_to_float(d.scales[sc + 1]);
    float v = (code == kCodePlus ? a : -a) + mu;
    for (int s2 = 0; s2 < p.salient; ++s2) {
      if (d.salient_cols[size_t(g) * p.salient + s2] != j) continue;
      const float a2 = half_to_float(d.alpha2[size_t(r) * p.groups + g]);
      v += bit(d.salient_signs + size_t(r) * sal_row, size_t(g) * p.salient + s2) ? a2 : -a2;
    }
    if (p.has_col_scales) v *= half_to_float(d.col_scales[j]);
    (*w)[size_t(r) * p.k + j] = v;
  });
  return "";
}

size_t RuntimeWeight::runtime_bytes() const {
  return codes.size() + scales.size() * 2 + salient_cols.size() * 4 + salient_coef.size() + alpha2.size() * 2 +
         bias.size() * 4 + col_scales.size() * 4;
}

std::string repack(const DiskView& d, RuntimeWeight* out, TileLayout layout, int interleave) {
  if (layout != kLayoutRowBytes && layout != kLayoutRowPairs) return "unknown tile layout " + std::to_string(layout);
  if (interleave < 1 || interleave > kMaxInterleave)
    return "tile interleave " + std::to_string(interleave) + " outside [1, " + std::to_string(kMaxInterleave) + "]";
  Params p;
  std::string e = parse_header(d.header, d.header_len, &p);
  if (e.empty()) e = validate(d, p);
  if (!e.empty()) return e;
  RuntimeWeight& w = *out;
  w.p = p;
  w.layout = layout;
  w.interleave = interleave;
  w.tiles = int((int64_t(p.rows) + kTileRows - 1) / kTileRows);
  const size_t quads = size_t(p.k) / 4, G = size_t(p.groups), S = size_t(p.salient);
  // Runtime sizes, checked before any allocation. validate() tied rows * K to the mask the graph feeds
  // (rows * ceil(K/8) bytes), so these are at most a small multiple of the disk arrays' bytes.
  size_t padded_rows = 0, n_codes = 0, n_scales = 0, n_coef = 0, gs = 0;
  const bool sizes_ok = mul_size(size_t(w.tiles), kTileRows, &padded_rows) && mul_size(padded_rows, quads, &n_codes) &&
                        mul_size(padded_rows, G, &n_scales) && mul_size(n_scales, 2, &n_scales) &&
                        mul_size(G, S, &gs) && mul_size(padded_rows, gs, &n_coef);
  size_t disk_bytes = 0;
  for (size_t b : {d.mask_len, d.signs_len, d.scales_len * 2, d.salient_cols_len * 4, d.salient_signs_len,
                   d.alpha2_len * 2, d.bias_len * 4, d.col_scales_len * 2})
    if (!add_size(disk_bytes, b, &disk_bytes)) return "packed array sizes overflow";
  size_t runtime = 0, cap = 0;
  if (!sizes_ok || !add_size(n_codes, n_scales * 2, &runtime) || !add_size(runtime, n_coef, &runtime) ||
      !mul_size(disk_bytes, 64, &cap) || runtime > cap + (size_t(1) << 16))
    return "runtime layout of a [" + std::to_string(p.rows) + ", " + std::to_string(p.k) +
           "] weight would not fit the arrays it comes from";
  w.codes.assign(n_codes, 0);
  std::vector<size_t> first_block(size_t(w.tiles)), stride(size_t(w.tiles));  // tile_view's, as offsets
  for (int tile = 0; tile < w.tiles; ++tile) {
    const TileView v = tile_view(w, tile);
    first_block[size_t(tile)] = size_t(v.codes - w.codes.data());
    stride[size_t(tile)] = v.stride;
  }
  for_each_code(d, p, [&](int r, int j, uint8_t code) {
    const size_t tile = size_t(r) / kTileRows, i = size_t(r) % kTileRows, q = size_t(j) / 4;
    size_t byte = i;
    int shift = (j % 4) * 2;  // row bytes: cols 0,1 -> low nibble bits 0-3; cols 2,3 -> high nibble
    if (layout == kLayoutRowPairs) {  // byte 2 (i % 16) + pair; rows 16-31 in the high nibbles
      byte = 2 * (i % 16) + size_t(j % 4) / 2;
      shift = (i >= 16 ? 4 : 0) + (j % 2) * 2;
    }
    w.codes[first_block[tile] + q * stride[tile] + byte] |= uint8_t(code << shift);
  });
  w.scales.assign(n_scales, 0);
  for (int r = 0; r < p.rows; ++r)
    for (size_t g = 0; g < G; ++g) {
      const size_t tile = size_t(r) / kTileRows, i = size_t(r) % kTileRows;
      uint16_t* ts = &w.scales[(tile * G + g) * 2 * kTileRows];
      ts[i] = d.scales[(size_t(r) * G + g) * 2];
      ts[kTileRows + i] = d.scales[(size_t(r) * G + g) * 2 + 1];
    }
  w.salient_cols.assign(d.salient_cols, d.salient_cols + G * S);
  w.salient_coef.assign(n_coef, 0);
  w.alpha2.assign(S ? size_t(w.tiles) * G * kTileRows : 0, 0);
  if (S) {
    const size_t mask_row = size_t(p.k) / 8 + (p.k % 8 ? 1 : 0);
    const size_t sal_row = ceil_div(G * S, 8);
    for (int r = 0; r < p.rows; ++r) {
      const size_t tile = size_t(r) / kTileRows, i = size_t(r) % kTileRows;
      for (size_t g = 0; g < G; ++g) {
        w.alpha2[(tile * G + g) * kTileRows + i] = d.alpha2[size_t(r) * G + g];
        for (size_t s2 = 0; s2 < S; ++s2) {
          const int c = w.salient_cols[g * S + s2];
          const bool kept = bit(d.mask + size_t(r) * mask_row, size_t(c));
          const bool plus = bit(d.salient_signs + size_t(r) * sal_row, g * S + s2);
          w.salient_coef[((tile * G + g) * S + s2) * kTileRows + i] = int8_t(kept ? (plus ? 1 : -1) : 0);
        }
      }
    }
  }
  w.bias.assign(d.bias, d.bias + (p.has_bias ? size_t(p.rows) : 0));
  w.col_scales.resize(p.has_col_scales ? size_t(p.k) : 0);
  for (size_t j = 0; j < w.col_scales.size(); ++j) w.col_scales[j] = half_to_float(d.col_scales[j]);
  return "";
}

ChunkMap make_chunks(int k, int group_size) {
  ChunkMap cm;
  for (int g0 = 0, g = 0; g0 < k; g0 += group_size, ++g)
    for (int c = g0; c < std::min(k, g0 + group_size); c += kChunkCols) {
      cm.begin.push_back(c);
      cm.group.push_back(g);
    }
  cm.begin.push_back(k);
  return cm;
}

void pair_quad_tables(int token_begin, int token_end, const ChunkMap& cm, ActTables* t) {
  const size_t quads = size_t(t->k / 4);
  for (int tok = token_begin; tok < token_end; ++tok) {
    QuadTable* row = &t->tables[size_t(tok) * quads];
    for (size_t c = 0; c + 1 < cm.begin.size(); ++c) {
      const int qb = cm.begin[c] / 4, qe = cm.begin[c + 1] / 4;
      for (int q = qb; q + 2 <= qe; q += 2) {
        const QuadTable a = row[q], b = row[q + 1];
        int8_t* d = reinterpret_cast<int8_t*>(&row[q]);
        int8_t* s = reinterpret_cast<int8_t*>(&row[q + 1]);
        std::memcpy(d, a.d_lo, 16);
        std::memcpy(d + 16, a.d_hi, 16);
        std::memcpy(d + 32, b.d_lo, 16);
        std::memcpy(d + 48, b.d_hi, 16);
        std::memcpy(s, a.s_lo, 16);
        std::memcpy(s + 16, a.s_hi, 16);
        std::memcpy(s + 32, b.s_lo, 16);
        std::memcpy(s + 48, b.s_hi, 16);
      }
    }
  }
}

void build_tables_generic(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t) {
  const int k = t->k, chunks = t->chunks, quads = k / 4;
  int8_t q[kChunkCols];
  for (int tok = token_begin; tok < token_end; ++tok) {
    const float* xt = x + size_t(tok) * k;
    for (int c = 0; c < chunks; ++c) {
      const int b = cm.begin[size_t(c)], e = cm.begin[size_t(c) + 1];
      t->scale[size_t(tok) * chunks + c] = quantize_chunk(xt, b, e, q);
      for (int j = b; j < e; j += 4) {
        QuadTable& qt = t->tables[size_t(tok) * quads + size_t(j / 4)];
        for (int half = 0; half < 2; ++half) {
          const int qa = q[j - b + 2 * half], qb = q[j - b + 2 * half + 1];
          int8_t* dt = half ? qt.d_hi : qt.d_lo;
          int8_t* st = half ? qt.s_hi : qt.s_lo;
          for (int idx = 0; idx < 16; ++idx) {
            const int c0 = idx & 3, c1 = idx >> 2;
            const int va = c0 == kCodePlus ? qa : c0 == kCodeMinus ? -qa : 0;
            const int vb = c1 == kCodePlus ? qb : c1 == kCodeMinus ? -qb : 0;
            dt[idx] = int8_t(va + vb);
            st[idx] = int8_t((c0 == 1 || c0 == 2 ? qa : 0) + (c1 == 1 || c1 == 2 ? qb : 0));
          }
        }
      }
    }
  }
}

void salient_block_generic(const SalientBlock& b, const float* x, int t0, int t1, float* y, size_t ldy) {
  const size_t S = size_t(b.salient);
  // Groups outermost: each group's alpha2 is converted once for all tokens; per output the order is unchanged.
  for (int g = 0; g < b.groups && S; ++g) {
    float a2[kTileRows];
    const uint16_t* h = b.alpha2 + size_t(g) * kTileRows;
    for (int i = 0; i < kTileRows; ++i) a2[i] = half_to_float_finite(h[i]);
    const int8_t* coef = b.coef + size_t(g) * S * kTileRows;
    const int32_t* cols = b.cols + size_t(g) * S;
    for (int tok = t0; tok < t1; ++tok) {
      const float* xt = x + size_t(tok) * size_t(b.k);
      float acc[kTileRows] = {};
      for (size_t s2 = 0; s2 < S; ++s2) {  // rows innermost: vectorizes
        const int8_t* c = coef + s2 * kTileRows;
        const float xv = xt[cols[s2]];
        for (int i = 0; i < kTileRows; ++i) acc[i] += float(c[i]) * xv;
      }
      float* yt = y + size_t(tok) * ldy;
      for (int i = 0; i < b.nr; ++i) yt[i] = std::fma(a2[i], acc[i], yt[i]);
    }
  }
  if (b.bias != nullptr)
    for (int tok = t0; tok < t1; ++tok) {
      float* yt = y + size_t(tok) * ldy;
      for (int i = 0; i < b.nr; ++i) yt[i] += b.bias[i];
    }
}

void add_salient_and_bias(const RuntimeWeight& w, const float* x, int tile, int t_begin, int t_end, float* y,
                          SalientFn fn) {
  const Params& p = w.p;
  if (!p.salient && w.bias.empty()) return;
  const int r0 = tile * kTileRows;
  const size_t G = size_t(p.groups), S = size_t(p.salient);
  SalientBlock b;
  b.groups = p.groups;
  b.salient = p.salient;
  b.nr = std::min(kTileRows, p.rows - r0);
  b.k = p.k;
  b.cols = w.salient_cols.data();
  b.coef = S ? &w.salient_coef[size_t(tile) * G * S * kTileRows] : nullptr;
  b.alpha2 = S ? &w.alpha2[size_t(tile) * G * kTileRows] : nullptr;
  b.bias = w.bias.empty() ? nullptr : &w.bias[size_t(r0)];
  fn(b, x, t_begin, t_end, y + r0, size_t(p.rows));
}

SalientFn salient_fn_for(TileFn fn) {
#if defined(PBS2P_HAVE_AVX2)
  if (fn == tile_avx2) return salient_block_avx2;
#endif
#if defined(PBS2P_HAVE_AVX512VBMI)
  if (fn == tile_avx512vbmi) return salient_block_avx2;  // AVX-512 implies AVX2, FMA and F16C
#endif
  (void)fn;
  return salient_block_generic;
}

void tile_generic(PBS2P_TILE_ARGS) {
  const Params& p = w.p;
  const auto [r0, nr, quads, G, codes, stride] = tile_view(w, tile);
  for (int tok = t_begin; tok < t_end; ++tok) {
    const QuadTable* tab = &t.tables[size_t(tok) * quads];
    float acc[kTileRows] = {};
    for (int c = 0; c < t.chunks; ++c) {
      const int qb = cm.begin[size_t(c)] / 4, qe = cm.begin[size_t(c) + 1] / 4;
      int32_t dsum[kTileRows] = {}, ssum[kTileRows] = {};
      for (int q = qb; q < qe; ++q) {
        const uint8_t* cq = codes + size_t(q) * stride;
        const QuadTable& qt = tab[q];
        for (int i = 0; i < kTileRows; ++i) {
          const int lo = quad_nibble(cq, w.layout, i, 0), hi = quad_nibble(cq, w.layout, i, 1);
          dsum[i] += qt.d_lo[lo] + qt.d_hi[hi];
          ssum[i] += qt.s_lo[lo] + qt.s_hi[hi];
        }
      }
      const float xs = t.scale[size_t(tok) * t.chunks + c];
      const uint16_t* ts = &w.scales[(size_t(tile) * G + size_t(cm.group[size_t(c)])) * 2 * kTileRows];
      for (int i = 0; i < kTileRows; ++i) {
        const float part = std::fma(half_to_float(ts[kTileRows + i]), float(ssum[i]),
                                    half_to_float(ts[i]) * float(dsum[i]));
        acc[i] = std::fma(xs, part, acc[i]);
      }
    }
    float* yt = y + size_t(tok) * p.rows + r0;
    for (int i = 0; i < nr; ++i) yt[i] = acc[i];
  }
}

void pair_sign_patterns(int8_t pa[32], int8_t pb[32]) {
  for (int idx = 0; idx < 16; ++idx) {
    const int c0 = idx & 3, c1 = idx >> 2;
    const int sa = c0 == kCodePlus ? 1 : c0 == kCodeMinus ? -1 : 0;
    const int sb = c1 == kCodePlus ? 1 : c1 == kCodeMinus ? -1 : 0;
    pa[idx] = int8_t(sa);
    pa[16 + idx] = int8_t(sa != 0);
    pb[idx] = int8_t(sb);
    pb[16 + idx] = int8_t(sb != 0);
  }
}

float quantize_chunk(const float* x, int b, int e, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;  // a NaN/inf activation makes the chunk scale NaN, so every output of the token is NaN
  for (int j = b; j < e; ++j) {
    amax = std::max(amax, std::fabs(x[j]));
    finite = finite && std::isfinite(x[j]);
  }
  const float inv = amax > 0.0f && finite ? float(kActMax) / amax : 0.0f;
  for (int j = b; j < e; ++j) {
    const float v = finite ? std::nearbyint(x[j] * inv) : 0.0f;
    q[j - b] = int8_t(std::min(float(kActMax), std::max(-float(kActMax), v)));
  }
  return finite ? amax / float(kActMax) : NAN;
}

const float* scale_by_columns(const std::vector<float>& col_scales, const float* x, size_t tokens,
                              std::vector<float>* scratch) {
  if (col_scales.empty()) return x;
  const size_t k = col_scales.size();
  if (scratch->size() < tokens * k) scratch->resize(tokens * k);
  float* out = scratch->data();
  const float* c = col_scales.data();
  for (size_t t = 0; t < tokens; ++t)
    for (size_t j = 0; j < k; ++j) out[t * k + j] = x[t * k + j] * c[j];
  return out;
}

void run_tiles(const Kernel& k, const RuntimeWeight& w, const ChunkMap& cm, const ActTables& t, int tile_begin,
               int tile_end, int t_begin, int t_end, float* y) {
  int tile = tile_begin;
  if (k.multi != nullptr)
    for (; tile + k.multi_tiles <= tile_end; tile += k.multi_tiles) k.multi(w, cm, t, tile, t_begin, t_end, y);
  for (; tile < tile_end; ++tile) k.tile(w, cm, t, tile, t_begin, t_end, y);
}

void matmul(const RuntimeWeight& w, const Kernel& k, const float* x_in, int tokens, float* y) {
  std::vector<float> scaled;
  const float* x = scale_activations(w, x_in, size_t(tokens), &scaled);
  const ChunkMap cm = make_chunks(w.p.k, w.p.group_size);
  ActTables t;
  t.tokens = tokens;
  t.k = w.p.k;
  t.chunks = int(cm.group.size());
  t.tables.resize(size_t(tokens) * size_t(w.p.k / 4));
  t.scale.resize(size_t(tokens) * size_t(t.chunks));
  (k.tables ? k.tables : build_tables)(x, 0, tokens, cm, &t);
  run_tiles(k, w, cm, t, 0, w.tiles, 0, tokens, y);
  for (int tile = 0; tile < w.tiles; ++tile) add_salient_and_bias(w, x, tile, 0, tokens, y, salient_fn_for(k.tile));
}

void matmul(const RuntimeWeight& w, TileFn fn, const float* x, int tokens, float* y, TableFn tables) {
  const Kernel k{"", false, nullptr, fn, tables};
  matmul(w, k, x, tokens, y);
}

TileFn tile_fn_by_name(const char* name) {
  if (std::strcmp(name, "generic") == 0) return tile_generic;
#if defined(PBS2P_HAVE_AVX2)
  if (std::strcmp(name, "avx2") == 0) {
    __builtin_cpu_init();
    // F16C from CPUID.1:ECX bit 29 (clang before 15 has no "f16c" for __builtin_cpu_supports); the avx2 check
    // also covers the OS saving the AVX state.
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c) return tile_avx2;
    return nullptr;
  }
#endif
#if defined(PBS2P_HAVE_NEON)
  if (std::strcmp(name, "neon") == 0) return tile_neon;
#endif
  return nullptr;
}

TableFn table_fn_by_name(const char* name) {
#if defined(PBS2P_HAVE_AVX2)
  if (std::strcmp(name, "avx2") == 0) return tile_fn_by_name("avx2") ? build_tables_avx2 : nullptr;
#endif
  return tile_fn_by_name(name) ? build_tables_generic : nullptr;
}

void build_tables(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t) {
  static const TableFn fn = [] {
    const char* name = nullptr;
    best_tile_fn(&name);
    return table_fn_by_name(name);
  }();
  fn(x, token_begin, token_end, cm, t);
}

TileFn best_tile_fn(const char** name) {
  static const char* const order[] = {"avx2", "neon", "generic"};
  const char* forced = std::getenv("PBS2P_KERNEL");  // testing / benchmarking override
  if (forced != nullptr && *forced != '\0') {
    if (TileFn fn = tile_fn_by_name(forced)) {
      if (name) *name = forced;
      return fn;
    }
  }
  for (const char* n : order)
    if (TileFn fn = tile_fn_by_name(n)) {
      if (name) *name = n;
      return fn;
    }
  if (name) *name = "generic";
  return tile_generic;
}

}  // namespace pbs2p

// Compact kernels: read the disk layout (mask bits + kept signs + fp16 scales) in place. Shared parts (prepare,
// activation quantization, bit extraction, salient + bias), the scalar kernel and the kernel registry.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../kernels.h"

#if defined(PBS2P_HAVE_AVX2) || defined(PBS2P_HAVE_AVX512)
#include <cpuid.h>
#endif

namespace pbs2p {
namespace {

size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }
inline bool bit(const uint8_t* bits, size_t i) { return (bits[i >> 3] >> (i & 7)) & 1u; }

// Portable bit deposit: the low popcount(mask) bits of src placed at mask's set bits (BMI2 pdep).
inline uint64_t deposit(uint64_t src, uint64_t mask) {
  uint64_t out = 0;
  for (uint64_t b = 1; mask != 0; b <<= 1) {
    if (src & b) out |= mask & (~mask + 1);
    mask &= mask - 1;
  }
  return out;
}

}  // namespace

std::string prepare(const DiskView& d, CompactWeight* w) {
  Params p;
  std::string e = parse_header(d.header, d.header_len, &p);
  if (e.empty()) e = validate(d, p);
  if (!e.empty()) return e;
  w->p = p;
  w->d = d;
  w->mask_row = ceil_div(size_t(p.k), 8);
  w->sign_row = ceil_div(size_t(p.k) / size_t(p.m) * size_t(p.n), 8);
  w->sal_row = p.salient ? ceil_div(size_t(p.groups) * size_t(p.salient), 8) : 0;
  w->cm = make_chunks(p.k, p.group_size);
  const size_t chunks = w->cm.group.size();
  w->kept_base.resize(chunks);
  w->pre_bits.resize(chunks);
  for (size_t c = 0; c < chunks; ++c) {
    const int b = w->cm.begin[c];
    w->kept_base[c] = int64_t(b / p.m) * p.n;
    w->pre_bits[c] = b % p.m;
  }
  w->col_scales.resize(p.has_col_scales ? size_t(p.k) : 0);
  for (size_t j = 0; j < w->col_scales.size(); ++j) w->col_scales[j] = half_to_float(d.col_scales[j]);
  return "";
}

void chunk_bits(const CompactWeight& w, int r, int c, uint64_t* mask, uint64_t* signs) {
  const uint8_t* mrow = w.d.mask + size_t(r) * w.mask_row;
  const int b = w.cm.begin[size_t(c)], len = w.cm.begin[size_t(c) + 1] - b;
  const uint64_t m = bits_at(mrow, w.mask_row, size_t(b), len);
  int64_t kept = w.kept_base[size_t(c)];
  if (const int pre = w.pre_bits[size_t(c)]) kept += __builtin_popcountll(bits_at(mrow, w.mask_row, size_t(b - pre), pre));
  *mask = m;
  *signs = bits_at(w.d.signs + size_t(r) * w.sign_row, w.sign_row, size_t(kept), __builtin_popcountll(m));
}

void size_quant(int tokens, const ChunkMap& cm, QuantActs* a) {
  const int chunks = int(cm.group.size());
  a->tokens = tokens;
  a->chunks = chunks;
  const size_t nq = size_t(tokens) * size_t(chunks) * kChunkCols, ns = size_t(tokens) * size_t(chunks);
  if (a->q.size() < nq) a->q.resize(nq);
  if (a->scale.size() < ns) a->scale.resize(ns);
}

void quantize(const float* x, int k, int tokens, const ChunkMap& cm, QuantActs* a) {
  size_quant(tokens, cm, a);
  quantize_tokens(x, k, 0, tokens, cm, a);
}

void quantize_tokens(const float* x, int k, int t0, int t1, const ChunkMap& cm, QuantActs* a) {
  const int chunks = a->chunks;
  for (int tok = t0; tok < t1; ++tok) {
    const float* xt = x + size_t(tok) * size_t(k);
    for (int c = 0; c < chunks; ++c) {
      const int b = cm.begin[size_t(c)], e = cm.begin[size_t(c) + 1];
      int8_t* q = &a->q[(size_t(tok) * chunks + c) * kChunkCols];
      std::memset(q, 0, kChunkCols);
      a->scale[size_t(tok) * chunks + c] = quantize_chunk(xt, b, e, q);
    }
  }
}

void add_salient_and_bias_compact(const CompactWeight& w, const float* x, int r0, int r1, int t0, int t1, float* y,
                                  size_t ldy, SalientFn fn) {
  const Params& p = w.p;
  if (!p.salient && !w.d.bias_len) return;
  const size_t G = size_t(p.groups), S = size_t(p.salient);
  // Per kTileRows-row block the tile layout's coefficients ([G][S][rows] +1/-1/0) and alpha2 ([G][rows]), built
  // from the disk bits once per call instead of once per token; lanes past the block's rows stay 0.
  thread_local std::vector<int8_t> coef;
  thread_local std::vector<uint16_t> a2;
  coef.resize(G * S * kTileRows);
  a2.resize(G * kTileRows);
  for (int rb = r0; rb < r1; rb += kTileRows) {
    SalientBlock b;
    b.groups = p.groups;
    b.salient = p.salient;
    b.nr = std::min(kTileRows, r1 - rb);
    b.k = p.k;
    b.cols = w.d.salient_cols;
    b.coef = coef.data();
    b.alpha2 = a2.data();
    b.bias = w.d.bias_len ? w.d.bias + rb : nullptr;
    if (S) {
      std::fill(coef.begin(), coef.end(), int8_t(0));
      std::fill(a2.begin(), a2.end(), uint16_t(0));
      for (int i = 0; i < b.nr; ++i) {
        const size_t r = size_t(rb + i);
        const uint8_t* mrow = w.d.mask + r * w.mask_row;
        const uint8_t* srow = w.d.salient_signs + r * w.sal_row;
        for (size_t g = 0; g < G; ++g) {
          a2[g * kTileRows + size_t(i)] = w.d.alpha2[r * G + g];
          for (size_t s2 = 0; s2 < S; ++s2) {
            const int kept = bit(mrow, size_t(w.d.salient_cols[g * S + s2]));
            const int plus = bit(srow, g * S + s2);
            coef[(g * S + s2) * kTileRows + size_t(i)] = int8_t(kept * (2 * plus - 1));
          }
        }
      }
    }
    fn(b, x, t0, t1, y + rb, ldy);
  }
}

// Scalar compact kernel: per row and chunk, decode the bits once, then exact integer sums for every token.
void rows_generic(PBS2P_ROWS_ARGS) {
  const Params& p = w.p;
  const size_t G = size_t(p.groups);
  const int chunks = a.chunks;
  for (int r = r0; r < r1; ++r) {
    for (int t = t0; t < t1; ++t) y[size_t(t) * ldy + size_t(r)] = 0.0f;
    for (int c = 0; c < chunks; ++c) {
      uint64_t m = 0, s = 0;
      chunk_bits(w, r, c, &m, &s);
      const uint64_t plus = deposit(s, m);
      const size_t sc = (size_t(r) * G + size_t(w.cm.group[size_t(c)])) * 2;
      const float alpha = half_to_float(w.d.scales[sc]), mu = half_to_float(w.d.scales[sc + 1]);
      for (int t = t0; t < t1; ++t) {
        const int8_t* q = &a.q[(size_t(t) * chunks + c) * kChunkCols];
        int32_t sum_kept = 0, sum_plus = 0;
        for (uint64_t mm = m; mm != 0; mm &= mm - 1) {
          const int j = __builtin_ctzll(mm);
          sum_kept += q[j];
          if ((plus >> j) & 1u) sum_plus += q[j];
        }
        const int32_t dsum = 2 * sum_plus - sum_kept;
        const float part = std::fma(mu, float(sum_kept), alpha * float(dsum));
        float& yv = y[size_t(t) * ldy + size_t(r)];
        yv = std::fma(a.scale[size_t(t) * chunks + c], part, yv);
      }
    }
  }
  add_salient_and_bias_compact(w, x, r0, r1, t0, t1, y, ldy);
}

// ---------------- registry ----------------

namespace {

#if defined(PBS2P_HAVE_AVX2) || defined(PBS2P_HAVE_AVX512)
bool os_saves_zmm() {  // XCR0: SSE, AVX and the three AVX-512 state components enabled by the OS
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xe6u) == 0xe6u;
}
bool cpu_has_avx512vnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool f = ebx & (1u << 16), bw = ebx & (1u << 30), vl = ebx & (1u << 31), bmi2 = ebx & (1u << 8);
  const bool vnni = ecx & (1u << 11);
  return f && bw && vl && bmi2 && vnni && os_saves_zmm();
}
#endif
#if defined(PBS2P_HAVE_AVX512VBMI)
bool cpu_has_avx512vbmi() {  // vpermb (leaf 7 ECX bit 1) beside AVX-512 F/BW/VL and the zmm state
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool f = ebx & (1u << 16), bw = ebx & (1u << 30), vl = ebx & (1u << 31), vbmi = ecx & (1u << 1);
  return f && bw && vl && vbmi && os_saves_zmm();
}
#endif
#if defined(PBS2P_HAVE_AVXVNNI)
// AVX-VNNI: CPUID.(EAX=7,ECX=1):EAX bit 4, with AVX2 (leaf 7 EBX bit 5), AVX/FMA/F16C (leaf 1 ECX bits 28, 12,
// 29) and the OS saving the SSE and AVX (ymm) state (OSXSAVE, XCR0 bits 1-2). No AVX-512 needed.
bool cpu_has_avxvnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool osxsave = ecx & (1u << 27), avx = ecx & (1u << 28), fma = ecx & (1u << 12), f16c = ecx & (1u << 29);
  if (!osxsave || !avx || !fma || !f16c) return false;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0x6u) != 0x6u) return false;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(ebx & (1u << 5))) return false;  // AVX2
  if (eax < 1) return false;  // no subleaf 1
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  return (a1 & (1u << 4)) != 0;
}
#endif

const Kernel kGeneric{"generic", true, rows_generic, nullptr, nullptr};
#if defined(PBS2P_HAVE_AVX512)
const Kernel kAvx512{"avx512-vnni", true, rows_avx512vnni, nullptr, nullptr};
#endif
#if defined(PBS2P_HAVE_AVX2)
const Kernel kAvx2Tile{"avx2", false, nullptr, tile_avx2, build_tables_avx2};
#endif
#if defined(PBS2P_HAVE_AVX512) && defined(PBS2P_HAVE_AVX2)
const Kernel kAvx512Hybrid{"avx512-vnni+avx2", true, rows_avx512vnni, nullptr, nullptr, &kAvx2Tile};
// One copy (the tile layout): avx2 table lookups for decode, AVX-512 VNNI dot products over the codes for prefill.
const Kernel kAvx512Tile{"avx512-vnni-tile", false, nullptr, tile_avx2, build_tables_avx2, nullptr, tile_gemm_avx512vnni};
#endif
#if defined(PBS2P_HAVE_AVX512VBMI)
// The same one copy, its codes in row pairs: vpermb lookups for decode (four tiles per pass), the same VNNI GEMM
// for prefill.
const Kernel kAvx512VbmiTile{"avx512-vbmi-tile", false,   nullptr,          tile_avx512vbmi, build_tables_avx2_paired,
                             nullptr,            tile_gemm_avx512vnni, kLayoutRowPairs, true, tile_quad_avx512vbmi, 4};
#endif
#if defined(PBS2P_HAVE_AVXVNNI) && defined(PBS2P_HAVE_AVX2)
// The same one copy for CPUs with AVX-VNNI but no AVX-512: avx2 lookups for decode, 256-bit VNNI for prefill.
const Kernel kAvxVnniTile{"avxvnni-tile", false, nullptr, tile_avx2, build_tables_avx2, nullptr, tile_gemm_avxvnni};
#endif
#if defined(PBS2P_HAVE_NEON)
const Kernel kNeonTile{"neon", false, nullptr, tile_neon, build_tables_neon};
#endif
#if defined(PBS2P_HAVE_SDOT) && defined(PBS2P_HAVE_NEON)
const Kernel kSdot{"sdot", true, rows_sdot, nullptr, nullptr};
const Kernel kSdotHybrid{"sdot+neon", true, rows_sdot, nullptr, nullptr, &kNeonTile};
#endif

}  // namespace

const std::vector<const Kernel*>& built_kernels() {
  static const std::vector<const Kernel*> all = {
#if defined(PBS2P_HAVE_AVX512VBMI)
      &kAvx512VbmiTile,  // default where VBMI is there: avx512-vnni-tile's one copy, faster decode
#endif
#if defined(PBS2P_HAVE_AVX512) && defined(PBS2P_HAVE_AVX2)
      &kAvx512Tile,    // one copy: the hybrid's decode and prefill speed
#endif
#if defined(PBS2P_HAVE_AVXVNNI) && defined(PBS2P_HAVE_AVX2)
      &kAvxVnniTile,   // default where AVX-VNNI has no AVX-512 beside it
#endif
#if defined(PBS2P_HAVE_AVX512) && defined(PBS2P_HAVE_AVX2)
      &kAvx512Hybrid,
#endif
#if defined(PBS2P_HAVE_AVX512)
      &kAvx512,
#endif
#if defined(PBS2P_HAVE_AVX2)
      &kAvx2Tile,
#endif
#if defined(PBS2P_HAVE_SDOT) && defined(PBS2P_HAVE_NEON)
      &kSdotHybrid, &kSdot,
#endif
#if defined(PBS2P_HAVE_NEON)
      &kNeonTile,
#endif
      &kGeneric};
  return all;
}

bool kernel_supported(const Kernel& k) {
  if (k.gemv != nullptr && !kernel_supported(*k.gemv)) return false;
#if defined(PBS2P_HAVE_AVX512)
  if (k.gemm == tile_gemm_avx512vnni && !cpu_has_avx512vnni()) return false;
#endif
#if defined(PBS2P_HAVE_AVXVNNI)
  if (k.gemm == tile_gemm_avxvnni && !cpu_has_avxvnni()) return false;
#endif
#if defined(PBS2P_HAVE_AVX512)
  // its post-pass is the AVX2 one (salient_block_avx2): checked too, though every AVX-512 CPU has it
  if (k.rows == rows_avx512vnni) return cpu_has_avx512vnni() && tile_fn_by_name("avx2") != nullptr;
#endif
#if defined(PBS2P_HAVE_SDOT)
  if (k.rows == rows_sdot) return cpu_has_dotprod();
#endif
  if (k.compact) return true;
#if defined(PBS2P_HAVE_AVX512VBMI)
  // its table builder and post-pass are the AVX2 ones: AVX2, FMA and F16C checked too (tile_fn_by_name)
  if (k.tile == tile_avx512vbmi) return cpu_has_avx512vbmi() && tile_fn_by_name("avx2") != nullptr;
#endif
  for (const char* isa : {"avx2", "neon", "generic"})  // the tile kernel's own CPU check
    if (k.tile == tile_fn_by_name(isa)) return true;
  return false;
}

const Kernel* kernel_by_name(const char* name) {
  for (const Kernel* k : built_kernels())
    if (std::strcmp(k->name, name) == 0) return kernel_supported(*k) ? k : nullptr;
  return nullptr;
}

std::string select_kernel(const Kernel** out) {
  const char* forced = std::getenv("PBS2P_KERNEL");  // tests / benchmarks
  if (forced != nullptr && *forced != '\0') {
    std::string names;
    for (const Kernel* k : built_kernels()) {
      names += (names.empty() ? "" : ", ") + std::string(k->name);
      if (std::strcmp(k->name, forced) == 0) {
        if (!kernel_supported(*k)) return "PBS2P_KERNEL=" + std::string(forced) + ": this CPU cannot run that path";
        *out = k;
        return "";
      }
    }
    return "PBS2P_KERNEL=" + std::string(forced) + " is not a kernel of this build (built: " + names + ")";
  }
  for (const Kernel* k : built_kernels())
    if (kernel_supported(*k)) {
      *out = k;
      return "";
    }
  *out = &kGeneric;
  return "";
}

std::string matmul_disk(const DiskView& d, const Kernel& k, const float* x, int tokens, float* y) {
  if (k.gemv != nullptr && tokens <= kHybridGemv) return matmul_disk(d, *k.gemv, x, tokens, y);
  if (!k.compact) {
    RuntimeWeight rw;
    const std::string e = repack_for(d, k, &rw);
    if (!e.empty()) return e;
    if (k.gemm == nullptr || tokens <= kHybridGemv) {
      matmul(rw, k, x, tokens, y);
      return "";
    }
    std::vector<float> scaled;
    const float* xs = scale_activations(rw, x, size_t(tokens), &scaled);
    const ChunkMap cm = make_chunks(rw.p.k, rw.p.group_size);
    QuantActs a;
    quantize(xs, rw.p.k, tokens, cm, &a);
    for (int tile = 0; tile < rw.tiles; ++tile) {
      k.gemm(rw, cm, a, tile, 0, tokens, y);
      add_salient_and_bias(rw, xs, tile, 0, tokens, y, salient_fn_for(k.tile));
    }
    return "";
  }
  CompactWeight w;
  const std::string e = prepare(d, &w);
  if (!e.empty()) return e;
  std::vector<float> scaled;
  const float* xs = scale_activations(w, x, size_t(tokens), &scaled);
  QuantActs a;
  quantize(xs, w.p.k, tokens, w.cm, &a);
  k.rows(w, a, xs, 0, w.p.rows, 0, tokens, y, size_t(w.p.rows));
  return "";
}

}  // namespace pbs2p

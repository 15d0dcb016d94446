// AVX-512 VNNI compact kernel (AVX-512 F/BW/VL + VNNI + BMI2): reads the disk layout in place.
// Per 16-row block and chunk (<= 64 columns of one group):
//   plus = pdep(kept signs, mask) per row (BMI2); masked byte moves turn mask / plus into 0/1 byte planes;
//   S = sum of q over kept weights, P = sum over +1 weights (vpdpbusd: u8 plane x s8 int7 activations);
//   D = 2P - S; y = fma(scale, fma(mu, S, alpha * D), y)   (the scalar kernel's order, identical bits).
// Few tokens: per row dot products then a 16 x 16 transposing reduction. Many tokens (prefill): the two planes
// are transposed once per block and chunk to [4 columns][16 rows] dwords, then each token needs 2 vpdpbusd per
// 4 columns with a broadcast activation dword, lanes = rows (no reduction).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "../kernels.h"

namespace pbs2p {
namespace {

constexpr int kRows = 16;
constexpr int kGemmTokens = 4;  // from this many tokens on, the transposed (GEMM) form

// acc += per dword, the 4 products u8 a x s8 b (vpdpbusd). Inline asm with the accumulator tied, as in
// tile_gemm_avxvnni.cpp: around _mm512_dpbusd_epi32 on accumulator arrays GCC 12 copies every accumulator into a
// spare register and back (two moves per vpdpbusd) and spills, which halved the tile GEMM's rate.
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// lane i of the result = sum of the 16 dwords of v[i]
inline __m512i reduce16(const __m512i* v) {
  __m512i a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)
    a[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)
    b[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_epi64(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 2; ++k)
    c[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * k], b[2 * k + 1], 0x88),
                            _mm512_shuffle_i32x4(b[2 * k], b[2 * k + 1], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xdd));
}

// in-place 16 x 16 dword transpose: r[i] dword j -> r[j] dword i
inline void transpose16(__m512i* r) {
  __m512i a[16], b[16];
  for (int k = 0; k < 8; ++k) {
    a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    b[4 * k + 0] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
    b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
  }
  for (int p = 0; p < 4; ++p) {
    const __m512i x0 = _mm512_shuffle_i32x4(b[p], b[4 + p], 0x88), y0 = _mm512_shuffle_i32x4(b[p], b[4 + p], 0xdd);
    const __m512i x1 = _mm512_shuffle_i32x4(b[8 + p], b[12 + p], 0x88),
                  y1 = _mm512_shuffle_i32x4(b[8 + p], b[12 + p], 0xdd);
    r[p] = _mm512_shuffle_i32x4(x0, x1, 0x88);
    r[8 + p] = _mm512_shuffle_i32x4(x0, x1, 0xdd);
    r[4 + p] = _mm512_shuffle_i32x4(y0, y1, 0x88);
    r[12 + p] = _mm512_shuffle_i32x4(y0, y1, 0xdd);
  }
}

// y[t][rows] = fma(scale, fma(mu, S, alpha * (2P - S)), y) for the block's rows (lane mask `rows`)
inline void accumulate(__m512i S, __m512i P, __m512 alpha, __m512 mu, float scale, __mmask16 rows, float* yt) {
  const __m512i D = _mm512_sub_epi32(_mm512_slli_epi32(P, 1), S);
  const __m512 part = _mm512_fmadd_ps(mu, _mm512_cvtepi32_ps(S), _mm512_mul_ps(alpha, _mm512_cvtepi32_ps(D)));
  const __m512 yv = _mm512_maskz_loadu_ps(rows, yt);
  _mm512_mask_storeu_ps(yt, rows, _mm512_fmadd_ps(_mm512_set1_ps(scale), part, yv));
}

}  // namespace

void rows_avx512vnni(PBS2P_ROWS_ARGS) {
  const Params& p = w.p;
  const size_t G = size_t(p.groups);
  const int chunks = a.chunks;
  const __m512i ones = _mm512_set1_epi8(1);
  alignas(64) uint64_t mw[kRows], pw[kRows];
  alignas(64) uint32_t am[kRows];
  size_t kept[kRows];  // per row: sign bits consumed by the chunks before (chunks run in column order)
  alignas(64) __m512i planes_m[kRows], planes_p[kRows];
  for (int rb = r0; rb < r1; rb += kRows) {
    const int nr = std::min(kRows, r1 - rb);
    const __mmask16 rows = __mmask16((1u << nr) - 1u);
    for (int t = t0; t < t1; ++t) _mm512_mask_storeu_ps(y + size_t(t) * ldy + size_t(rb), rows, _mm512_setzero_ps());
    for (int i = 0; i < kRows; ++i) kept[i] = 0;
    for (int c = 0; c < chunks; ++c) {
      const size_t g = size_t(w.cm.group[size_t(c)]);
      const int b = w.cm.begin[size_t(c)], len = w.cm.begin[size_t(c) + 1] - b;
      // whole-word loads when the chunk's mask bits start on a byte and 8 bytes stay inside the row
      const bool fast_mask = (b & 7) == 0 && size_t(b >> 3) + 8 <= w.mask_row;
      for (int i = 0; i < kRows; ++i) {
        if (i < nr) {
          const size_t r = size_t(rb + i);
          const uint8_t* mrow = w.d.mask + r * w.mask_row;
          uint64_t m;
          if (fast_mask) {
            std::memcpy(&m, mrow + (b >> 3), 8);
            m = _bzhi_u64(m, unsigned(len));
          } else {
            m = bits_at(mrow, w.mask_row, size_t(b), len);
          }
          const int pc = int(_mm_popcnt_u64(m));
          const uint8_t* srow = w.d.signs + r * w.sign_row;
          const size_t pos = kept[i], byte = pos >> 3;
          uint64_t s;
          if (byte + 8 <= w.sign_row && int(pos & 7) + pc <= 64) {
            std::memcpy(&s, srow + byte, 8);
            s = _bzhi_u64(s >> (pos & 7), unsigned(pc));
          } else {
            s = bits_at(srow, w.sign_row, pos, pc);
          }
          kept[i] = pos + size_t(pc);
          mw[i] = m;
          pw[i] = _pdep_u64(s, m);
          std::memcpy(&am[i], &w.d.scales[(r * G + g) * 2], 4);  // alpha | mu << 16
        } else {
          mw[i] = pw[i] = 0;
          am[i] = 0;
        }
      }
      const __m512i amv = _mm512_load_si512(am);
      const __m512 alpha = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_and_si512(amv, _mm512_set1_epi32(0xffff))));
      const __m512 mu = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(amv, 16)));
      const int8_t* qc = &a.q[size_t(c) * kChunkCols];
      const size_t qstride = size_t(chunks) * kChunkCols;
      if (t1 - t0 >= kGemmTokens) {
        const int quads = (w.cm.begin[size_t(c) + 1] - w.cm.begin[size_t(c)] + 3) / 4;
        for (int i = 0; i < kRows; ++i) {
          planes_m[i] = _mm512_maskz_mov_epi8(mw[i], ones);
          planes_p[i] = _mm512_maskz_mov_epi8(pw[i], ones);
        }
        transpose16(planes_m);
        transpose16(planes_p);
        for (int t = t0; t < t1; ++t) {
          const int8_t* q = qc + size_t(t) * qstride;
          __m512i S = _mm512_setzero_si512(), P = _mm512_setzero_si512();
          for (int j = 0; j < quads; ++j) {
            int32_t q4;
            std::memcpy(&q4, q + 4 * j, 4);
            const __m512i b = _mm512_set1_epi32(q4);
            S = dpbusd(S, planes_m[j], b);
            P = dpbusd(P, planes_p[j], b);
          }
          accumulate(S, P, alpha, mu, a.scale[size_t(t) * chunks + c], rows, y + size_t(t) * ldy + size_t(rb));
        }
      } else {
        for (int t = t0; t < t1; ++t) {
          const __m512i vq = _mm512_loadu_si512(qc + size_t(t) * qstride);
          __m512i vs[kRows], vp[kRows];
          for (int i = 0; i < kRows; ++i) {
            vs[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_maskz_mov_epi8(mw[i], ones), vq);
            vp[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_maskz_mov_epi8(pw[i], ones), vq);
          }
          accumulate(reduce16(vs), reduce16(vp), alpha, mu, a.scale[size_t(t) * chunks + c], rows,
                     y + size_t(t) * ldy + size_t(rb));
        }
      }
    }
  }
  add_salient_and_bias_compact(w, x, r0, r1, t0, t1, y, ldy, salient_block_avx2);  // AVX-512 implies AVX2/FMA/F16C
}

// Byte i of each dword: bit 2i of x (bits 0, 2, 4, 6 of a tile code byte -> 4 bytes 0/1).
static inline __m512i spread_codes(__m512i x) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i d = _mm512_and_si512(x, one);
  d = _mm512_or_si512(d, _mm512_and_si512(_mm512_slli_epi32(x, 6), _mm512_set1_epi32(0x100)));
  d = _mm512_or_si512(d, _mm512_and_si512(_mm512_slli_epi32(x, 12), _mm512_set1_epi32(0x10000)));
  return _mm512_or_si512(d, _mm512_and_si512(_mm512_slli_epi32(x, 18), _mm512_set1_epi32(0x1000000)));
}

// Per chunk: the 2-bit codes of the tile's 32 rows become, once, [4 columns][16 rows] dword planes of 0/1 bytes
// (kept = code != 0, +1 = code 1), the layout the compact GEMM transposes its bit planes into; then per token
// 4 vpdpbusd per 4 columns (two planes x two 16-row halves) with a broadcast activation dword.
namespace {

// One chunk's dot products of the tile's decoded planes with TB tokens at once: each plane register loaded once
// serves TB tokens (one token per pass was bound by its four plane loads per four vpdpbusd on CPUs that load one
// zmm per cycle). Per token the integer sums and float steps are the one-token pass's, so the bits are the same.
constexpr int kTokensPerPass = 4;
struct PlaneDots {
  const __m512i (*pm)[kChunkCols / 4];
  const __m512i (*pp)[kChunkCols / 4];
  const __m512* alpha;
  const __m512* mu;
  const __mmask16* rows;
  int nq;
  const int8_t* qc;
  size_t qstride;
  const float* scale;  // the chunk's scale of token 0; token t's at scale[t * scale_stride]
  size_t scale_stride;
  float* y;  // the tile's first row of token 0; token t's at y[t * ldy]
  size_t ldy;

  template <int TB>
  void run(int t) const {
    __m512i S0[TB], P0[TB], S1[TB], P1[TB];
    for (int u = 0; u < TB; ++u) S0[u] = P0[u] = S1[u] = P1[u] = _mm512_setzero_si512();
    for (int j = 0; j < nq; ++j) {
      const __m512i m0 = pm[0][j], p0 = pp[0][j], m1 = pm[1][j], p1 = pp[1][j];
#pragma GCC unroll 4
      for (int u = 0; u < TB; ++u) {
        int32_t q4;
        std::memcpy(&q4, qc + size_t(t + u) * qstride + 4 * size_t(j), 4);
        const __m512i b = _mm512_set1_epi32(q4);
        S0[u] = dpbusd(S0[u], m0, b);
        P0[u] = dpbusd(P0[u], p0, b);
        S1[u] = dpbusd(S1[u], m1, b);
        P1[u] = dpbusd(P1[u], p1, b);
      }
    }
    for (int u = 0; u < TB; ++u) {
      const float sc = scale[size_t(t + u) * scale_stride];
      float* yt = y + size_t(t + u) * ldy;
      accumulate(S0[u], P0[u], alpha[0], mu[0], sc, rows[0], yt);
      accumulate(S1[u], P1[u], alpha[1], mu[1], sc, rows[1], yt + kRows);
    }
  }
};

}  // namespace

void tile_gemm_avx512vnni(PBS2P_TILE_GEMM_ARGS) {
  const Params& p = w.p;
  const auto [r0, nr, quads, G, codes, stride] = tile_view(w, tile);
  const int chunks = a.chunks;
  const size_t qstride = size_t(chunks) * kChunkCols;
  const __mmask16 rows[2] = {__mmask16(nr >= kRows ? 0xffffu : (1u << nr) - 1u),
                             __mmask16(nr >= 2 * kRows ? 0xffffu : nr > kRows ? (1u << (nr - kRows)) - 1u : 0u)};
  const __m512i m55 = _mm512_set1_epi32(0x55), m0f = _mm512_set1_epi32(0x0f);
  alignas(64) __m512i pm[2][kChunkCols / 4], pp[2][kChunkCols / 4];
  for (int t = t0; t < t1; ++t)
    for (int h = 0; h < 2; ++h)
      _mm512_mask_storeu_ps(y + size_t(t) * size_t(p.rows) + size_t(r0 + kRows * h), rows[h], _mm512_setzero_ps());
  for (int c = 0; c < chunks; ++c) {
    const int qb = cm.begin[size_t(c)] / 4, nq = (cm.begin[size_t(c) + 1] - cm.begin[size_t(c)]) / 4;
    for (int j = 0; j < nq; ++j) {
      const uint8_t* block = codes + size_t(qb + j) * stride;
      __m512i rows16[2];  // dword i of half h: row 16h + i's code byte in bits 0-7 (bits above are not read)
      if (w.layout == kLayoutRowPairs) {  // bytes 2i, 2i+1 in one dword: low nibbles row i, high nibbles 16 + i
        const __m512i dw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
        const __m512i s4 = _mm512_srli_epi32(dw, 4);
        rows16[0] = _mm512_ternarylogic_epi32(dw, s4, m0f, 0xE4);  // m0f ? dw : dw >> 4
        rows16[1] = _mm512_ternarylogic_epi32(s4, _mm512_srli_epi32(dw, 8), m0f, 0xE4);
      } else {
        for (int h = 0; h < 2; ++h)
          rows16[h] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + kRows * h)));
      }
      for (int h = 0; h < 2; ++h) {
        const __m512i v = rows16[h];
        const __m512i plus = _mm512_and_si512(v, m55);
        const __m512i kept = _mm512_or_si512(plus, _mm512_and_si512(_mm512_srli_epi32(v, 1), m55));
        pm[h][j] = spread_codes(kept);
        pp[h][j] = spread_codes(plus);
      }
    }
    const uint16_t* ts = &w.scales[(size_t(tile) * G + size_t(cm.group[size_t(c)])) * 2 * kTileRows];
    __m512 alpha[2], mu[2];
    for (int h = 0; h < 2; ++h) {
      alpha[h] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ts + kRows * h)));
      mu[h] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ts + kTileRows + kRows * h)));
    }
    const int8_t* qc = &a.q[size_t(c) * kChunkCols];
    const PlaneDots dots{pm, pp, alpha, mu, rows, nq, qc, qstride, a.scale.data() + c, size_t(chunks),
                         y + size_t(r0), size_t(p.rows)};
    int t = t0;
    for (; t + kTokensPerPass <= t1; t += kTokensPerPass) dots.run<kTokensPerPass>(t);
    for (; t < t1; ++t) dots.run<1>(t);
  }
}

}  // namespace pbs2p

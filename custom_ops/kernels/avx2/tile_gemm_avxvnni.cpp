// AVX-VNNI tile GEMM (VEX-encoded 256-bit vpdpbusd + AVX2/FMA/F16C, no AVX-512): prefill over the tile copy for
// CPUs that have AVX-VNNI without AVX-512 (Intel Alder Lake and later client cores, AMD Zen 5 client).
// The arithmetic of tile_gemm_avx512vnni with 8-row ymm lanes instead of 16-row zmm lanes: per chunk the 2-bit
// codes of the tile's 32 rows become, once, [4 columns][8 rows] dword planes of 0/1 bytes (kept = code != 0,
// +1 = code 1) for each quarter of the tile; then per token 8 vpdpbusd per 4 columns (two planes x four 8-row
// quarters) against a broadcast activation dword: S = sum of q over kept weights, P = over +1 weights (exact
// integers), D = 2P - S, y = fma(scale, fma(mu, S, alpha * D), y), so identical bits to every other path.
// Built with -mavx2 -mfma -mf16c -mavxvnni only; runs after the CPUID check of kernel_supported().
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "../kernels.h"

namespace pbs2p {
namespace {

constexpr int kLanes = 8;                      // rows per ymm register of dwords
constexpr int kQuarters = kTileRows / kLanes;  // 4

// Byte i of each dword: bit 2i of x (bits 0, 2, 4, 6 of a tile code byte -> 4 bytes 0/1).
inline __m256i spread_codes(__m256i x) {
  __m256i d = _mm256_and_si256(x, _mm256_set1_epi32(1));
  d = _mm256_or_si256(d, _mm256_and_si256(_mm256_slli_epi32(x, 6), _mm256_set1_epi32(0x100)));
  d = _mm256_or_si256(d, _mm256_and_si256(_mm256_slli_epi32(x, 12), _mm256_set1_epi32(0x10000)));
  return _mm256_or_si256(d, _mm256_and_si256(_mm256_slli_epi32(x, 18), _mm256_set1_epi32(0x1000000)));
}

// acc += per dword, the 4 products u8 a x s8 b (VEX vpdpbusd). Inline asm with the accumulator tied: GCC 12
// copies every accumulator through a spare register around _mm256_dpbusd_avx_epi32 and then spills.
inline __m256i dpbusd(__m256i acc, __m256i a, __m256i b) {
  __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
  return acc;
}

// y[rows of one quarter] = fma(scale, fma(mu, S, alpha * (2P - S)), y); `lanes` = rows of the quarter in the
// matrix (8 for a full quarter, else a masked load/store of the first `lanes`).
inline void accumulate(__m256i S, __m256i P, __m256 alpha, __m256 mu, float scale, int lanes, float* yt) {
  const __m256i D = _mm256_sub_epi32(_mm256_slli_epi32(P, 1), S);
  const __m256 part = _mm256_fmadd_ps(mu, _mm256_cvtepi32_ps(S), _mm256_mul_ps(alpha, _mm256_cvtepi32_ps(D)));
  const __m256 sv = _mm256_set1_ps(scale);
  if (lanes == kLanes) {
    _mm256_storeu_ps(yt, _mm256_fmadd_ps(sv, part, _mm256_loadu_ps(yt)));
  } else {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(yt, mask, _mm256_fmadd_ps(sv, part, _mm256_maskload_ps(yt, mask)));
  }
}

// T tokens x quarters h, h + 1 of one chunk: 4T accumulators (S and P per token and quarter), so each plane load
// serves T tokens (16 ymm registers: 4T accumulators + 4 planes + the broadcast). Quarters >= live are skipped by
// the caller in pairs; a pair's second quarter past the last row has lanes[h + 1] == 0 and is not written.
template <int T>  // 1 or 2
inline void half_tile(const __m256i (*pm)[kQuarters], const __m256i (*pp)[kQuarters], int nq, int h, const int8_t* q,
                      size_t qstride, const float* alpha, const float* mu, const float* scale, int chunks,
                      const int* lanes, float* y, size_t ldy) {
  // named accumulators (not arrays): GCC keeps them in registers instead of copying them around every vpdpbusd
  __m256i S0a = _mm256_setzero_si256(), P0a = S0a, S1a = S0a, P1a = S0a, S0b = S0a, P0b = S0a, S1b = S0a, P1b = S0a;
  const int8_t* qa = q;
  const int8_t* qb = q + (T > 1 ? qstride : 0);
  for (int j = 0; j < nq; ++j) {
    const __m256i m0 = pm[j][h], m1 = pm[j][h + 1], p0 = pp[j][h], p1 = pp[j][h + 1];
    int32_t q4;
    std::memcpy(&q4, qa + 4 * j, 4);
    const __m256i ba = _mm256_set1_epi32(q4);
    S0a = dpbusd(S0a, m0, ba);
    P0a = dpbusd(P0a, p0, ba);
    S1a = dpbusd(S1a, m1, ba);
    P1a = dpbusd(P1a, p1, ba);
    if (T > 1) {
      std::memcpy(&q4, qb + 4 * j, 4);
      const __m256i bb = _mm256_set1_epi32(q4);
      S0b = dpbusd(S0b, m0, bb);
      P0b = dpbusd(P0b, p0, bb);
      S1b = dpbusd(S1b, m1, bb);
      P1b = dpbusd(P1b, p1, bb);
    }
  }
  const __m256i S0[2] = {S0a, S0b}, P0[2] = {P0a, P0b}, S1[2] = {S1a, S1b}, P1[2] = {P1a, P1b};
  for (int i = 0; i < T; ++i) {
    float* yt = y + size_t(i) * ldy + size_t(kLanes * h);
    const float s = scale[size_t(i) * size_t(chunks)];
    accumulate(S0[i], P0[i], _mm256_load_ps(alpha + kLanes * h), _mm256_load_ps(mu + kLanes * h), s, lanes[h], yt);
    if (lanes[h + 1] > 0)
      accumulate(S1[i], P1[i], _mm256_load_ps(alpha + kLanes * (h + 1)), _mm256_load_ps(mu + kLanes * (h + 1)), s,
                 lanes[h + 1], yt + kLanes);
  }
}

}  // namespace

void tile_gemm_avxvnni(PBS2P_TILE_GEMM_ARGS) {
  const Params& p = w.p;
  const int r0 = tile * kTileRows, nr = std::min(kTileRows, p.rows - r0);
  const size_t quads = size_t(p.k) / 4, G = size_t(p.groups);
  const uint8_t* codes = &w.codes[size_t(tile) * quads * kTileRows];
  const int chunks = a.chunks;
  const size_t qstride = size_t(chunks) * kChunkCols;
  int lanes[kQuarters];  // rows of each quarter inside the matrix (0 = quarter past the last row)
  for (int h = 0; h < kQuarters; ++h) lanes[h] = std::max(0, std::min(kLanes, nr - kLanes * h));
  const int live = (nr + kLanes - 1) / kLanes;  // quarters holding rows
  const __m256i m55 = _mm256_set1_epi32(0x55);
  alignas(32) __m256i pm[kChunkCols / 4][kQuarters], pp[kChunkCols / 4][kQuarters];
  for (int t = t0; t < t1; ++t) std::fill_n(y + size_t(t) * size_t(p.rows) + size_t(r0), size_t(nr), 0.0f);
  for (int c = 0; c < chunks; ++c) {
    const int qb = cm.begin[size_t(c)] / 4, nq = (cm.begin[size_t(c) + 1] - cm.begin[size_t(c)]) / 4;
    for (int j = 0; j < nq; ++j)
      for (int h = 0; h < kQuarters; ++h) {
        const __m256i v = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + size_t(qb + j) * kTileRows + kLanes * h)));
        const __m256i plus = _mm256_and_si256(v, m55);
        const __m256i kept = _mm256_or_si256(plus, _mm256_and_si256(_mm256_srli_epi32(v, 1), m55));
        pm[j][h] = spread_codes(kept);
        pp[j][h] = spread_codes(plus);
      }
    const uint16_t* ts = &w.scales[(size_t(tile) * G + size_t(cm.group[size_t(c)])) * 2 * kTileRows];
    alignas(32) float alpha[kTileRows], mu[kTileRows];
    for (int h = 0; h < kQuarters; ++h) {
      _mm256_store_ps(alpha + kLanes * h,
                      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ts + kLanes * h))));
      _mm256_store_ps(mu + kLanes * h,
                      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ts + kTileRows + kLanes * h))));
    }
    const int8_t* qc = &a.q[size_t(c) * kChunkCols];
    const float* sc = &a.scale[size_t(c)];
    int t = t0;
    for (; t + 2 <= t1; t += 2)
      for (int h = 0; h < live; h += 2)
        half_tile<2>(pm, pp, nq, h, qc + size_t(t) * qstride, qstride, alpha, mu, sc + size_t(t) * chunks, chunks,
                     lanes, y + size_t(t) * size_t(p.rows) + size_t(r0), size_t(p.rows));
    if (t < t1)
      for (int h = 0; h < live; h += 2)
        half_tile<1>(pm, pp, nq, h, qc + size_t(t) * qstride, qstride, alpha, mu, sc + size_t(t) * chunks, chunks,
                     lanes, y + size_t(t) * size_t(p.rows) + size_t(r0), size_t(p.rows));
  }
}

}  // namespace pbs2p

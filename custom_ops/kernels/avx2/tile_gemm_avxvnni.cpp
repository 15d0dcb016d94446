// AVX-VNNI tile GEMM (VEX-encoded 256-bit vpdpbusd + AVX2/FMA/F16C, no AVX-512): prefill over the tile copy for
// CPUs that have AVX-VNNI without AVX-512 (Intel Alder Lake and later client cores, Sierra Forest).
// The arithmetic of tile_gemm_avx512vnni with 8-row ymm lanes instead of 16-row zmm lanes: per chunk the 2-bit
// codes of the tile's 32 rows become, once, [4 columns][8 rows] dword planes of 0/1 bytes (kept = code != 0,
// +1 = code 1) for each quarter of the tile (6 instructions per plane pair: broadcast, vpshufb, 2 x and + min);
// then per token 8 vpdpbusd per 4 columns (two planes x four 8-row quarters) against a broadcast activation
// dword: S = sum of q over kept weights, P = over +1 weights (exact integers), D = 2P - S,
// y = fma(scale, fma(mu, S, alpha * D), y), so identical bits to every other path.
// Built with -mavx2 -mfma -mf16c -mavxvnni only; runs after the CPUID check of kernel_supported().
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "../kernels.h"

namespace pbs2p {
namespace {

constexpr int kLanes = 8;                      // rows per ymm register of dwords
constexpr int kQuarters = kTileRows / kLanes;  // 4
// Register block of the token loop: 2 tokens x 2 quarters (8 accumulators + 4 planes + 1 broadcast of the 16 ymm
// registers); 4 x 1 and 6 x 1 measured the same as 2 x 2 at 4096x4096, M=128 (pbs2p_kernel_bench, shared Zen 4).
constexpr int kBlockTokens = 2, kBlockQuarters = 2;

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

// T tokens x Q quarters (from quarter h) of one chunk: 2TQ accumulators (S and P per token and quarter), each
// plane load serves T tokens (16 ymm registers: 2TQ accumulators + 2Q planes + the broadcast). A quarter past
// the last row has lanes == 0 and is not written.
template <int T, int Q>
inline void block(const __m256i (*pm)[kQuarters], const __m256i (*pp)[kQuarters], int nq, int h, const int8_t* q,
                  size_t qstride, const float* alpha, const float* mu, const float* scale, int chunks,
                  const int* lanes, float* y, size_t ldy) {
  __m256i S[T][Q], P[T][Q];
  for (int i = 0; i < T; ++i)
    for (int g = 0; g < Q; ++g) S[i][g] = P[i][g] = _mm256_setzero_si256();
  for (int j = 0; j < nq; ++j) {
    __m256i m[Q], pl[Q];
    for (int g = 0; g < Q; ++g) {
      m[g] = pm[j][h + g];
      pl[g] = pp[j][h + g];
    }
    for (int i = 0; i < T; ++i) {
      int32_t q4;
      std::memcpy(&q4, q + size_t(i) * qstride + 4 * size_t(j), 4);
      const __m256i b = _mm256_set1_epi32(q4);
      for (int g = 0; g < Q; ++g) {
        S[i][g] = dpbusd(S[i][g], m[g], b);
        P[i][g] = dpbusd(P[i][g], pl[g], b);
      }
    }
  }
  for (int i = 0; i < T; ++i) {
    const float s = scale[size_t(i) * size_t(chunks)];
    for (int g = 0; g < Q; ++g)
      if (lanes[h + g] > 0)
        accumulate(S[i][g], P[i][g], _mm256_load_ps(alpha + kLanes * (h + g)), _mm256_load_ps(mu + kLanes * (h + g)),
                   s, lanes[h + g], y + size_t(i) * ldy + size_t(kLanes * (h + g)));
  }
}

}  // namespace

void tile_gemm_avxvnni(PBS2P_TILE_GEMM_ARGS) {
  const Params& p = w.p;
  const auto [r0, nr, quads, G, codes, stride] = tile_view(w, tile);
  const int chunks = a.chunks;
  const size_t qstride = size_t(chunks) * kChunkCols;
  int lanes[kQuarters];  // rows of each quarter inside the matrix (0 = quarter past the last row)
  for (int h = 0; h < kQuarters; ++h) lanes[h] = std::max(0, std::min(kLanes, nr - kLanes * h));
  const int live = (nr + kLanes - 1) / kLanes;  // quarters holding rows
  // Planes from codes: the quarter's 8 code bytes broadcast, each replicated over its row's dword (vpshufb), then
  // byte k of the dword keeps the code's bits 2k, 2k + 1 (column 4q + k): +1 = bit 2k, kept = either bit; min(., 1)
  // makes the 0/1 bytes.
  const __m256i replicate = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6,
                                             6, 6, 6, 7, 7, 7, 7);
  const __m256i plus_bits = _mm256_set1_epi32(0x40100401), kept_bits = _mm256_set1_epi32(int32_t(0xc0300c03u));
  const __m256i ones = _mm256_set1_epi8(1);
  alignas(32) __m256i pm[kChunkCols / 4][kQuarters], pp[kChunkCols / 4][kQuarters];
  for (int t = t0; t < t1; ++t) std::fill_n(y + size_t(t) * size_t(p.rows) + size_t(r0), size_t(nr), 0.0f);
  for (int c = 0; c < chunks; ++c) {
    const int qb = cm.begin[size_t(c)] / 4, nq = (cm.begin[size_t(c) + 1] - cm.begin[size_t(c)]) / 4;
    for (int j = 0; j < nq; ++j)
      for (int h = 0; h < kQuarters; ++h) {
        int64_t c8;
        std::memcpy(&c8, codes + size_t(qb + j) * stride + kLanes * h, 8);
        const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi64x(c8), replicate);
        pm[j][h] = _mm256_min_epu8(_mm256_and_si256(v, kept_bits), ones);
        pp[j][h] = _mm256_min_epu8(_mm256_and_si256(v, plus_bits), ones);
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
    const size_t ldy = size_t(p.rows);
    int t = t0;
    for (; t + kBlockTokens <= t1; t += kBlockTokens)
      for (int h = 0; h < live; h += kBlockQuarters)
        block<kBlockTokens, kBlockQuarters>(pm, pp, nq, h, qc + size_t(t) * qstride, qstride, alpha, mu,
                                            sc + size_t(t) * chunks, chunks, lanes, y + size_t(t) * ldy + r0, ldy);
    for (; t < t1; ++t)  // an odd last token
      for (int h = 0; h < live; h += kBlockQuarters)
        block<1, kBlockQuarters>(pm, pp, nq, h, qc + size_t(t) * qstride, qstride, alpha, mu, sc + size_t(t) * chunks,
                                 chunks, lanes, y + size_t(t) * ldy + r0, ldy);
  }
}

}  // namespace pbs2p

// AVX2 + FMA + F16C tile kernel: vpshufb table lookups over 32 rows of 2-bit codes (T-MAC style).
// Per 4 columns x 32 rows: 1 load, 3 ops to split nibbles, 4 lookups, 4 unpacks, 4 vpmaddubsw, 4 int16 adds.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "../kernels.h"

#ifndef PBS2P_PF_DIST
#define PBS2P_PF_DIST 6144
#endif

namespace pbs2p {

void tile_avx2(PBS2P_TILE_ARGS) {
  const Params& p = w.p;
  const auto [r0, nr, quads, G, codes, stride] = tile_view(w, tile);
  const __m256i nib = _mm256_set1_epi8(0x0f);
  const __m256i ones8 = _mm256_set1_epi8(1);
  for (int tok = t_begin; tok < t_end; ++tok) {
    const QuadTable* tab = &t.tables[size_t(tok) * quads];
    const float* xscale = &t.scale[size_t(tok) * t.chunks];
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int c = 0; c < t.chunks; ++c) {
      const int qb = cm.begin[size_t(c)] / 4, qe = cm.begin[size_t(c) + 1] / 4;
      // int16 sums; rows of d0/s0: 0-7 | 16-23, of d1/s1: 8-15 | 24-31 (unpack works per 128-bit lane).
      __m256i d0 = _mm256_setzero_si256(), d1 = d0, s0 = d0, s1 = d0;
      for (int q = qb; q < qe; ++q) {
        // Software prefetch: the hardware prefetcher alone leaves DRAM bandwidth unused at this compute density.
        _mm_prefetch(reinterpret_cast<const char*>(codes + size_t(q) * stride + PBS2P_PF_DIST), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + size_t(q) * stride));
        const __m256i lo = _mm256_and_si256(v, nib);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        const QuadTable& qt = tab[q];
        const __m256i tdl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qt.d_lo)));
        const __m256i tsl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qt.s_lo)));
        const __m256i tdh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qt.d_hi)));
        const __m256i tsh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qt.s_hi)));
        const __m256i dl = _mm256_shuffle_epi8(tdl, lo), dh = _mm256_shuffle_epi8(tdh, hi);
        const __m256i sl = _mm256_shuffle_epi8(tsl, lo), sh = _mm256_shuffle_epi8(tsh, hi);
        // |entry| <= 126, so (lo + hi) of one row is formed exactly by vpmaddubsw(1, interleaved) in int16.
        d0 = _mm256_add_epi16(d0, _mm256_maddubs_epi16(ones8, _mm256_unpacklo_epi8(dl, dh)));
        d1 = _mm256_add_epi16(d1, _mm256_maddubs_epi16(ones8, _mm256_unpackhi_epi8(dl, dh)));
        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(ones8, _mm256_unpacklo_epi8(sl, sh)));
        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(ones8, _mm256_unpackhi_epi8(sl, sh)));
      }
      const __m256 xs = _mm256_set1_ps(xscale[c]);
      const uint16_t* ts = &w.scales[(size_t(tile) * G + size_t(cm.group[size_t(c)])) * 2 * kTileRows];
      const __m256i dd[4] = {d0, d1, d0, d1}, ss[4] = {s0, s1, s0, s1};
      for (int b = 0; b < 4; ++b) {  // rows 8b .. 8b+7
        const __m128i dh16 = b < 2 ? _mm256_castsi256_si128(dd[b]) : _mm256_extracti128_si256(dd[b], 1);
        const __m128i sh16 = b < 2 ? _mm256_castsi256_si128(ss[b]) : _mm256_extracti128_si256(ss[b], 1);
        const __m256 fd = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(dh16));
        const __m256 fs = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(sh16));
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ts + 8 * b)));
        const __m256 mu = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ts + kTileRows + 8 * b)));
        const __m256 part = _mm256_fmadd_ps(mu, fs, _mm256_mul_ps(a, fd));
        acc[b] = _mm256_fmadd_ps(xs, part, acc[b]);
      }
    }
    float* yt = y + size_t(tok) * p.rows + r0;
    if (nr == kTileRows) {
      for (int b = 0; b < 4; ++b) _mm256_storeu_ps(yt + 8 * b, acc[b]);
    } else {
      alignas(32) float buf[kTileRows];
      for (int b = 0; b < 4; ++b) _mm256_store_ps(buf + 8 * b, acc[b]);
      std::copy(buf, buf + nr, yt);
    }
  }
}

// salient_block_generic with 8-wide F16C / FMA: per token the block's 32 outputs stay in 4 registers across the
// groups; the same float operations per output in the same order (0 + coef * x summed over s, fma, + bias).
void salient_block_avx2(const SalientBlock& b, const float* x, int t0, int t1, float* y, size_t ldy) {
  const size_t S = size_t(b.salient);
  const bool full = b.nr == kTileRows;
  alignas(32) float buf[kTileRows], bias_buf[kTileRows];
  const float* bias = b.bias;  // a whole tile reads the bias in place; a partial one from a zero-padded copy
  if (!full) {
    std::fill(buf, buf + kTileRows, 0.0f);
    std::fill(bias_buf, bias_buf + kTileRows, 0.0f);
    if (b.bias != nullptr) std::copy(b.bias, b.bias + b.nr, bias_buf);
    bias = bias_buf;
  }
  for (int tok = t0; tok < t1; ++tok) {
    const float* xt = x + size_t(tok) * size_t(b.k);
    float* yt = y + size_t(tok) * ldy;
    const float* src = yt;
    if (!full) {
      std::copy(yt, yt + b.nr, buf);
      src = buf;
    }
    __m256 yv[4];
    for (int q = 0; q < 4; ++q) yv[q] = _mm256_loadu_ps(src + 8 * q);
    for (int g = 0; g < b.groups && S; ++g) {
      const int8_t* coef = b.coef + size_t(g) * S * kTileRows;
      const int32_t* cols = b.cols + size_t(g) * S;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (size_t s2 = 0; s2 < S; ++s2) {
        const __m256 xv = _mm256_set1_ps(xt[cols[s2]]);
        const __m256i c8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(coef + s2 * kTileRows));
        const __m128i lo = _mm256_castsi256_si128(c8), hi = _mm256_extracti128_si256(c8, 1);
        const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int q = 0; q < 4; ++q) {
          const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[q]));
          acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(c, xv));
        }
      }
      const uint16_t* a2 = b.alpha2 + size_t(g) * kTileRows;
      for (int q = 0; q < 4; ++q) {
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a2 + 8 * q)));
        yv[q] = _mm256_fmadd_ps(a, acc[q], yv[q]);
      }
    }
    if (b.bias != nullptr)
      for (int q = 0; q < 4; ++q) yv[q] = _mm256_add_ps(yv[q], _mm256_loadu_ps(bias + 8 * q));
    if (full) {
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(yt + 8 * q, yv[q]);
    } else {
      for (int q = 0; q < 4; ++q) _mm256_store_ps(buf + 8 * q, yv[q]);
      std::copy(buf, buf + b.nr, yt);
    }
  }
}

}  // namespace pbs2p

namespace pbs2p {

// Same tables as build_tables_generic, bit for bit: x * inv rounded half-to-even, clamped, then per quad two
// 32-byte rows [d | s] formed with vpsignb against constant code patterns.
void build_tables_avx2(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t) {
  const int k = t->k, chunks = t->chunks, quads = k / 4;
  alignas(32) int8_t pa[32], pb[32];
  pair_sign_patterns(pa, pb);
  const __m256i PA = _mm256_load_si256(reinterpret_cast<const __m256i*>(pa));
  const __m256i PB = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb));
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lim = _mm256_set1_ps(float(kActMax)), nlim = _mm256_set1_ps(-float(kActMax));
  alignas(32) int32_t q[kChunkCols];
  for (int tok = token_begin; tok < token_end; ++tok) {
    const float* xt = x + size_t(tok) * k;
    for (int c = 0; c < chunks; ++c) {
      const int b = cm.begin[size_t(c)], e = cm.begin[size_t(c) + 1];
      __m256 vmax = _mm256_setzero_ps();
      int j = b;
      for (; j + 8 <= e; j += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xt + j), absmask));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmax);
      float amax = 0.0f;
      for (float v : lanes) amax = std::max(amax, v);
      for (; j < e; ++j) amax = std::max(amax, std::fabs(xt[j]));
      bool finite = true;  // as in the generic builder: any NaN/inf makes the chunk scale NaN and q = 0
      for (j = b; j < e; ++j) finite = finite && std::isfinite(xt[j]);
      const float inv = amax > 0.0f && finite ? float(kActMax) / amax : 0.0f;
      t->scale[size_t(tok) * chunks + c] = finite ? amax / float(kActMax) : NAN;
      const __m256 vinv = _mm256_set1_ps(inv);
      for (j = b; j + 8 <= e; j += 8) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xt + j), vinv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(lim, _mm256_max_ps(nlim, v));
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + (j - b)), _mm256_cvtps_epi32(v));
      }
      for (; j < e; ++j) q[j - b] = int32_t(std::min(float(kActMax), std::max(-float(kActMax), std::nearbyint(xt[j] * inv))));
      for (j = b; j < e; j += 4) {
        const int32_t* qq = q + (j - b);
        const __m256i lo = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(int8_t(qq[0])), PA),
                                           _mm256_sign_epi8(_mm256_set1_epi8(int8_t(qq[1])), PB));
        const __m256i hi = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(int8_t(qq[2])), PA),
                                           _mm256_sign_epi8(_mm256_set1_epi8(int8_t(qq[3])), PB));
        QuadTable& qt = t->tables[size_t(tok) * quads + size_t(j / 4)];
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qt.d_lo), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qt.d_hi), hi);
      }
    }
  }
}

void build_tables_avx2_paired(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t) {
  build_tables_avx2(x, token_begin, token_end, cm, t);
  pair_quad_tables(token_begin, token_end, cm, t);
}

}  // namespace pbs2p

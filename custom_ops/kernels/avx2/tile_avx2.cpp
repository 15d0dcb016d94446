// AVX2 + FMA + F16C tile kernel: vpshufb table lookups over 32 rows of 2-bit codes (T-MAC style).
// Per 4 columns x 32 rows: 1 load, 3 ops to split nibbles, 4 lookups, 4 unpacks, 4 vpmaddubsw, 4 int16 adds.
#include <immintrin.h>

#include <algorithm>

#include "../kernels.h"

namespace pbs2p {

void tile_avx2(PBS2P_TILE_ARGS) {
  const Params& p = w.p;
  const int r0 = tile * kTileRows, nr = std::min(kTileRows, p.rows - r0);
  const size_t quads = size_t(p.k) / 4, G = size_t(p.groups);
  const uint8_t* codes = &w.codes[size_t(tile) * quads * kTileRows];
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
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + size_t(q) * kTileRows));
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

}  // namespace pbs2p

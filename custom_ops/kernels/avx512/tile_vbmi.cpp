// AVX-512 VBMI tile kernel (decode): the avx2 kernel's table lookups over the kLayoutRowPairs codes.
// Masking a quad block's low (high) nibbles gives rows 0-15 (16-31) with their two pair indices side by side, so
// a byte permute (vpermb) over [d_lo | d_hi] and one vpmaddubsw per 16 rows form each row's int16 sum: no
// unpacks. Two quads per zmm, the tables of both in one register, already side by side in memory
// (build_tables_avx2_paired): lane shuffles cost two 256-bit halves each on CPUs that split zmm operations
// (Zen 4), where dropping two of six gave 5-10%, not a third (docs/METHOD.md "Session 14"). Per 2 quads x 32
// rows: 3 loads, 3 ops to split the nibbles, 4 permutes, 4 vpmaddubsw, 4 int16 adds (avx2: 38 ops for the same
// work).
// The integer sums and the float steps are tile_avx2's, in its order: identical bits.
#include <immintrin.h>

#include "../kernels.h"

#ifndef PBS2P_PF_DIST
#define PBS2P_PF_DIST 6144
#endif

namespace pbs2p {

void tile_avx512vbmi(PBS2P_TILE_ARGS) {
  const Params& p = w.p;
  const auto [r0, nr, quads, G, codes] = tile_view(w, tile);
  const __m512i nib = _mm512_set1_epi8(0x0f), ones8 = _mm512_set1_epi8(1);
  // permute indices: pair 1 (odd bytes) reads d_hi / s_hi (+16); the second quad's table is the upper half (+32)
  const __m512i off2 = _mm512_mask_blend_epi16(0xffff0000u, _mm512_set1_epi16(0x1000), _mm512_set1_epi16(0x3020));
  const __m256i off1 = _mm256_set1_epi16(0x1000);
  const __mmask16 keep[2] = {__mmask16(nr >= 16 ? 0xffffu : (1u << nr) - 1u),
                             __mmask16(nr >= 32 ? 0xffffu : nr > 16 ? (1u << (nr - 16)) - 1u : 0u)};
  for (int tok = t_begin; tok < t_end; ++tok) {
    const QuadTable* tab = &t.tables[size_t(tok) * quads];
    const float* xscale = &t.scale[size_t(tok) * t.chunks];
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int c = 0; c < t.chunks; ++c) {
      const int qb = cm.begin[size_t(c)] / 4, qe = cm.begin[size_t(c) + 1] / 4;
      // int16 row sums; lower 256 bits: even quads of the chunk, upper: odd quads; d0/s0 rows 0-15, d1/s1 16-31
      __m512i d0 = _mm512_setzero_si512(), d1 = d0, s0 = d0, s1 = d0;
      int q = qb;
      for (; q + 2 <= qe; q += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + size_t(q) * kTileRows + PBS2P_PF_DIST), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(codes + size_t(q) * kTileRows);
        const __m512i il = _mm512_ternarylogic_epi32(v, nib, off2, 0xEA);  // (v & 0x0f) | off2
        const __m512i ih = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, off2, 0xEA);
        const __m512i td = _mm512_loadu_si512(&tab[q]);      // d_lo d_hi | d_lo d_hi (pair_quad_tables)
        const __m512i ts = _mm512_loadu_si512(&tab[q + 1]);  // s_lo s_hi | s_lo s_hi
        d0 = _mm512_add_epi16(d0, _mm512_maddubs_epi16(ones8, _mm512_permutexvar_epi8(il, td)));
        d1 = _mm512_add_epi16(d1, _mm512_maddubs_epi16(ones8, _mm512_permutexvar_epi8(ih, td)));
        s0 = _mm512_add_epi16(s0, _mm512_maddubs_epi16(ones8, _mm512_permutexvar_epi8(il, ts)));
        s1 = _mm512_add_epi16(s1, _mm512_maddubs_epi16(ones8, _mm512_permutexvar_epi8(ih, ts)));
      }
      __m256i e0 = _mm256_setzero_si256(), e1 = e0, f0 = e0, f1 = e0;
      if (q < qe) {  // an odd quad left (short chunks: group sizes that are not multiples of 8)
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + size_t(q) * kTileRows));
        const __m256i n8 = _mm512_castsi512_si256(nib), o8 = _mm512_castsi512_si256(ones8);
        const __m256i il = _mm256_ternarylogic_epi32(v, n8, off1, 0xEA);
        const __m256i ih = _mm256_ternarylogic_epi32(_mm256_srli_epi16(v, 4), n8, off1, 0xEA);
        const __m512i ta = _mm512_loadu_si512(&tab[q]);
        const __m256i td = _mm512_castsi512_si256(_mm512_shuffle_i64x2(ta, ta, _MM_SHUFFLE(2, 0, 2, 0)));
        const __m256i ts = _mm512_castsi512_si256(_mm512_shuffle_i64x2(ta, ta, _MM_SHUFFLE(3, 1, 3, 1)));
        e0 = _mm256_maddubs_epi16(o8, _mm256_permutexvar_epi8(il, td));
        e1 = _mm256_maddubs_epi16(o8, _mm256_permutexvar_epi8(ih, td));
        f0 = _mm256_maddubs_epi16(o8, _mm256_permutexvar_epi8(il, ts));
        f1 = _mm256_maddubs_epi16(o8, _mm256_permutexvar_epi8(ih, ts));
      }
      const __m512 xs = _mm512_set1_ps(xscale[c]);
      const uint16_t* sc = &w.scales[(size_t(tile) * G + size_t(cm.group[size_t(c)])) * 2 * kTileRows];
      const __m512i dd[2] = {d0, d1}, ss[2] = {s0, s1};
      const __m256i ee[2] = {e0, e1}, ff[2] = {f0, f1};
      for (int h = 0; h < 2; ++h) {  // rows 16h .. 16h+15
        const __m256i dsum = _mm256_add_epi16(_mm256_add_epi16(_mm512_castsi512_si256(dd[h]),
                                                               _mm512_extracti64x4_epi64(dd[h], 1)), ee[h]);
        const __m256i ssum = _mm256_add_epi16(_mm256_add_epi16(_mm512_castsi512_si256(ss[h]),
                                                               _mm512_extracti64x4_epi64(ss[h], 1)), ff[h]);
        const __m512 fd = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(dsum));
        const __m512 fs = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(ssum));
        const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + 16 * h)));
        const __m512 mu = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + kTileRows + 16 * h)));
        acc[h] = _mm512_fmadd_ps(xs, _mm512_fmadd_ps(mu, fs, _mm512_mul_ps(a, fd)), acc[h]);
      }
    }
    float* yt = y + size_t(tok) * p.rows + r0;
    _mm512_mask_storeu_ps(yt, keep[0], acc[0]);
    _mm512_mask_storeu_ps(yt + 16, keep[1], acc[1]);
  }
}

}  // namespace pbs2p

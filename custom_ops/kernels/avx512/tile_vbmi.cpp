// AVX-512 VBMI tile kernel (decode): the avx2 kernel's table lookups over the kLayoutRowPairs codes.
// Masking a quad block's low (high) nibbles gives rows 0-15 (16-31) with their two pair indices side by side, so
// a byte permute (vpermb) over [d_lo | d_hi] and one vpmaddubsw per 16 rows form each row's int16 sum: no
// unpacks. Two quads per zmm, the tables of both in one register, already side by side in memory
// (build_tables_avx2_paired): lane shuffles cost two 256-bit halves each on CPUs that split zmm operations
// (Zen 4), where dropping two of six gave 5-10%, not a third (docs/METHOD.md "Session 14"). Per 2 quads x 32
// rows: 3 loads, 3 ops to split the nibbles, 4 permutes, 4 vpmaddubsw, 4 int16 adds (avx2: 38 ops for the same
// work).
// Decode walks four adjacent tiles in lockstep (tile_quad_avx512vbmi): one table load serves four tiles' codes,
// 20-30% faster from DRAM on Zen 4 than one tile per pass, where a pass over one tile read below the memory's
// bandwidth (docs/METHOD.md "Session 15"). The copy interleaves each group's four tiles per quad
// (RuntimeWeight::interleave), so a pass reads one sequential stream, not four (docs/METHOD.md "Session 21").
// The integer sums and the float steps are tile_avx2's, in its order: identical bits.
#include <immintrin.h>

#include "../kernels.h"

#ifndef PBS2P_PF_DIST
#define PBS2P_PF_DIST 6144  // bytes ahead in each stream (one per interleaved four-tile group)
#endif

namespace pbs2p {

namespace {

// NT adjacent tiles walked in lockstep: every tile's integer sums and float steps as for one, so the same bits;
// each 64-byte table load serves NT tiles' codes, and NT code streams are in flight at once.
template <int NT>
void tiles_vbmi(const RuntimeWeight& w, const ChunkMap& cm, const ActTables& t, int tile0, int t_begin, int t_end,
                float* y) {
  const Params& p = w.p;
  TileView tv[NT];
  __mmask16 keep[NT][2];
  for (int i = 0; i < NT; ++i) {
    tv[i] = tile_view(w, tile0 + i);
    const int nr = tv[i].nr;
    keep[i][0] = __mmask16(nr >= 16 ? 0xffffu : (1u << nr) - 1u);
    keep[i][1] = __mmask16(nr >= 32 ? 0xffffu : nr > 16 ? (1u << (nr - 16)) - 1u : 0u);
  }
  const size_t G = tv[0].groups;
  const __m512i nib = _mm512_set1_epi8(0x0f), ones8 = _mm512_set1_epi8(1);
  // permute indices: pair 1 (odd bytes) reads d_hi / s_hi (+16); the second quad's table is the upper half (+32)
  const __m512i off2 = _mm512_mask_blend_epi16(0xffff0000u, _mm512_set1_epi16(0x1000), _mm512_set1_epi16(0x3020));
  const __m256i off1 = _mm256_set1_epi16(0x1000);
  for (int tok = t_begin; tok < t_end; ++tok) {
    const QuadTable* tab = &t.tables[size_t(tok) * tv[0].quads];
    const float* xscale = &t.scale[size_t(tok) * t.chunks];
    __m512 acc[NT][2];
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int c = 0; c < t.chunks; ++c) {
      const int qb = cm.begin[size_t(c)] / 4, qe = cm.begin[size_t(c) + 1] / 4;
      // int16 row sums; lower 256 bits: even quads of the chunk, upper: odd quads; d0/s0 rows 0-15, d1/s1 16-31
      __m512i d0[NT], d1[NT], s0[NT], s1[NT];
      for (int i = 0; i < NT; ++i) d0[i] = d1[i] = s0[i] = s1[i] = _mm512_setzero_si512();
      int q = qb;
      for (; q + 2 <= qe; q += 2) {
        const __m512i td = _mm512_loadu_si512(&tab[q]);      // d_lo d_hi | d_lo d_hi (pair_quad_tables)
        const __m512i ts = _mm512_loadu_si512(&tab[q + 1]);  // s_lo s_hi | s_lo s_hi
#pragma GCC unroll 4
        for (int i = 0; i < NT; ++i) {
          const uint8_t* codes = quad_block(tv[i], size_t(q));
          // interleaved group: tile i's block sits at 32 i, so + 32 i spreads the four requests over the 256
          // bytes the pass reads per step; separate tiles: each stream prefetches its own
          _mm_prefetch(reinterpret_cast<const char*>(codes + 32 * i + PBS2P_PF_DIST), _MM_HINT_T0);
          const __m512i v = _mm512_inserti64x4(
              _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + tv[i].stride)), 1);
          const __m512i il = _mm512_ternarylogic_epi32(v, nib, off2, 0xEA);  // (v & 0x0f) | off2
          const __m512i ih = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, off2, 0xEA);
          d0[i] = _mm512_add_epi16(d0[i], _mm512_maddubs_epi16(ones8, _mm512_permutexvar_epi8(il, td)));
          d1[i] = _mm512_add_epi16(d1[i], _mm512_maddubs_epi16(ones8, _mm512_permutexvar_epi8(ih, td)));
          s0[i] = _mm512_add_epi16(s0[i], _mm512_maddubs_epi16(ones8, _mm512_permutexvar_epi8(il, ts)));
          s1[i] = _mm512_add_epi16(s1[i], _mm512_maddubs_epi16(ones8, _mm512_permutexvar_epi8(ih, ts)));
        }
      }
      __m256i e0[NT], e1[NT], f0[NT], f1[NT];
      for (int i = 0; i < NT; ++i) e0[i] = e1[i] = f0[i] = f1[i] = _mm256_setzero_si256();
      if (q < qe) {  // an odd quad left (short chunks: group sizes that are not multiples of 8)
        const __m256i n8 = _mm512_castsi512_si256(nib), o8 = _mm512_castsi512_si256(ones8);
        const __m512i ta = _mm512_loadu_si512(&tab[q]);
        const __m256i td = _mm512_castsi512_si256(_mm512_shuffle_i64x2(ta, ta, _MM_SHUFFLE(2, 0, 2, 0)));
        const __m256i ts = _mm512_castsi512_si256(_mm512_shuffle_i64x2(ta, ta, _MM_SHUFFLE(3, 1, 3, 1)));
        for (int i = 0; i < NT; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quad_block(tv[i], size_t(q))));
          const __m256i il = _mm256_ternarylogic_epi32(v, n8, off1, 0xEA);
          const __m256i ih = _mm256_ternarylogic_epi32(_mm256_srli_epi16(v, 4), n8, off1, 0xEA);
          e0[i] = _mm256_maddubs_epi16(o8, _mm256_permutexvar_epi8(il, td));
          e1[i] = _mm256_maddubs_epi16(o8, _mm256_permutexvar_epi8(ih, td));
          f0[i] = _mm256_maddubs_epi16(o8, _mm256_permutexvar_epi8(il, ts));
          f1[i] = _mm256_maddubs_epi16(o8, _mm256_permutexvar_epi8(ih, ts));
        }
      }
      const __m512 xs = _mm512_set1_ps(xscale[c]);
      for (int i = 0; i < NT; ++i) {
        const uint16_t* sc = &w.scales[(size_t(tile0 + i) * G + size_t(cm.group[size_t(c)])) * 2 * kTileRows];
        const __m512i dd[2] = {d0[i], d1[i]}, ss[2] = {s0[i], s1[i]};
        const __m256i ee[2] = {e0[i], e1[i]}, ff[2] = {f0[i], f1[i]};
        for (int h = 0; h < 2; ++h) {  // rows 16h .. 16h+15
          const __m256i dsum = _mm256_add_epi16(
              _mm256_add_epi16(_mm512_castsi512_si256(dd[h]), _mm512_extracti64x4_epi64(dd[h], 1)), ee[h]);
          const __m256i ssum = _mm256_add_epi16(
              _mm256_add_epi16(_mm512_castsi512_si256(ss[h]), _mm512_extracti64x4_epi64(ss[h], 1)), ff[h]);
          const __m512 fd = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(dsum));
          const __m512 fs = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(ssum));
          const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + 16 * h)));
          const __m512 mu =
              _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + kTileRows + 16 * h)));
          acc[i][h] = _mm512_fmadd_ps(xs, _mm512_fmadd_ps(mu, fs, _mm512_mul_ps(a, fd)), acc[i][h]);
        }
      }
    }
    for (int i = 0; i < NT; ++i) {
      float* yt = y + size_t(tok) * p.rows + tv[i].r0;
      _mm512_mask_storeu_ps(yt, keep[i][0], acc[i][0]);
      _mm512_mask_storeu_ps(yt + 16, keep[i][1], acc[i][1]);
    }
  }
}

}  // namespace

void tile_avx512vbmi(PBS2P_TILE_ARGS) { tiles_vbmi<1>(w, cm, t, tile, t_begin, t_end, y); }
void tile_quad_avx512vbmi(PBS2P_TILE_ARGS) { tiles_vbmi<4>(w, cm, t, tile, t_begin, t_end, y); }

}  // namespace pbs2p

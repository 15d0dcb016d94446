// NEON tile kernel (aarch64): tbl lookups over 2 x 16 rows of 2-bit codes, the twin of the AVX2 kernel.
#include <arm_neon.h>

#include <algorithm>

#include "../kernels.h"

#if defined(PBS2P_HAVE_SDOT)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // Linux arm64 uapi hwcap bit for SDOT / UDOT
#endif
#endif

namespace pbs2p {

#if defined(PBS2P_HAVE_SDOT)
// Built for ARMv8.0 (this file), so it runs on any aarch64 core: the dot-product path is chosen at run time.
bool cpu_has_dotprod() { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#endif

// The generic builder's bytes (quantize_chunk, then d = v(c0) qa + v(c1) qb and s = |v(c0)| qa + |v(c1)| qb per
// 2-bit code pair): per 2 columns one int8 multiply and one multiply-accumulate fill the 16 d and 16 s entries
// (|entries| <= 126, exact in int8), instead of 32 scalar entries.
void build_tables_neon(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t) {
  const int k = t->k, chunks = t->chunks, quads = k / 4;
  alignas(16) int8_t pa[32], pb[32];  // [d: v(c)][s: |v(c)|] for the first (pa) and second (pb) column of a pair
  pair_sign_patterns(pa, pb);
  const int8x16_t pad = vld1q_s8(pa), pas = vld1q_s8(pa + 16), pbd = vld1q_s8(pb), pbs = vld1q_s8(pb + 16);
  int8_t q[kChunkCols];
  for (int tok = token_begin; tok < token_end; ++tok) {
    const float* xt = x + size_t(tok) * k;
    for (int c = 0; c < chunks; ++c) {
      const int b = cm.begin[size_t(c)], e = cm.begin[size_t(c) + 1];
      t->scale[size_t(tok) * chunks + c] = quantize_chunk(xt, b, e, q);
      for (int j = b; j < e; j += 4) {
        QuadTable& qt = t->tables[size_t(tok) * quads + size_t(j / 4)];
        const int8_t* qq = q + (j - b);
        for (int half = 0; half < 2; ++half) {
          const int8x16_t qa = vdupq_n_s8(qq[2 * half]), qb = vdupq_n_s8(qq[2 * half + 1]);
          vst1q_s8(half ? qt.d_hi : qt.d_lo, vmlaq_s8(vmulq_s8(pad, qa), pbd, qb));
          vst1q_s8(half ? qt.s_hi : qt.s_lo, vmlaq_s8(vmulq_s8(pas, qa), pbs, qb));
        }
      }
    }
  }
}

void tile_neon(PBS2P_TILE_ARGS) {
  const Params& p = w.p;
  const auto [r0, nr, quads, G, codes, stride] = tile_view(w, tile);
  const uint8x16_t nib = vdupq_n_u8(0x0f);
  for (int tok = t_begin; tok < t_end; ++tok) {
    const QuadTable* tab = &t.tables[size_t(tok) * quads];
    const float* xscale = &t.scale[size_t(tok) * t.chunks];
    float32x4_t acc[8];
    for (auto& a : acc) a = vdupq_n_f32(0.0f);
    for (int c = 0; c < t.chunks; ++c) {
      const int qb = cm.begin[size_t(c)] / 4, qe = cm.begin[size_t(c) + 1] / 4;
      int16x8_t d[4], s[4];  // rows 8b .. 8b+7
      for (int b = 0; b < 4; ++b) d[b] = s[b] = vdupq_n_s16(0);
      for (int q = qb; q < qe; ++q) {
        const uint8_t* cq = codes + size_t(q) * stride;
        __builtin_prefetch(cq + 6144);  // as on x86: keep enough DRAM requests in flight
        const QuadTable& qt = tab[q];
        const int8x16_t tdl = vld1q_s8(qt.d_lo), tsl = vld1q_s8(qt.s_lo);
        const int8x16_t tdh = vld1q_s8(qt.d_hi), tsh = vld1q_s8(qt.s_hi);
        for (int h = 0; h < 2; ++h) {  // rows 16h .. 16h+15
          const uint8x16_t v = vld1q_u8(cq + 16 * h);
          const uint8x16_t lo = vandq_u8(v, nib), hi = vshrq_n_u8(v, 4);
          const int8x16_t dl = vqtbl1q_s8(tdl, lo), dh = vqtbl1q_s8(tdh, hi);
          const int8x16_t sl = vqtbl1q_s8(tsl, lo), sh = vqtbl1q_s8(tsh, hi);
          d[2 * h] = vaddq_s16(d[2 * h], vaddl_s8(vget_low_s8(dl), vget_low_s8(dh)));
          d[2 * h + 1] = vaddq_s16(d[2 * h + 1], vaddl_high_s8(dl, dh));
          s[2 * h] = vaddq_s16(s[2 * h], vaddl_s8(vget_low_s8(sl), vget_low_s8(sh)));
          s[2 * h + 1] = vaddq_s16(s[2 * h + 1], vaddl_high_s8(sl, sh));
        }
      }
      const float32x4_t xs = vdupq_n_f32(xscale[c]);
      const uint16_t* ts = &w.scales[(size_t(tile) * G + size_t(cm.group[size_t(c)])) * 2 * kTileRows];
      for (int b = 0; b < 8; ++b) {  // rows 4b .. 4b+3
        const int16x4_t d4 = (b & 1) ? vget_high_s16(d[b / 2]) : vget_low_s16(d[b / 2]);
        const int16x4_t s4 = (b & 1) ? vget_high_s16(s[b / 2]) : vget_low_s16(s[b / 2]);
        const float32x4_t fd = vcvtq_f32_s32(vmovl_s16(d4)), fs = vcvtq_f32_s32(vmovl_s16(s4));
        const float32x4_t a = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(ts + 4 * b)));
        const float32x4_t mu = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(ts + kTileRows + 4 * b)));
        const float32x4_t part = vfmaq_f32(vmulq_f32(a, fd), mu, fs);
        acc[b] = vfmaq_f32(acc[b], xs, part);
      }
    }
    float* yt = y + size_t(tok) * p.rows + r0;
    if (nr == kTileRows) {
      for (int b = 0; b < 8; ++b) vst1q_f32(yt + 4 * b, acc[b]);
    } else {
      float buf[kTileRows];
      for (int b = 0; b < 8; ++b) vst1q_f32(buf + 4 * b, acc[b]);
      std::copy(buf, buf + nr, yt);
    }
  }
}

}  // namespace pbs2p

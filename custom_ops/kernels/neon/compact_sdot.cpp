// SDOT compact kernel (aarch64 with the dot-product extension: ARMv8.2+, Cortex-A76 / Raspberry Pi 5): reads the
// disk layout in place. The only file built with -march=armv8.2-a+dotprod; it runs only after kernel_supported()
// saw HWCAP_ASIMDDP, so the library still runs on a Pi 4. Its helpers sit in an anonymous namespace (it keeps its
// own bit extraction instead of the header's inline bits_at), so no ARMv8.2 code can be picked by the linker for a
// caller in another file; the std:: inline code it instantiates is plain integer code (no atomics, no int8 loops).
//
// Per 16-row block and chunk (<= 64 columns of one group), once:
//   plus = pdep(kept signs, mask) per row (no pdep on ARM: a byte at a time through a 64 KiB [mask][signs] table);
//   the mask and plus words of 4 rows become two int8 planes in the SDOT lane order [quad j][row i][4 columns]
//   (a tbl replicates each row's byte across its lane, a cmtst per 4 columns turns mask bits into 0 / -1 bytes,
//   an and makes the kept plane 0 / 1, a bsl writes +1 where the plus bit is set: sign = +1 / -1 / 0).
// Then for every token (the GEMM): per 4 rows and 4 columns, two SDOT by element (the token's activation quad
// broadcast from a register lane), lanes = rows: one over the kept plane (0 / 1) gives S, one over the sign
// plane (+1 / -1 / 0) gives D = 2P - S; y = fma(scale, fma(mu, S, alpha * D), y) per chunk in column order (the
// scalar kernel's integers and float order, so identical bits).
#include <arm_neon.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../kernels.h"

namespace pbs2p {
namespace {

constexpr int kRows = 16;        // rows per block: 4 groups of 4 rows (one int32 lane per row)
constexpr int kQuads = kChunkCols / 4;
constexpr int kPlaneBytes = 16;  // one 4 rows x 4 columns int8 plane
// Buffer of one block and chunk: [group g (4 rows)][quad j][plane: kept, sign][16 bytes]
constexpr size_t kQuadStride = 2 * kPlaneBytes;
constexpr size_t kGroupStride = size_t(kQuads) * kQuadStride;

// bits [pos, pos + n) (n <= 64) of a row of nbytes bytes, LSB first; never reads outside the row
uint64_t take_bits(const uint8_t* row, size_t nbytes, size_t pos, int n) {
  if (n == 0) return 0;
  const size_t byte = pos >> 3;
  const int sh = int(pos & 7);
  uint64_t lo = 0, hi = 0;
  const size_t avail = nbytes - byte;
  std::memcpy(&lo, row + byte, avail < 8 ? avail : 8);
  if (avail > 8) hi = row[byte + 8];
  const uint64_t v = sh ? (lo >> sh) | (hi << (64 - sh)) : lo;
  return n == 64 ? v : v & ((uint64_t(1) << n) - 1);
}

// kPdep8.v[m << 8 | s] = the low popcount(m) bits of s deposited at the set bits of m; kPop8 = popcounts.
struct Pdep8 {
  uint8_t v[256 * 256];
  uint8_t pop[256];
};
constexpr Pdep8 make_pdep8() {
  Pdep8 t{};
  for (int m = 0; m < 256; ++m) {
    int c = 0;
    for (int b = 0; b < 8; ++b) c += (m >> b) & 1;
    t.pop[m] = uint8_t(c);
    for (int s = 0; s < 256; ++s) {
      int out = 0, k = 0;
      for (int b = 0; b < 8; ++b)
        if ((m >> b) & 1) out |= ((s >> k++) & 1) << b;
      t.v[(m << 8) | s] = uint8_t(out);
    }
  }
  return t;
}
constexpr Pdep8 kPdep8 = make_pdep8();

inline uint64_t pdep64(uint64_t s, uint64_t m) {
  uint64_t out = 0;
  for (int a = 0; a < 8; ++a) {
    const unsigned mb = unsigned(m >> (8 * a)) & 0xffu;
    out |= uint64_t(kPdep8.v[(mb << 8) | unsigned(s & 0xffu)]) << (8 * a);
    s >>= kPdep8.pop[mb];
  }
  return out;
}
// The same when every mask byte holds exactly n set bits (M = 8, the chunk on whole M-runs): no popcounts.
inline uint64_t pdep64_runs(uint64_t s, uint64_t m, int n) {
  uint64_t out = 0;
  for (int a = 0; a < 8; ++a) {
    const unsigned mb = unsigned(m >> (8 * a)) & 0xffu;
    out |= uint64_t(kPdep8.v[(mb << 8) | unsigned(s & 0xffu)]) << (8 * a);
    s >>= n;
  }
  return out;
}

inline uint8x16x2_t words4(const uint64_t* w) {  // 4 rows' 64-bit words as a 32-byte tbl source
  uint8x16x2_t src;
  src.val[0] = vreinterpretq_u8_u64(vcombine_u64(vcreate_u64(w[0]), vcreate_u64(w[1])));
  src.val[1] = vreinterpretq_u8_u64(vcombine_u64(vcreate_u64(w[2]), vcreate_u64(w[3])));
  return src;
}

// Mask and plus words of 4 rows -> per quad j (16 quads) two int8 planes, byte 4i + k = row i, column 4j + k:
// kept = 0 / 1 and sign = +1 / -1 / 0 (pruned). A tbl replicates byte j/2 of each row's word over the row's 4
// lanes, a cmtst picks bit 4(j%2) + k (0 / -1), an and makes it 0 / 1, a bsl puts +1 where the plus bit is set.
inline void expand4(const uint64_t* mw, const uint64_t* pw, int8_t* planes) {
  const uint8x16x2_t ms = words4(mw), ps = words4(pw);
  static const uint8_t kIdx[16] = {0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24};
  static const uint8_t kLo[16] = {1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
  const uint8x16_t lo = vld1q_u8(kLo), hi = vshlq_n_u8(lo, 4), one = vdupq_n_u8(1);
  uint8x16_t idx = vld1q_u8(kIdx);
  for (int p = 0; p < kQuads / 2; ++p) {  // byte p of every row = quads 2p, 2p + 1
    const uint8x16_t rm = vqtbl2q_u8(ms, idx), rp = vqtbl2q_u8(ps, idx);
    const uint8x16_t k0 = vtstq_u8(rm, lo), k1 = vtstq_u8(rm, hi);
    int8_t* q0 = planes + size_t(2 * p) * kQuadStride;
    int8_t* q1 = q0 + kQuadStride;
    vst1q_u8(reinterpret_cast<uint8_t*>(q0), vandq_u8(k0, one));
    vst1q_u8(reinterpret_cast<uint8_t*>(q0 + kPlaneBytes), vbslq_u8(vtstq_u8(rp, lo), one, k0));
    vst1q_u8(reinterpret_cast<uint8_t*>(q1), vandq_u8(k1, one));
    vst1q_u8(reinterpret_cast<uint8_t*>(q1 + kPlaneBytes), vbslq_u8(vtstq_u8(rp, hi), one, k1));
    idx = vaddq_u8(idx, one);
  }
}


inline float32x4_t half4(const uint32_t* am, bool high) {  // 4 rows' alpha (low half) or mu (high half)
  const uint32x4_t v = vld1q_u32(am);
  const uint16x4_t h = high ? vshrn_n_u32(v, 16) : vmovn_u32(v);
  return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

// y[4 rows] = fma(scale, fma(mu, S, alpha * D), y) (the scalar kernel's operations and order); n = rows to write.
inline void finish(int32x4_t s, int32x4_t d, float32x4_t alpha, float32x4_t mu, float scale, float* yt, int n) {
  const float32x4_t part = vfmaq_f32(vmulq_f32(alpha, vcvtq_f32_s32(d)), mu, vcvtq_f32_s32(s));
  if (n >= 4) {
    vst1q_f32(yt, vfmaq_n_f32(vld1q_f32(yt), part, scale));
  } else {
    float buf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < n; ++i) buf[i] = yt[i];
    vst1q_f32(buf, vfmaq_n_f32(vld1q_f32(buf), part, scale));
    for (int i = 0; i < n; ++i) yt[i] = buf[i];
  }
}

#define PBS2P_SDOT_QUAD(L)                                                      \
  {                                                                             \
    const int8_t* wq = wg + size_t(4 * b + (L)) * kQuadStride;                  \
    const int8x16_t m0 = vld1q_s8(wq), p0 = vld1q_s8(wq + kPlaneBytes);         \
    const int8x16_t m1 = vld1q_s8(wq + kGroupStride);                           \
    const int8x16_t p1 = vld1q_s8(wq + kGroupStride + kPlaneBytes);             \
    s00 = vdotq_laneq_s32(s00, m0, qa, L);                                      \
    p00 = vdotq_laneq_s32(p00, p0, qa, L);                                      \
    s10 = vdotq_laneq_s32(s10, m1, qa, L);                                      \
    p10 = vdotq_laneq_s32(p10, p1, qa, L);                                      \
    if (kTwo) {                                                                 \
      s01 = vdotq_laneq_s32(s01, m0, qb, L);                                    \
      p01 = vdotq_laneq_s32(p01, p0, qb, L);                                    \
      s11 = vdotq_laneq_s32(s11, m1, qb, L);                                    \
      p11 = vdotq_laneq_s32(p11, p1, qb, L);                                    \
    }                                                                           \
  }

// One or two tokens (kTwo) against 8 rows (groups g, g + 1) of the decoded planes: 8 accumulator chains.
template <bool kTwo>
inline void gemm_8rows(const int8_t* wg, const int8_t* q0, const int8_t* q1, int32x4_t* out) {
  int32x4_t s00 = vdupq_n_s32(0), p00 = s00, s10 = s00, p10 = s00, s01 = s00, p01 = s00, s11 = s00, p11 = s00;
  for (int b = 0; b < 4; ++b) {  // activation register b = quads 4b .. 4b + 3
    const int8x16_t qa = vld1q_s8(q0 + 16 * b);
    const int8x16_t qb = kTwo ? vld1q_s8(q1 + 16 * b) : qa;
    PBS2P_SDOT_QUAD(0)
    PBS2P_SDOT_QUAD(1)
    PBS2P_SDOT_QUAD(2)
    PBS2P_SDOT_QUAD(3)
  }
  out[0] = s00, out[1] = p00, out[2] = s10, out[3] = p10, out[4] = s01, out[5] = p01, out[6] = s11, out[7] = p11;
}
#undef PBS2P_SDOT_QUAD

}  // namespace

void rows_sdot(PBS2P_ROWS_ARGS) {
  const Params& p = w.p;
  const size_t G = size_t(p.groups);
  const int chunks = a.chunks;
  const size_t qstride = size_t(chunks) * kChunkCols;
  alignas(16) int8_t planes[4 * kGroupStride];
  alignas(16) uint32_t am[kRows];  // alpha | mu << 16 per row
  uint64_t mw[kRows], pw[kRows];
  size_t kept[kRows];  // per row: sign bits consumed by the chunks before (chunks run in column order)
  for (int rb = r0; rb < r1; rb += kRows) {
    const int nr = r1 - rb < kRows ? r1 - rb : kRows;
    for (int t = t0; t < t1; ++t) std::memset(y + size_t(t) * ldy + size_t(rb), 0, size_t(nr) * sizeof(float));
    for (int i = 0; i < kRows; ++i) kept[i] = 0;
    for (int c = 0; c < chunks; ++c) {
      const size_t g = size_t(w.cm.group[size_t(c)]);
      const int b = w.cm.begin[size_t(c)], len = w.cm.begin[size_t(c) + 1] - b;
      const uint64_t len_mask = len == 64 ? ~uint64_t(0) : (uint64_t(1) << len) - 1;
      const bool fast_mask = (b & 7) == 0 && size_t(b >> 3) + 8 <= w.mask_row;
      // M = 8 and the chunk on whole runs: N kept bits per mask byte (validated), so no popcounts
      const bool runs = p.m == 8 && (b & 7) == 0 && (len & 7) == 0;
      const int run_kept = (len / 8) * p.n;
      for (int i = 0; i < kRows; ++i) {
        if (i >= nr) {
          mw[i] = pw[i] = 0;
          am[i] = 0;
          continue;
        }
        const size_t r = size_t(rb + i);
        const uint8_t* mrow = w.d.mask + r * w.mask_row;
        uint64_t m;
        if (fast_mask) {
          std::memcpy(&m, mrow + (b >> 3), 8);
          m &= len_mask;
        } else {
          m = take_bits(mrow, w.mask_row, size_t(b), len);
        }
        const int pc = runs ? run_kept : __builtin_popcountll(m);
        const uint8_t* srow = w.d.signs + r * w.sign_row;
        const size_t pos = kept[i], byte = pos >> 3;
        uint64_t s;
        if (byte + 8 <= w.sign_row && int(pos & 7) + pc <= 64) {
          std::memcpy(&s, srow + byte, 8);
          s >>= (pos & 7);
          if (pc < 64) s &= (uint64_t(1) << pc) - 1;
        } else {
          s = take_bits(srow, w.sign_row, pos, pc);
        }
        kept[i] = pos + size_t(pc);
        mw[i] = m;
        pw[i] = runs ? pdep64_runs(s, m, p.n) : pdep64(s, m);
        std::memcpy(&am[i], &w.d.scales[(r * G + g) * 2], 4);
      }
      float32x4_t alpha[4], mu[4];
      for (int gi = 0; gi < 4; ++gi) {
        expand4(mw + 4 * gi, pw + 4 * gi, planes + size_t(gi) * kGroupStride);
        alpha[gi] = half4(am + 4 * gi, false);
        mu[gi] = half4(am + 4 * gi, true);
      }
      const int8_t* qc = &a.q[size_t(c) * kChunkCols];
      const int groups = (nr + 3) / 4;
      for (int t = t0; t < t1; t += 2) {
        const bool two = t + 1 < t1;
        const int8_t* q0 = qc + size_t(t) * qstride;
        const float sc0 = a.scale[size_t(t) * chunks + c];
        const float sc1 = two ? a.scale[size_t(t + 1) * chunks + c] : 0.0f;
        float* y0 = y + size_t(t) * ldy + size_t(rb);
        float* y1 = two ? y0 + ldy : nullptr;
        for (int gi = 0; gi < groups; gi += 2) {
          // the planes stay in L1 and are streamed per token: without this barrier the compiler hoists all 64
          // plane loads of a group pair out of the token loop and spills them to the stack
          __asm__ __volatile__("" ::: "memory");
          int32x4_t acc[8];
          if (two) {
            gemm_8rows<true>(planes + size_t(gi) * kGroupStride, q0, q0 + qstride, acc);
          } else {
            gemm_8rows<false>(planes + size_t(gi) * kGroupStride, q0, q0, acc);
          }
          for (int h = 0; h < 2 && gi + h < groups; ++h) {
            const int row = 4 * (gi + h), n = nr - row;
            finish(acc[2 * h], acc[2 * h + 1], alpha[gi + h], mu[gi + h], sc0, y0 + row, n);
            if (two) finish(acc[4 + 2 * h], acc[5 + 2 * h], alpha[gi + h], mu[gi + h], sc1, y1 + row, n);
          }
        }
      }
    }
  }
  add_salient_and_bias_compact(w, x, r0, r1, t0, t1, y, ldy);
}

}  // namespace pbs2p

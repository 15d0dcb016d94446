// The swiglu epilogue's loop, compiled once per instruction set (epilogue.cpp: the baseline, SSE2 or NEON;
// epilogue_avx2.cpp, epilogue_avx512.cpp on x86-64): the same float32 operations in the same order everywhere
// (every file is built with -ffp-contract=off, so no fused multiply-add), so every variant and the numpy twin
// pbs2p_edge.format.swiglu give the same bits. Include with PBS2P_SWIGLU_NAME set to the function's name.
#include <cstdint>
#include <cstring>

#include "../kernels.h"

#ifndef PBS2P_SWIGLU_NAME
#error "define PBS2P_SWIGLU_NAME before including epilogue_body.h"
#endif

namespace pbs2p {
namespace {

// exp(x) for x in [-kExpClamp, kExpClamp] (Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, then a
// degree-7 polynomial in r, then 2^n from its exponent bits; about 1 ulp). Only float operations a compiler
// vectorizes without fast-math (the files are built with -fno-trapping-math, which lets it turn the clamps
// into selects; values are unchanged).
constexpr float kExpClamp = 87.0f;  // 2^n stays a normal float: |n| <= 126
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;    // 1.5 * 2^23: adding and subtracting it rounds to an integer
constexpr uint32_t kRoundBits = 0x4B400000u;  // its bits
constexpr float kLn2Hi = 0.693359375f;        // 9 significant bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_neg_clamped(float g) {
  float x = -g;  // sigmoid(g) = 1 / (1 + exp(-g)); NaN passes every comparison below unchanged
  x = x < -kExpClamp ? -kExpClamp : x;
  x = x > kExpClamp ? kExpClamp : x;
  const float t = x * kLog2e + kRoundMagic;  // n + 1.5 * 2^23: n sits in the low mantissa bits
  const float n = t - kRoundMagic;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const float z = r * r;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * z + r + 1.0f;
  uint32_t bits;  // 2^n: exponent field n + 127 (unsigned wrap-around, no undefined cases; NaN -> p is NaN)
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - kRoundBits + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int64_t kBlock = 256;  // columns per pass pair (exp into a stack buffer, then the division)

}  // namespace

void PBS2P_SWIGLU_NAME(const float* in, int t_begin, int t_end, int64_t f, float* out) {
  for (int t = t_begin; t < t_end; ++t) {
    const float* gate = in + size_t(t) * size_t(2 * f);
    const float* up = gate + f;
    float* o = out + size_t(t) * size_t(f);
    // Two short loops per block instead of one long body: compilers if-convert and vectorize each cleanly
    // (one fused loop ran 3-5x slower: duplicated divisions, long dependency chains).
    float e[kBlock];
    for (int64_t j0 = 0; j0 < f; j0 += kBlock) {
      const int64_t m = f - j0 < kBlock ? f - j0 : kBlock;
      for (int64_t j = 0; j < m; ++j) e[j] = exp_neg_clamped(gate[j0 + j]);
      for (int64_t j = 0; j < m; ++j) o[j0 + j] = gate[j0 + j] / (1.0f + e[j]) * up[j0 + j];
    }
  }
}

}  // namespace pbs2p

// Epilogues applied to a SparseBinaryMatMul node's float32 output after the matmul (every kernel path shares
// this code; docs/FORMAT.md, "Epilogue"). The numpy twin is pbs2p_edge.format.reference.swiglu: same float32
// operations in the same order (this file is built with -ffp-contract=off, so no fused multiply-add), so the
// two agree bit for bit.
#include <cstdint>
#include <cstring>

#include "../kernels.h"

namespace pbs2p {
namespace {

// exp(x) for x in [-kExpClamp, kExpClamp] (Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, then a
// degree-7 polynomial in r, then 2^n from its exponent bits; about 1 ulp). Only float operations a compiler
// vectorizes without fast-math: the loop below runs on SIMD lanes on every target.
constexpr float kExpClamp = 87.0f;  // 2^n stays a normal float: |n| <= 126
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
constexpr uint32_t kRoundBits = 0x4B400000u;  // its bits
constexpr float kLn2Hi = 0.693359375f;      // 9 significant bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float silu_times(float g, float u) {
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
  return g / (1.0f + p * scale) * u;
}

}  // namespace

void swiglu_rows(const float* in, int t_begin, int t_end, int64_t f, float* out) {
  for (int t = t_begin; t < t_end; ++t) {
    const float* gate = in + size_t(t) * size_t(2 * f);
    const float* up = gate + f;
    float* o = out + size_t(t) * size_t(f);
    for (int64_t j = 0; j < f; ++j) o[j] = silu_times(gate[j], up[j]);
  }
}

}  // namespace pbs2p

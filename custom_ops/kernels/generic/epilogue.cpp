// Epilogues applied to a SparseBinaryMatMul node's float32 output after the matmul (docs/FORMAT.md §5,
// "Epilogue"), shared by every kernel path: the baseline loop here, the wider x86-64 builds of the same loop
// (epilogue_avx2.cpp, epilogue_avx512.cpp) chosen once by CPUID. All give the same bits (epilogue_body.h).
#define PBS2P_SWIGLU_NAME swiglu_rows_generic
#include "epilogue_body.h"

namespace pbs2p {

std::vector<SwigluVariant> swiglu_variants() {
  std::vector<SwigluVariant> out;
#if defined(PBS2P_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f")) out.push_back({"avx512", swiglu_rows_avx512});
#endif
#if defined(PBS2P_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2")) out.push_back({"avx2", swiglu_rows_avx2});
#endif
  out.push_back({"generic", swiglu_rows_generic});
  return out;
}

void swiglu_rows(const float* in, int t_begin, int t_end, int64_t f, float* out) {
  static const SwigluFn best = swiglu_variants().front().fn;
  best(in, t_begin, t_end, f, out);
}

}  // namespace pbs2p

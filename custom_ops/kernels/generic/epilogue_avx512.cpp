#define PBS2P_SWIGLU_NAME swiglu_rows_avx512
#include "epilogue_body.h"  // built with -mavx512f (x86-64 only)

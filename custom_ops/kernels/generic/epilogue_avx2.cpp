#define PBS2P_SWIGLU_NAME swiglu_rows_avx2
#include "epilogue_body.h"  // built with -mavx2 (x86-64 only)

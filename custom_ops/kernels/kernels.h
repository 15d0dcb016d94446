// Sparse-binary matmul kernels: plain C++, raw pointers, no ONNX Runtime types.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "pbs2p/format.h"

namespace pbs2p {

// Borrowed view of the disk arrays (docs/FORMAT.md), sizes in elements.
struct DiskView {
  const int32_t* header = nullptr;
  size_t header_len = 0;
  const uint8_t* mask = nullptr;
  size_t mask_len = 0;
  const uint8_t* signs = nullptr;
  size_t signs_len = 0;
  const uint16_t* scales = nullptr;  // fp16 bits, [rows][G][2]
  size_t scales_len = 0;
  const int32_t* salient_cols = nullptr;  // [G][S]
  size_t salient_cols_len = 0;
  const uint8_t* salient_signs = nullptr;  // [rows][ceil(G*S/8)]
  size_t salient_signs_len = 0;
  const uint16_t* alpha2 = nullptr;  // fp16 bits, [rows][G]
  size_t alpha2_len = 0;
  const float* bias = nullptr;  // [rows]
  size_t bias_len = 0;
  const uint16_t* col_scales = nullptr;  // fp16 bits, [K] (version 2 with kFlagColScales), else empty
  size_t col_scales_len = 0;
};

struct Params {
  int version = 0, n = 0, m = 0, group_size = 0, rows = 0, k = 0, salient = 0, groups = 0;
  bool has_bias = false, has_col_scales = false;
};

// Expected element counts of every disk array for given parameters (size_t products overflow-checked).
struct DiskSizes {
  size_t mask, signs, scales, salient_cols, salient_signs, alpha2, bias, col_scales;
};
std::string disk_sizes(const Params& p, DiskSizes* out);

// Parse and validate the header, every field against its range (hostile input: any int32 values); "" on
// success, else a one-line message.
std::string parse_header(const int32_t* header, size_t len, Params* out);
// Validate every array's element count against the header, the N:M mask, salient columns (inside their group,
// distinct) and finite fp16 scales; "" on success. After this, every index the kernels compute is in bounds.
std::string validate(const DiskView& disk, const Params& p);

// Runtime (repacked) weight, built once per session.
struct RuntimeWeight {
  Params p;
  TileLayout layout = kLayoutRowBytes;  // where each code sits in a 32-byte quad block (format.h)
  int tiles = 0;                        // ceil(rows / kTileRows)
  // Tiles whose quad blocks share one stream: each whole group of `interleave` tiles stores [k/4][interleave][32]
  // (quad q of all its tiles side by side), the tiles after the last whole group [k/4][32] each (tile_view).
  int interleave = 1;
  std::vector<uint8_t> codes;           // tiles * (k/4) * 32 bytes, tile t's group at t / interleave * interleave
  std::vector<uint16_t> scales;         // [tiles][G] TileScales
  std::vector<int32_t> salient_cols;    // [G][S]
  std::vector<int8_t> salient_coef;     // [tiles][G][S][32]: +1, -1, 0 (pruned)
  std::vector<uint16_t> alpha2;         // [tiles][G][32]
  std::vector<float> bias;              // [rows] or empty
  std::vector<float> col_scales;        // [k] (fp16 values as float) or empty
  size_t runtime_bytes() const;
};

// One tile as every tile kernel walks it: its first row, its row count (the last tile may be short), K/4 quads
// per row, the scale groups, its first quad block and the bytes from one of its quad blocks to the next (32, or
// 32 x interleave inside a whole interleaved group). Quad q's 32 bytes: codes + q * stride (quad_block).
struct TileView {
  int r0, nr;
  size_t quads, groups;
  const uint8_t* codes;
  size_t stride;
};
inline TileView tile_view(const RuntimeWeight& w, int tile) {
  const int r0 = tile * kTileRows;
  const size_t quads = size_t(w.p.k) / 4, block = kTileRows;
  const int n = w.interleave, first = tile / n * n;
  const bool grouped = n > 1 && first + n <= w.tiles;
  const size_t base = grouped ? size_t(first) * quads * block + size_t(tile - first) * block
                              : size_t(tile) * quads * block;
  return {r0, std::min(kTileRows, w.p.rows - r0), quads, size_t(w.p.groups), &w.codes[base],
          grouped ? block * size_t(n) : block};
}
inline const uint8_t* quad_block(const TileView& v, size_t q) { return v.codes + q * v.stride; }

// Nibble of row i (< kTileRows) in one 32-byte quad block: pair 0 = columns (4q, 4q+1), pair 1 = (4q+2, 4q+3).
inline int quad_nibble(const uint8_t* block, TileLayout layout, int i, int pair) {
  if (layout == kLayoutRowPairs) return (block[2 * (i % 16) + pair] >> (i >= 16 ? 4 : 0)) & 15;
  return (block[i] >> (4 * pair)) & 15;
}

// Disk -> runtime layout, codes arranged as `layout`, whole groups of `interleave` tiles (1..kMaxInterleave)
// sharing one stream. "" on success, else a message (sizes, magic, N:M violations...).
constexpr int kMaxInterleave = 8;
std::string repack(const DiskView& disk, RuntimeWeight* out, TileLayout layout = kLayoutRowBytes,
                   int interleave = 1);

// Disk -> dense float W_hat [rows][k] (the formula of format.h with fp16 scales), for tests.
std::string decode_dense(const DiskView& disk, std::vector<float>* w);

// Activation quantization + tables for `tokens` rows of x [tokens][k].
struct ActTables {
  int tokens = 0, k = 0, chunks = 0;
  std::vector<QuadTable> tables;  // [tokens][k/4]
  std::vector<float> scale;       // [tokens][chunks] dequantization scale (0 = all-zero chunk)
};
// Describes t for `tokens` tokens of width k over `chunks` chunks and sizes its arrays: grown, never shrunk, not
// zero-filled (the table builders write every entry before a kernel reads it).
inline void size_tables(ActTables& t, int tokens, int k, int chunks) {
  t.tokens = tokens;
  t.k = k;
  t.chunks = chunks;
  const size_t n_tables = size_t(tokens) * size_t(k / 4), n_scales = size_t(tokens) * size_t(chunks);
  if (t.tables.size() < n_tables) t.tables.resize(n_tables);
  if (t.scale.size() < n_scales) t.scale.resize(n_scales);
}
// Chunk c covers columns [chunk_begin(c), chunk_begin(c+1)); chunks never cross group boundaries.
struct ChunkMap {
  std::vector<int> begin;  // size chunks + 1
  std::vector<int> group;  // group of each chunk
};
ChunkMap make_chunks(int k, int group_size);
// Quantizes x and fills t->tables / t->scale for tokens [token_begin, token_end); dispatches like the tile
// kernels (every implementation produces identical bytes).
void build_tables(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t);
using TableFn = void (*)(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t);
void build_tables_generic(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t);
// Rearranges built tables in place for avx512-vbmi-tile: within each chunk, the storage of quads (q, q+1)
// (q - chunk's first quad even) becomes [d_lo d_hi of q | d_lo d_hi of q+1] then [s_lo s_hi of q | s_lo s_hi of
// q+1], the two 64-byte registers that kernel looks up in; a chunk's last quad of an odd count stays as it was.
void pair_quad_tables(int token_begin, int token_end, const ChunkMap& cm, ActTables* t);
#if defined(PBS2P_HAVE_AVX2)
void build_tables_avx2(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t);
void build_tables_avx2_paired(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t);
#endif
TableFn table_fn_by_name(const char* name);

// Main (table-lookup) term of y[t][r] for one row tile and tokens [t_begin, t_end); y is [tokens][rows] and
// rows past `rows` are not written. The salient term and bias are added by add_salient_and_bias().
#define PBS2P_TILE_ARGS                                                                                     \
  const RuntimeWeight &w, const ChunkMap &cm, const ActTables &t, int tile, int t_begin, int t_end, float *y
using TileFn = void (*)(PBS2P_TILE_ARGS);

void tile_generic(PBS2P_TILE_ARGS);
#if defined(PBS2P_HAVE_AVX2)
void tile_avx2(PBS2P_TILE_ARGS);
#endif
#if defined(PBS2P_HAVE_AVX512VBMI)
// avx512/tile_vbmi.cpp, the only file built with -mavx512vbmi: the avx2 kernel's sums and float steps over the
// kLayoutRowPairs codes (byte permutes, no unpacks), two quads per zmm; same bits as tile_avx2.
void tile_avx512vbmi(PBS2P_TILE_ARGS);
// The same over tiles `tile` .. `tile + 3` in one pass, each tile's bits as tile_avx512vbmi's: each table load
// serves four tiles, and four code streams are read side by side (decode; docs/METHOD.md "Session 15").
void tile_quad_avx512vbmi(PBS2P_TILE_ARGS);
#endif
#if defined(PBS2P_HAVE_NEON)
void tile_neon(PBS2P_TILE_ARGS);
void build_tables_neon(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t);
#endif

// Best kernel for this CPU (AVX2+FMA+F16C checked at run time; NEON always on aarch64) and its name.
TileFn best_tile_fn(const char** name);
// Kernel by name ("generic", "avx2", "neon"); nullptr if not built or not supported by this CPU.
TileFn tile_fn_by_name(const char* name);

// Shared helpers for the tile kernels.
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
// half_to_float for finite values (validate() rejects inf/NaN in every fp16 array the kernels read), same bits;
// branch-free, so loops over it vectorize (real alpha2 holds many zeros: a branch on them mispredicts).
inline float half_to_float_finite(uint16_t h) {
  const uint32_t mag = uint32_t(h & 0x7fffu);
  const float sub = float(int32_t(h & 0x3ffu)) * 0x1p-24f;  // exponent 0: mant * 2^-24, a normal float32
  uint32_t sub_bits;
  __builtin_memcpy(&sub_bits, &sub, 4);
  const uint32_t normal = uint32_t(-int32_t(mag >= 0x400u));  // all ones when the exponent is not 0
  const uint32_t bits = (uint32_t(h & 0x8000u) << 16) | (((mag << 13) + (112u << 23)) & normal) | (sub_bits & ~normal);
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// The salient second-order term (exact float x) and the bias of one block of at most kTileRows rows (lane i =
// the block's row i), for tokens [t0, t1); y points at the block's first row, row stride ldy. Per output, in
// this order: for each group g, acc = 0 + coef[g][0] * x[col[g][0]] + ... (float, in s order), then
// y = fma(alpha2[g], acc, y); then y += bias. Lanes >= nr must hold coef 0 and alpha2 0 (they are not written).
struct SalientBlock {
  int groups = 0, salient = 0, nr = 0, k = 0;
  const int32_t* cols = nullptr;     // [G][S]
  const int8_t* coef = nullptr;      // [G][S][kTileRows]: +1, -1, 0 (pruned)
  const uint16_t* alpha2 = nullptr;  // [G][kTileRows] fp16 bits
  const float* bias = nullptr;       // [nr], or nullptr
};
using SalientFn = void (*)(const SalientBlock& b, const float* x, int t0, int t1, float* y, size_t ldy);
void salient_block_generic(const SalientBlock& b, const float* x, int t0, int t1, float* y, size_t ldy);
#if defined(PBS2P_HAVE_AVX2)
void salient_block_avx2(const SalientBlock& b, const float* x, int t0, int t1, float* y, size_t ldy);  // +FMA+F16C
#endif
// The post-pass that goes with a tile kernel (its ISA's; the generic one, which compilers vectorize, otherwise).
SalientFn salient_fn_for(TileFn fn);
// Adds the salient term and the bias for one tile and tokens [t_begin, t_end) (y: [tokens][rows]).
void add_salient_and_bias(const RuntimeWeight& w, const float* x, int tile, int t_begin, int t_end, float* y,
                          SalientFn fn = salient_block_generic);

// x itself when col_scales is empty, else x * c (float32 products, one pass) written into *scratch, which is
// grown as needed. Every kernel and the numpy/PyTorch twins scale exactly this way.
const float* scale_by_columns(const std::vector<float>& col_scales, const float* x, size_t tokens,
                              std::vector<float>* scratch);
inline const float* scale_activations(const RuntimeWeight& w, const float* x, size_t tokens,
                                      std::vector<float>* scratch) {
  return scale_by_columns(w.col_scales, x, tokens, scratch);
}
// The int7 quantization of one chunk x[b, e) shared by every path: q[0, e - b) = clamp(round_half_even(x * 63 /
// max|x|)); returns the chunk scale max|x| / 63 (NaN, with q all 0, when the chunk holds a non-finite value).
float quantize_chunk(const float* x, int b, int e, int8_t* q);
// The sign patterns the SIMD table builders multiply the activations by, per 4-bit index `c0 | c1 << 2` of a
// column pair: pa[i] = v(c0), pa[16 + i] = |v(c0)|, and pb likewise for c1 (v = +1, -1 or 0 for a pruned code).
void pair_sign_patterns(int8_t pa[32], int8_t pb[32]);

// Whole matmul on the calling thread (tests, single-threaded users): y [tokens][rows] = x [tokens][k] @ W_hat^T.
void matmul(const RuntimeWeight& w, TileFn fn, const float* x, int tokens, float* y, TableFn tables = nullptr);
struct Kernel;
// The same with a tile kernel path (its tables and run_tiles: `multi` where it has one).
void matmul(const RuntimeWeight& w, const Kernel& k, const float* x, int tokens, float* y);

// ---------------- compact kernels: read the disk layout in place ----------------

// A validated weight as the compact kernels read it: borrowed pointers into the disk arrays (ONNX Runtime's
// initializers, never copied) plus per-chunk bookkeeping and the column scales as float (K floats).
struct CompactWeight {
  Params p;
  DiskView d;
  size_t mask_row = 0, sign_row = 0, sal_row = 0;  // bytes per row of mask, signs, salient_signs
  ChunkMap cm;
  std::vector<int64_t> kept_base;  // per chunk: kept weights before the chunk's aligned M-run, (begin / M) * N
  std::vector<int> pre_bits;       // per chunk: begin % M (mask bits of the run before the chunk, popcounted)
  std::vector<float> col_scales;   // [k] or empty
};
// parse + validate, then borrow the arrays; "" on success. d's arrays must outlive w.
std::string prepare(const DiskView& d, CompactWeight* w);

// Activations of tokens [t0, t1) quantized per chunk to int7 (docs/FORMAT.md 3), each chunk zero-padded to 64
// bytes: q [tokens][chunks][64], scale [tokens][chunks] (NaN for a chunk holding a non-finite value).
struct QuantActs {
  int tokens = 0, chunks = 0;
  std::vector<int8_t> q;
  std::vector<float> scale;
};
void quantize(const float* x, int k, int tokens, const ChunkMap& cm, QuantActs* a);
// Sizes *a for `tokens` tokens without filling it; quantize_tokens then fills tokens [t0, t1) (thread-parallel).
void size_quant(int tokens, const ChunkMap& cm, QuantActs* a);
void quantize_tokens(const float* x, int k, int t0, int t1, const ChunkMap& cm, QuantActs* a);

// Rows [r0, r1) x tokens [t0, t1) of y = x @ W_hat^T + salient + bias, written at y[t * ldy + r] (x = the
// column-scaled activations, a = their quantization). Every implementation gives identical bits.
#define PBS2P_ROWS_ARGS                                                                                          \
  const CompactWeight &w, const QuantActs &a, const float *x, int r0, int r1, int t0, int t1, float *y, size_t ldy
using RowsFn = void (*)(PBS2P_ROWS_ARGS);
void rows_generic(PBS2P_ROWS_ARGS);
#if defined(PBS2P_HAVE_AVX512)
void rows_avx512vnni(PBS2P_ROWS_ARGS);
#endif
#if defined(PBS2P_HAVE_SDOT)
void rows_sdot(PBS2P_ROWS_ARGS);  // neon/compact_sdot.cpp, the only file built with +dotprod
bool cpu_has_dotprod();           // getauxval(AT_HWCAP) & HWCAP_ASIMDDP (neon/tile_neon.cpp, built for ARMv8.0)
#endif

// n (<= 64) bits starting at bit `pos` of a row of `nbytes` bytes, LSB first; never reads outside the row.
inline uint64_t bits_at(const uint8_t* row, size_t nbytes, size_t pos, int n) {
  if (n == 0) return 0;
  const size_t byte = pos >> 3;
  const int sh = int(pos & 7);
  uint64_t lo = 0, hi = 0;
  if (byte + 9 <= nbytes) {
    __builtin_memcpy(&lo, row + byte, 8);
    hi = row[byte + 8];
  } else {
    const size_t avail = nbytes - byte;
    __builtin_memcpy(&lo, row + byte, avail < 8 ? avail : 8);
    if (avail > 8) hi = row[byte + 8];
  }
  const uint64_t v = sh ? (lo >> sh) | (hi << (64 - sh)) : lo;
  return n == 64 ? v : v & ((uint64_t(1) << n) - 1);
}

// Mask and sign bits of row r, chunk c: *mask = the chunk's mask bits (bit i = column begin + i), *signs = the
// signs of its kept weights in column order (popcount(*mask) bits).
void chunk_bits(const CompactWeight& w, int r, int c, uint64_t* mask, uint64_t* signs);
// Salient term (exact scaled x) and bias for rows [r0, r1) x tokens [t0, t1), added to y in a fixed order.
// Builds the coefficients of each kTileRows-row block from the disk bits once per call, then runs fn over the tokens.
void add_salient_and_bias_compact(const CompactWeight& w, const float* x, int r0, int r1, int t0, int t1, float* y,
                                  size_t ldy, SalientFn fn = salient_block_generic);
inline const float* scale_activations(const CompactWeight& w, const float* x, size_t tokens,
                                      std::vector<float>* scratch) {
  return scale_by_columns(w.col_scales, x, tokens, scratch);
}

// Prefill over the tile copy (no tables): rows of one tile x tokens [t0, t1) from the int7 activations of
// quantize(), the compact kernels' integer sums (kept S, +1 P) and float steps, so identical bits; y is
// [tokens][rows] as for the tile kernels, the salient term and bias are added by add_salient_and_bias().
#define PBS2P_TILE_GEMM_ARGS                                                                                  \
  const RuntimeWeight &w, const ChunkMap &cm, const QuantActs &a, int tile, int t0, int t1, float *y
using TileGemmFn = void (*)(PBS2P_TILE_GEMM_ARGS);
#if defined(PBS2P_HAVE_AVX512)
void tile_gemm_avx512vnni(PBS2P_TILE_GEMM_ARGS);  // either layout (w.layout)
#endif
#if defined(PBS2P_HAVE_AVXVNNI)
void tile_gemm_avxvnni(PBS2P_TILE_GEMM_ARGS);  // avx2/tile_gemm_avxvnni.cpp: VEX vpdpbusd (ymm), no AVX-512
#endif

// ---------------- kernel registry and dispatch ----------------
// A kernel path: compact (reads the disk layout through CompactWeight) or tile (the older table-lookup kernels
// over the repacked 2.25-bit RuntimeWeight, kept for ISAs without a compact path: avx2, neon).
// A hybrid (compact kernel + `gemv`) keeps both forms: the tile kernel `gemv` for calls of at most kHybridGemv
// tokens (decode), the compact kernel for more (prefill); it holds the repacked copy besides ORT's initializers.
struct Kernel {
  const char* name;
  bool compact;
  RowsFn rows;                    // compact
  TileFn tile;                    // tile
  TableFn tables;                 // tile
  const Kernel* gemv = nullptr;   // hybrid: the tile kernel used for few tokens
  TileGemmFn gemm = nullptr;      // tile: calls of more than kHybridGemv tokens (prefill) over the same copy
  TileLayout layout = kLayoutRowBytes;  // tile: the code arrangement `tile` and `gemm` read (repack's argument)
  bool paired_tables = false;           // tile: `tables` writes pair_quad_tables' arrangement
  TileFn multi = nullptr;               // tile: `tile` over multi_tiles adjacent tiles at once (decode)
  int multi_tiles = 1;                  // also the copy's interleave: `multi` reads one stream per group
};
// The tile copy `k` reads: its layout, whole groups of k.multi_tiles tiles interleaved.
inline std::string repack_for(const DiskView& d, const Kernel& k, RuntimeWeight* w) {
  return repack(d, w, k.layout, k.multi_tiles);
}
// Tiles [tile_begin, tile_end) of one call with k's tile kernel: `multi` over whole groups of multi_tiles, `tile`
// for the rest. Same bits either way.
void run_tiles(const Kernel& k, const RuntimeWeight& w, const ChunkMap& cm, const ActTables& t, int tile_begin,
               int tile_end, int t_begin, int t_end, float* y);
constexpr int kHybridGemv = 8;  // measured crossover at 4096x4096 on Zen 4 (pbs2p_kernel_bench)
// Every kernel built into this binary, in preference order (best first).
const std::vector<const Kernel*>& built_kernels();
// Can this CPU run it (CPUID at run time)?
bool kernel_supported(const Kernel& k);
// The kernel to use: $PBS2P_KERNEL when set ("" on success, else a one-line error: unknown name or a path this
// CPU cannot run), else the best supported one.
std::string select_kernel(const Kernel** out);
const Kernel* kernel_by_name(const char* name);  // built and supported, else nullptr

// Whole matmul from the disk arrays with one kernel on the calling thread (tests, fuzzing, benchmarks).
std::string matmul_disk(const DiskView& d, const Kernel& k, const float* x, int tokens, float* y);

// ---------------- epilogue: after the matmul, shared by every kernel path (generic/epilogue*.cpp) ----------------
// SwiGLU of a [tokens][2f] matmul output (gate = columns [0, f), up = columns [f, 2f)): out[t][j] =
// silu(gate) * up in float32, a fixed operation order (numpy twin: pbs2p_edge.format.swiglu), tokens
// [t_begin, t_end). `out` [tokens][f] must not overlap `in`. Every variant gives the same bits; swiglu_rows
// calls the first of swiglu_variants() (this CPU's widest).
using SwigluFn = void (*)(const float* in, int t_begin, int t_end, int64_t f, float* out);
struct SwigluVariant {
  const char* name;
  SwigluFn fn;
};
std::vector<SwigluVariant> swiglu_variants();  // the variants this CPU runs, widest first
void swiglu_rows_generic(const float* in, int t_begin, int t_end, int64_t f, float* out);
#if defined(PBS2P_HAVE_AVX2)
void swiglu_rows_avx2(const float* in, int t_begin, int t_end, int64_t f, float* out);
#endif
#if defined(PBS2P_HAVE_AVX512)
void swiglu_rows_avx512(const float* in, int t_begin, int t_end, int64_t f, float* out);
#endif
void swiglu_rows(const float* in, int t_begin, int t_end, int64_t f, float* out);

}  // namespace pbs2p

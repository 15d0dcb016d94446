// Sparse-binary matmul kernels: plain C++, raw pointers, no ONNX Runtime types.
#pragma once

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
  int tiles = 0;                        // ceil(rows / kTileRows)
  std::vector<uint8_t> codes;           // [tiles][k/4][32]
  std::vector<uint16_t> scales;         // [tiles][G] TileScales
  std::vector<int32_t> salient_cols;    // [G][S]
  std::vector<int8_t> salient_coef;     // [tiles][G][S][32]: +1, -1, 0 (pruned)
  std::vector<uint16_t> alpha2;         // [tiles][G][32]
  std::vector<float> bias;              // [rows] or empty
  std::vector<float> col_scales;        // [k] (fp16 values as float) or empty
  size_t runtime_bytes() const;
};

// Disk -> runtime layout. "" on success, else a message (sizes, magic, N:M violations...).
std::string repack(const DiskView& disk, RuntimeWeight* out);

// Disk -> dense float W_hat [rows][k] (the formula of format.h with fp16 scales), for tests.
std::string decode_dense(const DiskView& disk, std::vector<float>* w);

// Activation quantization + tables for `tokens` rows of x [tokens][k].
struct ActTables {
  int tokens = 0, k = 0, chunks = 0;
  std::vector<QuadTable> tables;  // [tokens][k/4]
  std::vector<float> scale;       // [tokens][chunks] dequantization scale (0 = all-zero chunk)
};
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
#if defined(PBS2P_HAVE_AVX2)
void build_tables_avx2(const float* x, int token_begin, int token_end, const ChunkMap& cm, ActTables* t);
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
#if defined(PBS2P_HAVE_NEON)
void tile_neon(PBS2P_TILE_ARGS);
#endif

// Best kernel for this CPU (AVX2+FMA+F16C checked at run time; NEON always on aarch64) and its name.
TileFn best_tile_fn(const char** name);
// Kernel by name ("generic", "avx2", "neon"); nullptr if not built or not supported by this CPU.
TileFn tile_fn_by_name(const char* name);

// Shared helpers for the tile kernels.
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
// Adds the salient second-order term (exact float x) and the bias for one tile and tokens [t_begin, t_end).
void add_salient_and_bias(const RuntimeWeight& w, const float* x, int tile, int t_begin, int t_end, float* y);

// x itself when w has no column scales, else x * c (float32 products, one pass) written into *scratch, which is
// grown as needed. Every kernel and the numpy/PyTorch twins scale exactly this way.
const float* scale_activations(const RuntimeWeight& w, const float* x, size_t tokens, std::vector<float>* scratch);

// Whole matmul on the calling thread (tests, single-threaded users): y [tokens][rows] = x [tokens][k] @ W_hat^T.
void matmul(const RuntimeWeight& w, TileFn fn, const float* x, int tokens, float* y, TableFn tables = nullptr);

}  // namespace pbs2p

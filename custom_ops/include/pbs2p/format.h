// Packed sparse-binary weight format (docs/FORMAT.md is the prose twin of this header; both must agree,
// tests/test_format.py checks the constants against pbs2p_edge.format).
//
// Logical layer: W_hat[r, j] = c[j] * mask[r, j] * (alpha[r, g] * s[r, j] + mu[r, g] + salient? alpha2[r, g] * s2[r, j]),
// g = j / group_size, every aligned run of M columns of a row keeps exactly N weights; c[j] (version 2, flag
// kFlagColScales) is a per-input-column fp16 scale, 1 when absent. The kernels compute y = W_hat_v1 @ (x * c):
// activations are multiplied by c (float32 product) before quantization, and the salient term uses the scaled x.
//
// Versions: 1 = 8 arrays (header .. bias); 2 = 9 arrays, col_scales appended last. Writers emit version 2,
// readers accept both (kMinVersion .. kVersion) and refuse anything else.
//
// Two layouts exist:
//  * the DISK layout (ONNX initializers, checkpoint arrays): 1 mask bit per weight + 1 sign bit per KEPT weight
//    + fp16 scales: (1 + N/M) bits per weight + 32/group_size. Smallest honest encoding that is still cheap to
//    decode without tables.
//    The compact kernels (generic, avx512-vnni) read it in place, straight from ONNX Runtime's initializers.
//  * the TILE layout (built once at session creation by repack(), for the tile paths and the decode half of the
//    hybrids): 2-bit ternary codes interleaved over tiles of 32 rows, read by the table-lookup kernels and the
//    tile GEMMs: 2 + 32/group_size bits per weight, independent of N. Two arrangements of a quad's 32 bytes
//    (TileLayout below), the same bits.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pbs2p {

// ---- header (int32 little-endian, kHeaderLen entries) ----
constexpr int32_t kMagic = 0x50324250;  // bytes "PB2P"
constexpr int32_t kVersion = 2;     // written by the packer
constexpr int32_t kMinVersion = 1;  // oldest version still read (no col_scales, flag bit 2 unknown)
enum HeaderField : int {
  kHdrMagic = 0,
  kHdrVersion = 1,
  kHdrN = 2,
  kHdrM = 3,
  kHdrGroupSize = 4,
  kHdrRows = 5,
  kHdrK = 6,
  kHdrFlags = 7,     // bit 0 salient, bit 1 bias, bit 2 col_scales (version 2 only), others 0
  kHdrSalient = 8,  // S: salient columns per group (0 = none)
  kHdrGroups = 9,   // G = ceil(K / group_size)
  kHeaderLen = 16,  // entries 10..15 reserved, must be 0
};
constexpr int32_t kFlagSalient = 1;
constexpr int32_t kFlagBias = 2;
constexpr int32_t kFlagColScales = 4;  // version 2: col_scales fp16 [K] present

// Accepted parameter ranges (the packer refuses anything else).
constexpr int kMaxM = 16;             // M in {4, 8, 16}; K % M == 0
constexpr int kMaxGroupSize = 4096;   // group_size % 4 == 0

// ---- disk layout, ggml-style view of one row's 64 columns at M = 8 ----
// mask bits LSB-first (column j -> byte j/8, bit j%8); the kept weights' signs follow in column order,
// LSB-first, 1 = +1, concatenated over the whole row, so 64 columns hold exactly 8*N/8 = N sign bytes.
template <int N>
struct DiskBlock64 {
  uint8_t mask[8];
  uint8_t signs[N];
};
static_assert(sizeof(DiskBlock64<6>) == 14, "6:8 block: 14 bytes / 64 weights = 1.75 bpw before scales");
static_assert(sizeof(DiskBlock64<5>) == 13, "5:8 block: 13 bytes / 64 weights = 1.625 bpw before scales");
static_assert(sizeof(DiskBlock64<4>) == 12, "4:8 block: 12 bytes / 64 weights = 1.5 bpw before scales");

// Disk scales: fp16 pairs (alpha, mu) per row and group: [rows][G][2]. Column scales (v2): fp16 [K].
struct DiskScales {
  uint16_t alpha;
  uint16_t mu;
};
static_assert(sizeof(DiskScales) == 4, "32 bits per row and group: 0.25 bpw at group_size 128");

// ---- runtime layout ----
constexpr int kTileRows = 32;  // rows per tile (one AVX2 register of byte codes, two NEON registers)
constexpr int kChunkCols = 64; // activation quantization block (columns), never crosses a group boundary
constexpr int kActMax = 63;    // activations quantized to int7 [-63, 63] so a 2-column table entry fits int8

// Ternary 2-bit code of one weight.
enum Code : uint8_t { kCodeZero = 0, kCodePlus = 1, kCodeMinus = 2 };

// 32 rows x 4 columns: byte i = row i of the tile; low nibble = columns (4q, 4q+1) as c0 | c1 << 2,
// high nibble = columns (4q+2, 4q+3).
struct TileQuad {
  uint8_t codes[kTileRows];
};
static_assert(sizeof(TileQuad) * 8 == 2 * kTileRows * 4, "runtime codes: exactly 2 bits per weight");

// Arrangement of a tile's codes inside each 32-byte quad block (the tile's 32 rows x 4 columns); both hold the
// same 64 nibbles (nibble = the 2 codes of a column pair, c0 | c1 << 2), only their places differ.
enum TileLayout : int {
  // byte i = row i: low nibble = columns (4q, 4q+1), high nibble = columns (4q+2, 4q+3). Every tile path.
  kLayoutRowBytes = 0,
  // byte 2i + h (i < 16, h = 0 low pair / 1 high pair): low nibble = row i's pair h, high nibble = row 16 + i's
  // pair h. Masking out the low (or high) nibbles gives 16 rows with their two pair indices side by side, so one
  // byte permute over a [d_lo | d_hi] table and one vpmaddubsw per 16 rows form the row sums with no unpack
  // (avx512-vbmi-tile).
  kLayoutRowPairs = 1,
};
struct RowPairsQuad {
  uint8_t nibbles[kTileRows];  // [2 * (i % 16) + pair] low nibble: row i < 16, high nibble: row i + 16
};
static_assert(sizeof(RowPairsQuad) == sizeof(TileQuad), "both layouts: 2 bits per weight, 32 bytes per quad");

// Per tile and group: fp16 alpha of the 32 rows, then fp16 mu of the 32 rows.
struct TileScales {
  uint16_t alpha[kTileRows];
  uint16_t mu[kTileRows];
};
static_assert(sizeof(TileScales) == 128, "32 bits per row and group, as on disk");

// Activation table of one quad (4 columns) for one token: 16-entry int8 tables indexed by a nibble code.
// d = sum of code-signed activations (for alpha), s = sum of kept activations (for mu); lo = columns 4q..4q+1.
struct QuadTable {
  int8_t d_lo[16];
  int8_t s_lo[16];
  int8_t d_hi[16];
  int8_t s_hi[16];
};
static_assert(sizeof(QuadTable) == 64, "64 bytes of tables per 4 activations");

// Bits per weight of the disk layout, counting everything but the fixed 64-byte header.
constexpr double disk_bits_per_weight(int n, int m, int group_size, int salient) {
  return 1.0 + double(n) / m + 32.0 / group_size + (salient > 0 ? (double(salient) + 16.0) / group_size : 0.0);
}
// Bits per weight the runtime kernels stream (codes + scales [+ salient coefficients and alpha2]).
constexpr double runtime_bits_per_weight(int group_size, int salient) {
  return 2.0 + 32.0 / group_size + (salient > 0 ? (8.0 * salient + 16.0) / group_size : 0.0);
}

}  // namespace pbs2p

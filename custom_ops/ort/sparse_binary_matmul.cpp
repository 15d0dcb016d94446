// ONNX Runtime glue for SparseBinaryMatMul (domain pbs2p.edge, op version 2), lite custom-op API.
// Inputs: X, then the packed arrays header .. bias (format version 1: 9 inputs in all) and optionally col_scales
// (format version 2: 10 inputs); the lite API declares every input optional, so graphs of either length load.
// No exception ever crosses into ONNX Runtime: problems become an OrtStatus naming the shapes.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "../kernels/kernels.h"

namespace {

using Ort::Custom::Tensor;
using F16 = Ort::Float16_t;

constexpr const char* kOpName = "SparseBinaryMatMul";
constexpr const char* kDomain = "pbs2p.edge";
// 2: optional 10th input col_scales; 3: multi-block nodes (attribute blocks); 4: attribute activation (epilogue)
constexpr int kOpVersion = 4;
constexpr size_t kMinInputs = 9, kMaxInputs = 10;  // one block: X + 8 (format v1) or 9 (format v2) arrays
constexpr size_t kArraysPerBlock = 9;             // header .. col_scales
constexpr int64_t kMaxBlocks = 64;
constexpr int kTokenBlock = 4;  // tokens per GEMM work item: their tables stay in L2 while tiles stream

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

Ort::Status error(const std::string& msg) { return Ort::Status((std::string(kOpName) + ": " + msg).c_str(), ORT_INVALID_ARGUMENT); }

// Epilogue after the matmul (optional string attribute `activation`; docs/FORMAT.md "Epilogue"): "none" (the
// default: Y is the matmul output [.., rows]) or "swiglu" (Y [.., rows / 2] = silu(gate) * up, gate = the first
// rows / 2 output columns, up = the rest), computed by pbs2p::swiglu_rows on complete rows.
enum class Activation { kNone, kSwiglu };
constexpr int kEpilogueTokens = 16;  // tokens per epilogue work item (prefill)

// Parses the attribute's value; "" on success, else the message.
std::string parse_activation(const std::string& value, int64_t rows, Activation* out) {
  if (value == "none") {
    *out = Activation::kNone;
  } else if (value == "swiglu") {
    *out = Activation::kSwiglu;
    if (rows % 2 != 0)
      return "attribute activation='swiglu' needs an even row count (gate rows, then as many up rows), got rows=" +
             std::to_string(rows);
  } else {
    return "attribute activation='" + value + "' is not supported (expected 'none' or 'swiglu')";
  }
  return "";
}

struct EpilogueWork {
  const float* in;
  float* out;
  int64_t f;
  int tokens;
};

void swiglu_task(void* data, size_t i) {
  const EpilogueWork& wk = *static_cast<const EpilogueWork*>(data);
  const int t0 = int(i) * kEpilogueTokens, t1 = std::min(wk.tokens, t0 + kEpilogueTokens);
  pbs2p::swiglu_rows(wk.in, t0, t1, wk.f, wk.out);
}

// The (attribute) parameters an exporter wrote; checked against every header.
struct Attrs {
  int64_t n = -1, m = -1, group_size = -1, rows = -1, k = -1, salient = 0, has_bias = 0, has_col_scales = 0;
};

std::string check_attrs(const Attrs& a, const pbs2p::Params& p) {
  std::ostringstream os;
  auto cmp = [&](const char* name, int64_t attr, int64_t hdr) {
    if (attr != hdr && os.tellp() == 0) os << "attribute " << name << "=" << attr << " but the packed header says " << hdr;
  };
  cmp("n", a.n, p.n);
  cmp("m", a.m, p.m);
  cmp("group_size", a.group_size, p.group_size);
  cmp("rows", a.rows, p.rows);
  cmp("k", a.k, p.k);
  cmp("salient", a.salient, p.salient);
  cmp("has_bias", a.has_bias, p.has_bias ? 1 : 0);
  cmp("has_col_scales", a.has_col_scales, p.has_col_scales ? 1 : 0);
  return os.str();
}

template <typename T>
const T* tensor_data(const OrtValue* v, size_t* count) {
  Ort::ConstValue cv{v};
  *count = cv.GetTensorTypeAndShapeInfo().GetElementCount();
  return *count ? cv.GetTensorData<T>() : nullptr;
}

struct Work {
  const pbs2p::RuntimeWeight* w;
  const pbs2p::ChunkMap* cm;
  pbs2p::ActTables* tables;
  const pbs2p::Kernel* kernel;  // its table builder, tile kernels (through run_tiles) and tile GEMM
  pbs2p::SalientFn post;  // the tile kernel's salient + bias pass
  const float* x;  // activations as the kernels see them (already multiplied by the column scales)
  float* y;
  int tokens;
  pbs2p::QuantActs* quant = nullptr;  // prefill over the tile copy (kernel->gemm): int7 activations, not tables
};

void tables_task(void* data, size_t tok) {
  Work& wk = *static_cast<Work*>(data);
  wk.kernel->tables(wk.x, int(tok), int(tok) + 1, *wk.cm, wk.tables);
}

// Work item i = token block (i / groups) x group of kernel->multi_tiles row tiles (i % groups): each thread walks
// tiles with one block's tables hot.
int tile_groups(const pbs2p::Kernel& k, int tiles) { return (tiles + k.multi_tiles - 1) / k.multi_tiles; }

void tiles_task(void* data, size_t i) {
  Work& wk = *static_cast<Work*>(data);
  const int tiles = wk.w->tiles, groups = tile_groups(*wk.kernel, tiles);
  const int tb = int(i % size_t(groups)) * wk.kernel->multi_tiles;
  const int te = std::min(tiles, tb + wk.kernel->multi_tiles);
  const int t0 = int(i / size_t(groups)) * kTokenBlock, t1 = std::min(wk.tokens, t0 + kTokenBlock);
  pbs2p::run_tiles(*wk.kernel, *wk.w, *wk.cm, *wk.tables, tb, te, t0, t1, wk.y);
  for (int tile = tb; tile < te; ++tile) pbs2p::add_salient_and_bias(*wk.w, wk.x, tile, t0, t1, wk.y, wk.post);
}

// One decode token over several blocks in one ParallelFor: work item i belongs to the block whose range of
// work items [first[b], first[b + 1]) holds it, and runs as tiles_task on that block's Work.
struct BlocksWork {
  Work* works;
  const size_t* first;  // size blocks + 1
  size_t blocks;
};

void blocks_tiles_task(void* data, size_t i) {
  const BlocksWork& bw = *static_cast<BlocksWork*>(data);
  const size_t b = size_t(std::upper_bound(bw.first, bw.first + bw.blocks + 1, i) - bw.first) - 1;
  tiles_task(&bw.works[b], i - bw.first[b]);
}

// The tables of decode calls (few tokens): one per thread, reused by every node it runs (no allocation per call).
pbs2p::ActTables& decode_tables() {
  thread_local pbs2p::ActTables tables;
  return tables;
}

void tile_quant_task(void* data, size_t tok) {
  Work& wk = *static_cast<Work*>(data);
  pbs2p::quantize_tokens(wk.x, wk.w->p.k, int(tok), int(tok) + 1, *wk.cm, wk.quant);
}

// Tokens per tile-GEMM work item: the tile's planes are decoded once per item, so a 128-token prompt decodes
// them once (64 tokens: twice, 2-4% slower prefill at 1.5B in bench/ops_ab.py on Zen 5).
constexpr int kTileGemmTokens = 128;

void tile_gemm_task(void* data, size_t i) {
  Work& wk = *static_cast<Work*>(data);
  const int tiles = wk.w->tiles;
  const int tile = int(i % size_t(tiles));
  const int t0 = int(i / size_t(tiles)) * kTileGemmTokens, t1 = std::min(wk.tokens, t0 + kTileGemmTokens);
  wk.kernel->gemm(*wk.w, *wk.cm, *wk.quant, tile, t0, t1, wk.y);
  pbs2p::add_salient_and_bias(*wk.w, wk.x, tile, t0, t1, wk.y, wk.post);
}

// Compact kernels: work item i = token block (i / row_blocks) x row block (i % row_blocks).
constexpr int kRowBlock = 32;         // rows per work item (two 16-row SIMD blocks)
constexpr int kGemvTokens = 4;        // up to this many tokens: one token block (decode)
constexpr int kGemmTokenBlock = 64;   // prefill: tokens per work item (sign planes decoded once per item)

struct CompactWork {
  const pbs2p::CompactWeight* w;
  const pbs2p::QuantActs* a;
  pbs2p::QuantActs* a_fill;
  pbs2p::RowsFn fn;
  const float* x;
  float* y;
  size_t ldy;
  int tokens, token_block, row_blocks;
};

void quant_task(void* data, size_t tok) {
  CompactWork& wk = *static_cast<CompactWork*>(data);
  pbs2p::quantize_tokens(wk.x, wk.w->p.k, int(tok), int(tok) + 1, wk.w->cm, wk.a_fill);
}

void rows_task(void* data, size_t i) {
  CompactWork& wk = *static_cast<CompactWork*>(data);
  const int rb = int(i % size_t(wk.row_blocks)), tb = int(i / size_t(wk.row_blocks));
  const int r0 = rb * kRowBlock, r1 = std::min(wk.w->p.rows, r0 + kRowBlock);
  const int t0 = tb * wk.token_block, t1 = std::min(wk.tokens, t0 + wk.token_block);
  wk.fn(*wk.w, *wk.a, wk.x, r0, r1, t0, t1, wk.y, wk.ldy);
}

// Element type each packed array must have (inputs of a block, in order); the variadic input list carries no
// types, so the op checks them itself.
constexpr ONNXTensorElementDataType kArrayTypes[kArraysPerBlock] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,   ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,   ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,   ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16};
constexpr const char* kArrayNames[kArraysPerBlock] = {"header", "mask",          "signs",  "scales",    "salient_cols",
                                                      "salient_signs", "alpha2", "bias", "col_scales"};

// Borrowed view of one block's arrays (values[a] = array a, nullptr for an absent col_scales).
std::string disk_view(const OrtValue* const* values, size_t block, pbs2p::DiskView* d) {
  const void* data[kArraysPerBlock] = {};
  size_t count[kArraysPerBlock] = {};
  for (size_t a = 0; a < kArraysPerBlock; ++a) {
    if (values[a] == nullptr) continue;
    Ort::ConstValue cv{values[a]};
    if (!cv.IsTensor()) return "block " + std::to_string(block) + " input " + kArrayNames[a] + " is not a tensor";
    auto info = cv.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != kArrayTypes[a])
      return "block " + std::to_string(block) + " input " + kArrayNames[a] + " has element type " +
             std::to_string(int(info.GetElementType())) + ", expected " + std::to_string(int(kArrayTypes[a]));
    count[a] = info.GetElementCount();
    data[a] = count[a] ? cv.GetTensorRawData() : nullptr;
  }
  d->header = static_cast<const int32_t*>(data[0]);
  d->header_len = count[0];
  d->mask = static_cast<const uint8_t*>(data[1]);
  d->mask_len = count[1];
  d->signs = static_cast<const uint8_t*>(data[2]);
  d->signs_len = count[2];
  d->scales = static_cast<const uint16_t*>(data[3]);
  d->scales_len = count[3];
  d->salient_cols = static_cast<const int32_t*>(data[4]);
  d->salient_cols_len = count[4];
  d->salient_signs = static_cast<const uint8_t*>(data[5]);
  d->salient_signs_len = count[5];
  d->alpha2 = static_cast<const uint16_t*>(data[6]);
  d->alpha2_len = count[6];
  d->bias = static_cast<const float*>(data[7]);
  d->bias_len = count[7];
  d->col_scales = static_cast<const uint16_t*>(data[8]);
  d->col_scales_len = count[8];
  return "";
}

// One packed weight of the node: its attributes, first input index and (constant weights) its prepared form.
struct Block {
  Attrs attrs;
  size_t first_input = 1, n_arrays = kArraysPerBlock;
  int64_t row_offset = 0;
  pbs2p::RuntimeWeight weight;   // tile kernels: the repacked layout
  pbs2p::ChunkMap chunks;
  pbs2p::CompactWeight compact;  // compact kernels: pointers into ORT's initializers, no copy
};

struct SparseBinaryMatMul {
  SparseBinaryMatMul(const OrtApi* api, const OrtKernelInfo* info) noexcept {
    try {
      init_error_ = init(api, info);
    } catch (const std::exception& e) {
      init_error_ = std::string("creating the kernel failed: ") + e.what();
    }
  }

  static bool optional_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t* out) {
    if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, out)) {
      api->ReleaseStatus(st);
      return false;
    }
    return true;
  }

  // Optional attribute `activation` (absent: "none", so graphs written before op version 4 load unchanged).
  std::string read_activation(const OrtApi* api, const OrtKernelInfo* info) {
    size_t len = 0;
    if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, "activation", nullptr, &len)) {
      api->ReleaseStatus(st);
      int64_t as_int = 0;
      if (optional_int(api, info, "activation", &as_int)) return "attribute activation must be a string";
      return "";
    }
    std::string value(len, '\0');
    if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, "activation", value.data(), &len)) {
      api->ReleaseStatus(st);
      return "cannot read attribute activation";
    }
    value.resize(std::strlen(value.c_str()));
    return parse_activation(value, rows_, &activation_);
  }

  std::string init(const OrtApi* api, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki{info};
    int64_t blocks = 1;  // optional attribute: multi-block nodes (op version 3) carry it
    optional_int(api, info, "blocks", &blocks);
    size_t n_inputs = 0;
    if (OrtStatus* st = api->KernelInfo_GetInputCount(info, &n_inputs)) {
      api->ReleaseStatus(st);
      return "cannot read the node's input count";
    }
    if (blocks < 1 || blocks > kMaxBlocks)
      return "attribute blocks=" + std::to_string(blocks) + " must be in [1, " + std::to_string(kMaxBlocks) + "]";
    if (blocks == 1) {
      if (n_inputs < kMinInputs || n_inputs > kMaxInputs)
        return "expects 9 inputs (X + 8 packed arrays, format v1) or 10 (X + 9 packed arrays, format v2), got " +
               std::to_string(n_inputs);
      Block b;
      try {
        b.attrs.n = ki.GetAttribute<int64_t>("n");
        b.attrs.m = ki.GetAttribute<int64_t>("m");
        b.attrs.group_size = ki.GetAttribute<int64_t>("group_size");
        b.attrs.rows = ki.GetAttribute<int64_t>("rows");
        b.attrs.k = ki.GetAttribute<int64_t>("k");
        b.attrs.salient = ki.GetAttribute<int64_t>("salient");
        b.attrs.has_bias = ki.GetAttribute<int64_t>("has_bias");
      } catch (const std::exception& e) {
        return std::string("missing or bad attribute (needs n, m, group_size, rows, k, salient, has_bias): ") +
               e.what();
      }
      int64_t has_cs = 0;  // optional attribute (graphs written for op version 1 lack it)
      optional_int(api, info, "has_col_scales", &has_cs);
      b.attrs.has_col_scales = has_cs;
      b.n_arrays = n_inputs - 1;
      if (has_cs != 0 && n_inputs < kMaxInputs)
        return "attribute has_col_scales=" + std::to_string(has_cs) + " but the node has no col_scales input";
      blocks_.push_back(b);
      rows_ = b.attrs.rows;
      k_ = b.attrs.k;
    } else {
      if (n_inputs != 1 + size_t(blocks) * kArraysPerBlock)
        return "attribute blocks=" + std::to_string(blocks) + " needs " +
               std::to_string(1 + size_t(blocks) * kArraysPerBlock) + " inputs (X + 9 packed arrays per block), got " +
               std::to_string(n_inputs);
      std::vector<int64_t> lists[7];
      const char* names[7] = {"block_n",       "block_m",        "block_group_size",    "block_rows",
                              "block_salient", "block_has_bias", "block_has_col_scales"};
      try {
        rows_ = ki.GetAttribute<int64_t>("rows");
        k_ = ki.GetAttribute<int64_t>("k");
        for (int i = 0; i < 7; ++i) lists[i] = ki.GetAttributes<int64_t>(names[i]);
      } catch (const std::exception& e) {
        return std::string("missing or bad attribute (a multi-block node needs rows, k and block_n, block_m, "
                           "block_group_size, block_rows, block_salient, block_has_bias, block_has_col_scales): ") +
               e.what();
      }
      for (int i = 0; i < 7; ++i)
        if (lists[i].size() != size_t(blocks))
          return std::string("attribute ") + names[i] + " has " + std::to_string(lists[i].size()) +
                 " entries, expected blocks=" + std::to_string(blocks);
      int64_t offset = 0;
      for (int64_t i = 0; i < blocks; ++i) {
        Block b;
        b.attrs = Attrs{lists[0][i], lists[1][i], lists[2][i], lists[3][i], k_, lists[4][i], lists[5][i], lists[6][i]};
        b.first_input = 1 + size_t(i) * kArraysPerBlock;
        b.row_offset = offset;
        if (b.attrs.rows < 1 || b.attrs.rows > INT32_MAX)
          return "attribute block_rows[" + std::to_string(i) + "]=" + std::to_string(b.attrs.rows) +
                 " must be in [1, 2^31 - 1]";
        offset += b.attrs.rows;
        blocks_.push_back(b);
      }
      if (offset != rows_)
        return "attribute rows=" + std::to_string(rows_) + " but block_rows sum to " + std::to_string(offset);
    }
    // The lite API declares every input optional, so a node may leave one out with an empty name; refuse such
    // nodes here, at session creation.
    for (size_t i = 0; i < n_inputs; ++i) {
      size_t len = 0;
      OrtStatus* st = api->KernelInfo_GetInputName(info, i, nullptr, &len);
      std::string name(len, '\0');
      if (st == nullptr && len > 0) st = api->KernelInfo_GetInputName(info, i, name.data(), &len);
      if (st != nullptr) {
        api->ReleaseStatus(st);
        return "cannot read the name of input " + std::to_string(i);
      }
      if (name.empty() || name[0] == '\0')
        return "input " + std::to_string(i) + " is missing (empty name): X and every packed array must be given";
    }
    const std::string ea = read_activation(api, info);
    if (!ea.empty()) return ea;
    const std::string ek = pbs2p::select_kernel(&kernel_);
    if (!ek.empty()) return ek;
    // Prepare once here when every weight input is an initializer (the normal exported graph).
    std::vector<const OrtValue*> consts(n_inputs, nullptr);
    for (size_t idx = 1; idx < n_inputs; ++idx) {
      int is_const = 0;
      OrtStatus* st = api->KernelInfoGetConstantInput_tensor(info, idx, &is_const, &consts[idx]);
      if (st != nullptr) {
        api->ReleaseStatus(st);
        return "";  // not constant: prepared from the inputs on each Compute instead
      }
      if (!is_const) return "";
    }
    for (size_t i = 0; i < blocks_.size(); ++i) {
      Block& b = blocks_[i];
      const OrtValue* vals[kArraysPerBlock] = {};
      for (size_t a = 0; a < b.n_arrays; ++a) vals[a] = consts[b.first_input + a];
      std::string e = load(vals, i, b.attrs, &b.weight, &b.compact);
      if (!e.empty()) return e;
      if (!kernel_->compact || kernel_->gemv) b.chunks = pbs2p::make_chunks(b.weight.p.k, b.weight.p.group_size);
    }
    prepacked_ = true;
    return "";
  }

  // Checks one block's arrays and prepares it for the selected kernel: compact kernels borrow the arrays
  // (they must outlive the weight: ORT's initializers, or this call's inputs), tile kernels repack them.
  std::string load(const OrtValue* const* vals, size_t block, const Attrs& attrs, pbs2p::RuntimeWeight* w,
                   pbs2p::CompactWeight* cw) const {
    pbs2p::DiskView d;
    std::string e = disk_view(vals, block, &d);
    pbs2p::Params p;
    if (e.empty()) e = pbs2p::parse_header(d.header, d.header_len, &p);
    if (e.empty()) e = check_attrs(attrs, p);
    if (e.empty()) e = kernel_->compact ? pbs2p::prepare(d, cw) : pbs2p::repack_for(d, *kernel_, w);
    if (e.empty() && kernel_->gemv != nullptr) e = pbs2p::repack_for(d, *kernel_->gemv, w);  // hybrid: decode copy
    if (!e.empty() && blocks_.size() > 1) e = "block " + std::to_string(block) + ": " + e;
    return e;
  }

  Ort::Status Compute(OrtKernelContext* ctx) {
    try {
      if (!init_error_.empty()) return error(init_error_);
      Ort::KernelContext kc{ctx};
      std::vector<pbs2p::RuntimeWeight> local(prepacked_ ? 0 : blocks_.size());
      std::vector<pbs2p::CompactWeight> local_compact(prepacked_ ? 0 : blocks_.size());
      if (!prepacked_) {
        for (size_t i = 0; i < blocks_.size(); ++i) {
          const OrtValue* vals[kArraysPerBlock] = {};
          for (size_t a = 0; a < blocks_[i].n_arrays; ++a)
            vals[a] = static_cast<const OrtValue*>(kc.GetInput(blocks_[i].first_input + a));
          const std::string e = load(vals, i, blocks_[i].attrs, &local[i], &local_compact[i]);
          if (!e.empty()) return error(e);
        }
      }
      Ort::ConstValue X = kc.GetInput(0);
      const std::vector<int64_t> xs = X.GetTensorTypeAndShapeInfo().GetShape();
      if (xs.empty() || xs.back() != k_)
        return error("input X has shape " + shape_str(xs) + " but the weight is " + shape_str({rows_, k_}) +
                     " (X's last dimension must be K=" + std::to_string(k_) + ")");
      int64_t tokens = 1;
      for (size_t i = 0; i + 1 < xs.size(); ++i) tokens *= xs[i];
      const bool swiglu = activation_ == Activation::kSwiglu;
      std::vector<int64_t> ys(xs);
      ys.back() = swiglu ? rows_ / 2 : rows_;
      float* out = kc.GetOutput(0, ys).GetTensorMutableData<float>();
      if (tokens == 0) return Ort::Status{nullptr};
      // With an epilogue the matmul writes [tokens, rows] into scratch (per thread for decode, grown once, so no
      // allocation per call; per call for prefill), then the epilogue writes Y from complete rows.
      thread_local std::vector<float> decode_mm;
      std::unique_ptr<float[]> prefill_mm;  // not zero-filled: the matmul writes every entry
      float* y = out;
      if (swiglu) {
        const size_t need = size_t(tokens) * size_t(rows_);
        if (tokens <= kEpilogueTokens) {
          if (decode_mm.size() < need) decode_mm.resize(need);
          y = decode_mm.data();
        } else {
          prefill_mm.reset(new float[need]);
          y = prefill_mm.get();
        }
      }
      matmul(kc, local, local_compact, X.GetTensorData<float>(), tokens, y);
      if (swiglu) {
        EpilogueWork ew{y, out, rows_ / 2, int(tokens)};
        if (tokens <= kEpilogueTokens)
          swiglu_task(&ew, 0);
        else
          kc.ParallelFor(swiglu_task, size_t((tokens + kEpilogueTokens - 1) / kEpilogueTokens), 0, &ew);
      }
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return error(e.what());
    }
  }

  // Y [tokens, rows] = the matmul of every block (their outputs side by side).
  void matmul(Ort::KernelContext& kc, const std::vector<pbs2p::RuntimeWeight>& local,
              const std::vector<pbs2p::CompactWeight>& local_compact, const float* x_in, int64_t tokens,
              float* y) const {
    const pbs2p::Kernel* tile = kernel_->compact ? kernel_->gemv : kernel_;
    if (kernel_->compact && (tile == nullptr || tokens > pbs2p::kHybridGemv)) {
      run_compact(kc, prepacked_ ? nullptr : &local_compact, x_in, tokens, y);
      return;
    }
    if (tokens == 1 && prepacked_ && blocks_.size() > 1 && blocks_share_tables()) {
      run_blocks_one_token(kc, *tile, x_in, y);
      return;
    }
    std::vector<float> block_y;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const pbs2p::RuntimeWeight& w = prepacked_ ? blocks_[i].weight : local[i];
      const int64_t rows = w.p.rows;
      float* yb = y;
      if (blocks_.size() > 1) {
        block_y.resize(size_t(tokens) * size_t(rows));
        yb = block_y.data();
      }
      run_block(kc, *tile, w, prepacked_ ? &blocks_[i].chunks : nullptr, x_in, tokens, yb);
      if (blocks_.size() > 1)
        for (int64_t t = 0; t < tokens; ++t)
          std::memcpy(y + size_t(t) * size_t(rows_) + size_t(blocks_[i].row_offset), yb + size_t(t) * size_t(rows),
                      size_t(rows) * sizeof(float));
    }
  }

  // Every block reads the same activation tables: one chunking (group size) and no column scales.
  bool blocks_share_tables() const {
    for (const Block& b : blocks_)
      if (!b.weight.col_scales.empty() || b.weight.p.group_size != blocks_[0].weight.p.group_size) return false;
    return true;
  }

  // One token (decode) through a node of several blocks (fused q/k/v, gate/up): the activation tables are built
  // once, and one ParallelFor walks every block's tile groups, each block writing its rows straight into its
  // columns of Y (with one token Y has one row, so no stride differs). Per block the same tiles_task as
  // run_block's, so the same bits; it saves the other blocks' table builds, dispatches and copies.
  void run_blocks_one_token(Ort::KernelContext& kc, const pbs2p::Kernel& kernel, const float* x, float* y) const {
    const pbs2p::ChunkMap& cm = blocks_[0].chunks;
    pbs2p::ActTables& t = decode_tables();
    pbs2p::size_tables(t, 1, blocks_[0].weight.p.k, int(cm.group.size()));
    std::array<Work, kMaxBlocks> works;  // on the stack: nothing allocated per decode step
    std::array<size_t, kMaxBlocks + 1> first;
    first[0] = 0;
    const pbs2p::SalientFn post = pbs2p::salient_fn_for(kernel.tile);
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& b = blocks_[i];
      works[i] = Work{&b.weight, &cm, &t, &kernel, post, x, y + b.row_offset, 1};
      first[i + 1] = first[i] + size_t(tile_groups(kernel, b.weight.tiles));
    }
    tables_task(&works[0], 0);
    BlocksWork bw{works.data(), first.data(), blocks_.size()};
    kc.ParallelFor(blocks_tiles_task, first[blocks_.size()], 0, &bw);
  }

  // Compact kernels write every block straight into its columns of Y (row stride = all blocks' rows).
  // Activations are scaled and quantized once per call, again only for a block whose column scales or group
  // size differ from the previous block's.
  void run_compact(Ort::KernelContext& kc, const std::vector<pbs2p::CompactWeight>* local, const float* x_in,
                   int64_t tokens, float* y) const {
    thread_local std::vector<float> decode_scaled;
    thread_local pbs2p::QuantActs decode_quant;
    std::vector<float> prefill_scaled;
    pbs2p::QuantActs prefill_quant;
    const bool decode = tokens <= 16;
    std::vector<float>& scaled = decode ? decode_scaled : prefill_scaled;
    pbs2p::QuantActs& quant = decode ? decode_quant : prefill_quant;
    const pbs2p::CompactWeight* prev = nullptr;
    const float* x = x_in;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const pbs2p::CompactWeight& w = local ? (*local)[i] : blocks_[i].compact;
      const bool same = prev != nullptr && prev->p.group_size == w.p.group_size && prev->col_scales.empty() &&
                        w.col_scales.empty();
      CompactWork wk{&w, &quant, &quant, kernel_->rows, x, y + blocks_[i].row_offset, size_t(rows_), int(tokens),
                     tokens <= kGemvTokens ? int(tokens) : kGemmTokenBlock, 0};
      if (!same) {
        x = pbs2p::scale_activations(w, x_in, size_t(tokens), &scaled);
        wk.x = x;
        pbs2p::size_quant(int(tokens), w.cm, &quant);
        if (tokens == 1)
          quant_task(&wk, 0);
        else
          kc.ParallelFor(quant_task, size_t(tokens), 0, &wk);
      }
      prev = &w;
      wk.row_blocks = (w.p.rows + kRowBlock - 1) / kRowBlock;
      const size_t token_blocks = size_t((tokens + wk.token_block - 1) / wk.token_block);
      kc.ParallelFor(rows_task, token_blocks * size_t(wk.row_blocks), 0, &wk);
    }
  }

  void run_block(Ort::KernelContext& kc, const pbs2p::Kernel& kernel, const pbs2p::RuntimeWeight& w, const pbs2p::ChunkMap* pre_cm,
                 const float* x_in, int64_t tokens, float* y) const {
    // Column scales: one scratch pass x * c per call (per-thread for decode, per-call for prefill).
    thread_local std::vector<float> decode_scaled;
    std::vector<float> prefill_scaled;
    const float* x = pbs2p::scale_activations(w, x_in, size_t(tokens), tokens <= 16 ? &decode_scaled : &prefill_scaled);
    const pbs2p::ChunkMap local_cm = pre_cm ? pbs2p::ChunkMap{} : pbs2p::make_chunks(w.p.k, w.p.group_size);
    const pbs2p::ChunkMap& cm = pre_cm ? *pre_cm : local_cm;
    if (kernel.gemm != nullptr && tokens > pbs2p::kHybridGemv) {  // prefill: int7 activations, VNNI over the codes
      pbs2p::QuantActs quant;
      pbs2p::size_quant(int(tokens), cm, &quant);
      Work wk{&w, &cm, nullptr, &kernel, pbs2p::salient_fn_for(kernel.tile), x, y, int(tokens), &quant};
      kc.ParallelFor(tile_quant_task, size_t(tokens), 0, &wk);
      const size_t token_blocks = size_t((tokens + kTileGemmTokens - 1) / kTileGemmTokens);
      kc.ParallelFor(tile_gemm_task, token_blocks * size_t(w.tiles), 0, &wk);
      return;
    }
    // Decode (few tokens) reuses per-thread scratch: no allocation or zero-fill per call (every entry is written
    // by the table builder before it is read). Prefill allocates, so no large buffer outlives the call.
    pbs2p::ActTables prefill_scratch;
    pbs2p::ActTables& t = tokens <= 16 ? decode_tables() : prefill_scratch;
    pbs2p::size_tables(t, int(tokens), w.p.k, int(cm.group.size()));
    Work wk{&w, &cm, &t, &kernel, pbs2p::salient_fn_for(kernel.tile), x, y, int(tokens)};
    if (tokens == 1)
      tables_task(&wk, 0);
    else
      kc.ParallelFor(tables_task, size_t(tokens), 0, &wk);
    const size_t token_blocks = size_t((tokens + kTokenBlock - 1) / kTokenBlock);
    kc.ParallelFor(tiles_task, token_blocks * size_t(tile_groups(kernel, w.tiles)), 0, &wk);
  }

  std::string init_error_;
  bool prepacked_ = false;
  std::vector<Block> blocks_;
  int64_t rows_ = 0, k_ = 0;
  Activation activation_ = Activation::kNone;
  const pbs2p::Kernel* kernel_ = nullptr;
};

// Shape inference: Y = X's shape with the last dimension replaced by `rows` (`rows / 2` with activation=swiglu). Registered on the raw OrtCustomOp
// because Ort::ShapeInferContext::SetOutputShape of the 1.21 headers marks symbolic dims with -2, which newer
// runtimes reject ("dim_values must be -1 or larger"); the shape is set through the C API with -1 instead.
OrtStatusPtr ORT_API_CALL infer_output_shape(const OrtCustomOp*, OrtShapeInferContext* raw) noexcept {
  try {
    const OrtApi& api = Ort::GetApi();
    Ort::ShapeInferContext ctx(&api, raw);
    const size_t n_inputs = ctx.GetInputCount();
    int64_t blocks = 1;
    const OrtOpAttr* battr = nullptr;
    if (OrtStatus* st = api.ShapeInferContext_GetAttribute(raw, "blocks", &battr)) {
      api.ReleaseStatus(st);
      battr = nullptr;
    }
    if (battr != nullptr) blocks = ctx.GetAttrInt("blocks");
    if (blocks < 1 || blocks > kMaxBlocks)
      return error("attribute blocks=" + std::to_string(blocks) + " must be in [1, " + std::to_string(kMaxBlocks) + "]")
          .release();
    if (blocks == 1 && (n_inputs < kMinInputs || n_inputs > kMaxInputs))
      return error("expects 9 inputs (X + 8 packed arrays, format v1) or 10 (X + 9 packed arrays, format v2), got " +
                   std::to_string(n_inputs))
          .release();
    if (blocks > 1 && n_inputs != 1 + size_t(blocks) * kArraysPerBlock)
      return error("attribute blocks=" + std::to_string(blocks) + " needs " +
                   std::to_string(1 + size_t(blocks) * kArraysPerBlock) + " inputs, got " + std::to_string(n_inputs))
          .release();
    const int64_t rows = ctx.GetAttrInt("rows"), k = ctx.GetAttrInt("k");
    if (rows < 1 || rows > INT32_MAX || k < 1 || k > INT32_MAX)
      return error("attributes rows=" + std::to_string(rows) + ", k=" + std::to_string(k) +
                   " must be in [1, 2^31 - 1]")
          .release();
    const Ort::ShapeInferContext::Shape& shape = ctx.GetInputShape(0);
    if (shape.empty()) return error("input X must have rank >= 1").release();
    if (shape.back().IsInt() && shape.back().AsInt() >= 0 && shape.back().AsInt() != k)
      return error("input X's last dimension is " + std::to_string(shape.back().AsInt()) + " but attribute k=" +
                   std::to_string(k))
          .release();
    std::vector<int64_t> dims;
    std::vector<const char*> syms;
    for (const auto& d : shape) {
      dims.push_back(d.IsInt() ? d.AsInt() : -1);
      syms.push_back(d.IsInt() || d.AsSym() == nullptr ? "" : d.AsSym());
    }
    Activation activation = Activation::kNone;
    const OrtOpAttr* aattr = nullptr;
    if (OrtStatus* st = api.ShapeInferContext_GetAttribute(raw, "activation", &aattr)) {
      api.ReleaseStatus(st);
      aattr = nullptr;
    }
    if (aattr != nullptr) {
      const std::string e = parse_activation(ctx.GetAttrString("activation"), rows, &activation);
      if (!e.empty()) return error(e).release();
    }
    dims.back() = activation == Activation::kSwiglu ? rows / 2 : rows;
    syms.back() = "";
    OrtTensorTypeAndShapeInfo* info = nullptr;
    OrtStatus* st = api.CreateTensorTypeAndShapeInfo(&info);
    if (st == nullptr) st = api.SetTensorElementType(info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (st == nullptr) st = api.SetDimensions(info, dims.data(), dims.size());
    if (st == nullptr) st = api.SetSymbolicDimensions(info, syms.data(), syms.size());
    if (st == nullptr) st = api.ShapeInferContext_SetOutputTypeShape(raw, 0, info);
    if (info != nullptr) api.ReleaseTensorTypeAndShapeInfo(info);
    return st;
  } catch (const std::exception& e) {
    return error(std::string("shape inference: ") + e.what()).release();
  }
}

std::string ops_info_json() {
  std::string kernels, versions;
  for (const pbs2p::Kernel* k : pbs2p::built_kernels())  // best first
    if (pbs2p::kernel_supported(*k)) kernels += std::string(kernels.empty() ? "\"" : ", \"") + k->name + "\"";
  for (int v = pbs2p::kMinVersion; v <= pbs2p::kVersion; ++v) versions += (versions.empty() ? "" : ", ") + std::to_string(v);
  return "{\"op_version\": " + std::to_string(kOpVersion) + ", \"format_versions\": [" + versions +
         "], \"kernels\": [" + kernels + "]}";
}

using LiteOp = Ort::Custom::OrtLiteCustomStruct<SparseBinaryMatMul>;

// Kernel creation that can fail: the lite API's CreateKernel cannot report an error, so a broken constant weight
// (bad header, sizes that disagree with it, attributes that disagree) would only surface at the first Run. With
// CreateKernelV2 the session creation itself fails with the op's one-line message.
OrtStatusPtr ORT_API_CALL create_kernel_checked(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                                void** kernel) noexcept {
  try {
    auto k = std::make_unique<LiteOp::Kernel>();
    if (OrtStatus* st = api->KernelInfo_GetInputCount(info, &k->num_input_)) return st;
    if (OrtStatus* st = api->KernelInfo_GetOutputCount(info, &k->num_output_)) return st;
    k->custom_op_ = std::make_unique<SparseBinaryMatMul>(api, info);
    if (!k->custom_op_->init_error_.empty())
      return api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kOpName) + ": " + k->custom_op_->init_error_).c_str());
    k->ep_ = "CPUExecutionProvider";
    *kernel = k.release();
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string(kOpName) + ": creating the kernel failed: " + e.what()).c_str());
  }
}

}  // namespace

// What this library implements, as static JSON: {"op_version": 2, "format_versions": [1, 2], "kernels": [...]}
// ("kernels": the tile kernels usable on this CPU). Needs no ONNX Runtime: safe to call before RegisterCustomOps.
extern "C" __attribute__((visibility("default"))) const char* Pbs2pOpsInfo(void) {
  static const std::string info = ops_info_json();
  return info.c_str();
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // this ORT is older than the headers we were built with: cannot report
  Ort::InitApi(api);
  try {
    // Created once and deliberately never freed: sessions keep pointers to them until process exit, and
    // releasing at library unload could run after ONNX Runtime itself is gone.
    static OrtCustomOpDomain* domain = nullptr;
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    if (domain == nullptr) {
      auto* op = Ort::Custom::CreateLiteCustomOp<SparseBinaryMatMul>(kOpName, "CPUExecutionProvider");
      op->InferOutputShapeFn = infer_output_shape;
      // Inputs: X (float) then a variadic list of packed arrays (9 per block; 8 or 9 for a one-block node).
      // The lite API's own variadic argument types every element like the first, so Compute reads the raw
      // context and the op checks each array's element type itself (disk_view).
      op->GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 2; };
      op->GetInputType = [](const OrtCustomOp*, size_t i) {
        return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      };
      op->GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
        return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_VARIADIC;
      };
      op->GetVariadicInputMinArity = [](const OrtCustomOp*) { return int(kMinInputs - 1); };
      op->GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
      op->GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
      op->GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
      op->GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
      op->CreateKernelV2 = create_kernel_checked;
      OrtCustomOpDomain* d = nullptr;
      Ort::ThrowOnError(api->CreateCustomOpDomain(kDomain, &d));
      Ort::ThrowOnError(api->CustomOpDomain_Add(d, op));
      domain = d;
    }
    return api->AddCustomOpDomain(options, domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// ONNX Runtime glue for SparseBinaryMatMul (domain pbs2p.edge, op version 2), lite custom-op API.
// Inputs: X, then the packed arrays header .. bias (format version 1: 9 inputs in all) and optionally col_scales
// (format version 2: 10 inputs); the lite API declares every input optional, so graphs of either length load.
// No exception ever crosses into ONNX Runtime: problems become an OrtStatus naming the shapes.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
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
constexpr int kOpVersion = 2;  // 2: optional 10th input col_scales + attribute has_col_scales
constexpr size_t kMinInputs = 9, kMaxInputs = 10;
constexpr int kTokenBlock = 4;  // tokens per GEMM work item: their tables stay in L2 while tiles stream

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

Ort::Status error(const std::string& msg) { return Ort::Status((std::string(kOpName) + ": " + msg).c_str(), ORT_INVALID_ARGUMENT); }

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
  pbs2p::TileFn fn;
  pbs2p::TableFn table_fn;
  const float* x;  // activations as the kernels see them (already multiplied by the column scales)
  float* y;
  int tokens;
};

void tables_task(void* data, size_t tok) {
  Work& wk = *static_cast<Work*>(data);
  wk.table_fn(wk.x, int(tok), int(tok) + 1, *wk.cm, wk.tables);
}

// Work item i = token block (i / tiles) x row tile (i % tiles): each thread walks tiles with one block's tables hot.
void tiles_task(void* data, size_t i) {
  Work& wk = *static_cast<Work*>(data);
  const int tiles = wk.w->tiles;
  const int tile = int(i % size_t(tiles));
  const int t0 = int(i / size_t(tiles)) * kTokenBlock, t1 = std::min(wk.tokens, t0 + kTokenBlock);
  wk.fn(*wk.w, *wk.cm, *wk.tables, tile, t0, t1, wk.y);
  pbs2p::add_salient_and_bias(*wk.w, wk.x, tile, t0, t1, wk.y);
}

struct SparseBinaryMatMul {
  SparseBinaryMatMul(const OrtApi* api, const OrtKernelInfo* info) noexcept {
    try {
      Ort::ConstKernelInfo ki{info};
      attrs_.n = ki.GetAttribute<int64_t>("n");
      attrs_.m = ki.GetAttribute<int64_t>("m");
      attrs_.group_size = ki.GetAttribute<int64_t>("group_size");
      attrs_.rows = ki.GetAttribute<int64_t>("rows");
      attrs_.k = ki.GetAttribute<int64_t>("k");
      attrs_.salient = ki.GetAttribute<int64_t>("salient");
      attrs_.has_bias = ki.GetAttribute<int64_t>("has_bias");
    } catch (const std::exception& e) {
      init_error_ = std::string("missing or bad attribute (needs n, m, group_size, rows, k, salient, has_bias): ") + e.what();
      return;
    }
    int64_t has_cs = 0;  // optional attribute (graphs written for op version 1 lack it)
    if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, "has_col_scales", &has_cs)) {
      api->ReleaseStatus(st);
      has_cs = 0;
    }
    attrs_.has_col_scales = has_cs;
    size_t n_inputs = 0;
    if (OrtStatus* st = api->KernelInfo_GetInputCount(info, &n_inputs)) {
      api->ReleaseStatus(st);
      init_error_ = "cannot read the node's input count";
      return;
    }
    if (n_inputs < kMinInputs || n_inputs > kMaxInputs) {
      init_error_ = "expects 9 inputs (X + 8 packed arrays, format v1) or 10 (X + 9 packed arrays, format v2), got " +
                    std::to_string(n_inputs);
      return;
    }
    if (has_cs != 0 && n_inputs < kMaxInputs) {
      init_error_ = "attribute has_col_scales=" + std::to_string(has_cs) + " but the node has no col_scales input";
      return;
    }
    fn_ = pbs2p::best_tile_fn(&kernel_name_);
    table_fn_ = pbs2p::table_fn_by_name(kernel_name_);
    // Repack once here when every weight input is an initializer (the normal exported graph).
    std::vector<const OrtValue*> consts(kMaxInputs, nullptr);
    for (size_t idx = 1; idx < n_inputs; ++idx) {
      int is_const = 0;
      OrtStatus* st = api->KernelInfoGetConstantInput_tensor(info, idx, &is_const, &consts[idx]);
      if (st != nullptr) {
        api->ReleaseStatus(st);
        return;  // not constant: repacked from the inputs on each Compute instead
      }
      if (!is_const) return;
    }
    try {
      pbs2p::DiskView d;
      d.header = tensor_data<int32_t>(consts[1], &d.header_len);
      d.mask = tensor_data<uint8_t>(consts[2], &d.mask_len);
      d.signs = tensor_data<uint8_t>(consts[3], &d.signs_len);
      d.scales = reinterpret_cast<const uint16_t*>(tensor_data<F16>(consts[4], &d.scales_len));
      d.salient_cols = tensor_data<int32_t>(consts[5], &d.salient_cols_len);
      d.salient_signs = tensor_data<uint8_t>(consts[6], &d.salient_signs_len);
      d.alpha2 = reinterpret_cast<const uint16_t*>(tensor_data<F16>(consts[7], &d.alpha2_len));
      d.bias = tensor_data<float>(consts[8], &d.bias_len);
      if (consts[9] != nullptr)
        d.col_scales = reinterpret_cast<const uint16_t*>(tensor_data<F16>(consts[9], &d.col_scales_len));
      init_error_ = load(d, &weight_);
      prepacked_ = init_error_.empty();
      if (prepacked_) chunks_ = pbs2p::make_chunks(weight_.p.k, weight_.p.group_size);
    } catch (const std::exception& e) {
      init_error_ = std::string("reading constant weight inputs failed: ") + e.what();
    }
  }

  std::string load(const pbs2p::DiskView& d, pbs2p::RuntimeWeight* w) const {
    pbs2p::Params p;
    std::string e = pbs2p::parse_header(d.header, d.header_len, &p);
    if (e.empty()) e = check_attrs(attrs_, p);
    if (e.empty()) e = pbs2p::repack(d, w);
    return e;
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& X, const Tensor<int32_t>& header,
                      const Tensor<uint8_t>& mask, const Tensor<uint8_t>& signs, const Tensor<F16>& scales,
                      const Tensor<int32_t>& salient_cols, const Tensor<uint8_t>& salient_signs,
                      const Tensor<F16>& alpha2, const Tensor<float>& bias,
                      std::optional<const Tensor<F16>*> col_scales, Tensor<float>& Y) {
    try {
      if (!init_error_.empty()) return error(init_error_);
      const pbs2p::RuntimeWeight* w = &weight_;
      pbs2p::RuntimeWeight local;
      if (!prepacked_) {
        pbs2p::DiskView d;
        d.header = header.Data();
        d.header_len = size_t(header.NumberOfElement());
        d.mask = mask.Data();
        d.mask_len = size_t(mask.NumberOfElement());
        d.signs = signs.Data();
        d.signs_len = size_t(signs.NumberOfElement());
        d.scales = reinterpret_cast<const uint16_t*>(scales.Data());
        d.scales_len = size_t(scales.NumberOfElement());
        d.salient_cols = salient_cols.Data();
        d.salient_cols_len = size_t(salient_cols.NumberOfElement());
        d.salient_signs = salient_signs.Data();
        d.salient_signs_len = size_t(salient_signs.NumberOfElement());
        d.alpha2 = reinterpret_cast<const uint16_t*>(alpha2.Data());
        d.alpha2_len = size_t(alpha2.NumberOfElement());
        d.bias = bias.Data();
        d.bias_len = size_t(bias.NumberOfElement());
        if (col_scales.has_value() && *col_scales != nullptr) {
          d.col_scales = reinterpret_cast<const uint16_t*>((*col_scales)->Data());
          d.col_scales_len = size_t((*col_scales)->NumberOfElement());
        }
        const std::string e = load(d, &local);
        if (!e.empty()) return error(e);
        w = &local;
      }
      const std::vector<int64_t>& xs = X.Shape();
      const int64_t k = w->p.k, rows = w->p.rows;
      if (xs.empty() || xs.back() != k)
        return error("input X has shape " + shape_str(xs) + " but the weight is " + shape_str({rows, k}) +
                     " (X's last dimension must be K=" + std::to_string(k) + ")");
      int64_t tokens = 1;
      for (size_t i = 0; i + 1 < xs.size(); ++i) tokens *= xs[i];
      std::vector<int64_t> ys(xs);
      ys.back() = rows;
      float* y = Y.Allocate(ys);
      if (tokens == 0) return Ort::Status{nullptr};
      // Column scales: one scratch pass x * c per call (per-thread for decode, per-call for prefill).
      thread_local std::vector<float> decode_scaled;
      std::vector<float> prefill_scaled;
      const float* x = pbs2p::scale_activations(*w, X.Data(), size_t(tokens),
                                                tokens <= 16 ? &decode_scaled : &prefill_scaled);

      const pbs2p::ChunkMap local_cm = prepacked_ ? pbs2p::ChunkMap{} : pbs2p::make_chunks(w->p.k, w->p.group_size);
      const pbs2p::ChunkMap& cm = prepacked_ ? chunks_ : local_cm;
      // Decode (few tokens) reuses per-thread scratch: no allocation or zero-fill per call (every entry is written
      // by the table builder before it is read). Prefill allocates, so no large buffer outlives the call.
      thread_local pbs2p::ActTables decode_scratch;
      pbs2p::ActTables prefill_scratch;
      pbs2p::ActTables& t = tokens <= 16 ? decode_scratch : prefill_scratch;
      t.tokens = int(tokens);
      t.k = w->p.k;
      t.chunks = int(cm.group.size());
      const size_t n_tables = size_t(tokens) * size_t(w->p.k / 4), n_scales = size_t(tokens) * size_t(t.chunks);
      if (t.tables.size() < n_tables) t.tables.resize(n_tables);
      if (t.scale.size() < n_scales) t.scale.resize(n_scales);
      Work wk{w, &cm, &t, fn_, table_fn_, x, y, int(tokens)};
      Ort::KernelContext kc{ctx};
      if (tokens == 1)
        tables_task(&wk, 0);
      else
        kc.ParallelFor(tables_task, size_t(tokens), 0, &wk);
      const size_t blocks = size_t((tokens + kTokenBlock - 1) / kTokenBlock);
      kc.ParallelFor(tiles_task, blocks * size_t(w->tiles), 0, &wk);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return error(e.what());
    }
  }

  Attrs attrs_;
  std::string init_error_;
  bool prepacked_ = false;
  pbs2p::RuntimeWeight weight_;
  pbs2p::ChunkMap chunks_;
  pbs2p::TileFn fn_ = pbs2p::tile_generic;
  pbs2p::TableFn table_fn_ = pbs2p::build_tables_generic;
  const char* kernel_name_ = "generic";
};

// Shape inference: Y = X's shape with the last dimension replaced by `rows`. Registered on the raw OrtCustomOp
// because Ort::ShapeInferContext::SetOutputShape of the 1.21 headers marks symbolic dims with -2, which newer
// runtimes reject ("dim_values must be -1 or larger"); the shape is set through the C API with -1 instead.
OrtStatusPtr ORT_API_CALL infer_output_shape(const OrtCustomOp*, OrtShapeInferContext* raw) noexcept {
  try {
    const OrtApi& api = Ort::GetApi();
    Ort::ShapeInferContext ctx(&api, raw);
    const size_t n_inputs = ctx.GetInputCount();
    if (n_inputs < kMinInputs || n_inputs > kMaxInputs)
      return error("expects 9 inputs (X + 8 packed arrays, format v1) or 10 (X + 9 packed arrays, format v2), got " +
                   std::to_string(n_inputs))
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
    dims.back() = rows;
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
  for (const char* name : {"generic", "avx2", "neon"})
    if (pbs2p::tile_fn_by_name(name) != nullptr) kernels += std::string(kernels.empty() ? "\"" : ", \"") + name + "\"";
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

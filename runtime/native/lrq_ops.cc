// lrqgraph's onnxruntime custom ops (domain "lrq"): products with block-quantized weights.
//
// Every quantized weight W[K, N] is given by three inputs like MatMulNBits': codes[N, blocks, blob]
// (column n of W, codes along K packed low bits first at any width 2..8, so 3-bit codes pack 8
// to 3 bytes), scales[N, blocks] (float or float16) and optional zero points [N, blocks] (uint8,
// unpacked; absent: 2^(bits-1)). A code c stands for (c - zero point) · scale.
//
//  QMatMul         Y = X · W (+ bias)                attrs K, N, bits, block_size
//                  inputs X, B (3), bias, rotation (2, optional)
//  QLowRankMatMul  Y = X · L · R (+ X · Q) (+ bias)  attrs K, N, rank, l_/r_/q_bits, l_/r_/q_block_size
//                  inputs X, L (3), R (3), Q (3, optional), bias, rotation (2, optional): X·L stays in
//                  memory the op owns.
//  A rotation (rotation_signs [K] + rotation_small [b, b], K = 2^a·b, b > 1 only) multiplies X by a
//  randomized Hadamard transform F first (lrqgraph.numerics.rotation): Y = (X·F)·W, in the kernel,
//  O(K log K) a row, where graph ops would cost a node each and their dispatch on every call.
//  KashinMatMul    Y = X · (U + F1·V·F2ᵀ) (+ bias)  attrs K, N, bits
//                  inputs X, codes [N, ceil(K·bits/8)] (column n along K, low bits first),
//                  codebook [2^bits, 2] of (u, v) (or [2^bits, 1]: k-means, W = U), F1 as
//                  row_signs [K] + row_small [b, b] (K = 2^a·b, b > 1 only), F2 as col_signs [N]
//                  + col_small, bias; F randomized Hadamard transforms (codebook_kernel.cc).
// accuracy_level (default 0): 4 lets the kernels quantize activations to int8 per block, as
// MatMulNBits does at level 4 (AVX-512 VNNI, or AVX2 for codes up to 4 bits; blocks up to
// kInt8MaxBlock values, int8_kernel.cc); 0 computes in float. block_size must be in 1..K (K: the weight's rows).
//
// Each kernel's tables (kInputs, kAttributes, kOptionalAttributes) are what onnxruntime is told and
// what the kernel reads; LrqOpSchema() describes them as text, which tests/test_op_schema.py checks
// against runtime/op_schema.py, the Python side's copy.
//
// Weights are read and prepacked once, at kernel creation (kernels.h). The library does not link
// onnxruntime: the API table arrives through RegisterCustomOps.
//
// Weights are held once. onnxruntime keeps every initializer for the session's life, and custom
// ops have no PrePack hook that would let it free one, so a kernel that copies an initializer
// (repacked codes, float scales) hands the initializer's pages back to the kernel when it is done
// with them (ReleasePages). onnxruntime memory-maps external data, so those pages are file-backed
// and drop out of the process; the float kernel reads the codes in place and keeps them.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

constexpr const char* kDomain = "lrq";
constexpr int kApiVersion = 16;  // oldest onnxruntime API this library asks for (1.16+)
constexpr const char* kMinOrt = "1.16";


// Declared to onnxruntime as UNDEFINED (any type); NodeInfo::Floats takes float and float16.
constexpr ONNXTensorElementDataType kFloatOrHalf = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
constexpr ONNXTensorElementDataType kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kUint8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;

// One input of an op, in order: its name (runtime/op_schema.py), element type, whether required.
struct Input {
  const char* name;
  ONNXTensorElementDataType type;
  bool required;
};

// Asks the kernel to reclaim the whole pages of [data, data + bytes). MADV_PAGEOUT never changes
// what the memory holds: file-backed pages are dropped and read again from the file if anything
// touches them later; anonymous ones stay (or go to swap). So it is safe whatever backs the tensor
// and whoever else reads it; kernels older than Linux 5.4 refuse it, and nothing happens.
void ReleasePages(const void* data, size_t bytes) {
#ifdef MADV_PAGEOUT
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_PAGEOUT);
#else
  (void)data;
  (void)bytes;
#endif
}

class OrtParallel final : public lrq::Parallel {
 public:
  explicit OrtParallel(Ort::KernelContext& ctx) : ctx_(ctx) {}
  void For(void (*fn)(void*, size_t), size_t count, void* data) const override { ctx_.ParallelFor(fn, count, 0, data); }

 private:
  Ort::KernelContext& ctx_;
};

// The attributes and constant inputs of one node, with errors that name the op and the node.
class NodeInfo {
 public:
  NodeInfo(const OrtKernelInfo* info, const char* op) : ki_(info), op_(op) {
    try {
      node_ = ki_.GetNodeName();
    } catch (const Ort::Exception&) {
    }
  }

  [[noreturn]] void Fail(const std::string& what) const {
    throw std::runtime_error("lrq." + op_ + " node '" + node_ + "': " + what);
  }

  // An integer attribute, if the node has it.
  bool TryAttr(const char* name, int64_t* value) const {
    try {
      *value = ki_.GetAttribute<int64_t>(name);
      return true;
    } catch (const Ort::Exception&) {
      return false;
    }
  }

  bool Has(size_t index) const { return index < ki_.GetInputCount() && !ki_.GetInputName(index).empty(); }

  // An initializer input with the expected element count.
  Ort::ConstValue Constant(size_t index, const std::string& what, size_t expected) const {
    int is_constant = 0;
    Ort::ConstValue value = ki_.GetTensorConstantInput(index, &is_constant);
    if (!is_constant) Fail(what + " must be an initializer");
    const size_t count = value.GetTensorTypeAndShapeInfo().GetElementCount();
    if (count != expected)
      Fail(what + " has " + std::to_string(count) + " elements, expected " + std::to_string(expected));
    return value;
  }

  // Float or float16 values as float; float16 ones also as given, in *half.
  std::vector<float> Floats(size_t index, const std::string& what, size_t expected,
                            std::vector<uint16_t>* half = nullptr) const {
    Ort::ConstValue value = Constant(index, what, expected);
    std::vector<float> out(expected);
    const auto type = value.GetTensorTypeAndShapeInfo().GetElementType();
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      const uint16_t* h = static_cast<const uint16_t*>(value.GetTensorRawData());
      for (size_t i = 0; i < expected; ++i) out[i] = lrq::HalfToFloat(h[i]);
      if (half) half->assign(h, h + expected);
      ReleasePages(h, expected * sizeof(uint16_t));
    } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      const float* f = value.GetTensorData<float>();
      out.assign(f, f + expected);
      ReleasePages(f, expected * sizeof(float));
    } else {
      Fail(what + " must be float or float16");
    }
    return out;
  }

  // The weight W[K, N] held by inputs first (codes), first + 1 (scales), first + 2 (zero points,
  // optional); bits and block are the values of the attributes named bits_attr and block_attr, and
  // k_name names K for messages ("K", or "rank" for R).
  std::unique_ptr<lrq::Weight> Weight(size_t first, const std::string& what, int64_t K, const char* k_name,
                                      int64_t N, const char* bits_attr, int64_t bits, const char* block_attr,
                                      int64_t block, bool int8) const {
    if (K < 1 || N < 1) Fail(what + ": " + k_name + " and N must be positive");
    if (bits < 2 || bits > 8) Fail(std::string(bits_attr) + " must be in 2..8, got " + std::to_string(bits));
    if (block < 1 || block > K)
      Fail(std::string(block_attr) + " must be in 1.." + k_name + "=" + std::to_string(K) + ", got " +
           std::to_string(block));
    lrq::WeightSpec spec;
    spec.K = K;
    spec.N = N;
    spec.bits = static_cast<int>(bits);
    spec.block = static_cast<int>(block);
    const size_t cells = static_cast<size_t>(N) * spec.blocks();
    Ort::ConstValue codes = Constant(first, what + " codes", cells * spec.blob());
    spec.codes = codes.GetTensorData<uint8_t>();
    spec.scales = Floats(first + 1, what + " scales", cells, &spec.half_scales);
    if (Has(first + 2)) {
      const uint8_t* zp = Constant(first + 2, what + " zero points", cells).GetTensorData<uint8_t>();
      spec.zero_points.assign(zp, zp + cells);
      ReleasePages(zp, cells);
    }
    std::unique_ptr<lrq::Weight> weight = lrq::MakeWeight(spec, int8);
    if (!weight->ReadsStoredCodes()) ReleasePages(spec.codes, cells * spec.blob());
    return weight;
  }

  std::vector<float> Bias(size_t index, int64_t N) const {
    return Has(index) ? Floats(index, "bias", static_cast<size_t>(N)) : std::vector<float>();
  }

 private:
  Ort::ConstKernelInfo ki_;
  std::string op_, node_ = "?";
};

// The integer attributes of one node, as its kernel's tables list them: every one of `required` is
// read (a missing one fails, naming it), those of `optional` when present. Asking for a name that
// is in neither table is a bug in this file (std::logic_error), so the tables are the whole truth.
class Attributes {
 public:
  template <size_t R, size_t O>
  Attributes(const NodeInfo& node, const std::array<const char*, R>& required, const std::array<const char*, O>& optional)
      : node_(node) {
    for (const char* name : required) {
      Entry e{name, true, 0};
      if (!node.TryAttr(name, &e.value)) node.Fail(std::string("missing integer attribute '") + name + "'");
      entries_.push_back(e);
    }
    for (const char* name : optional) {
      Entry e{name, false, 0};
      e.present = node.TryAttr(name, &e.value);
      entries_.push_back(e);
    }
  }

  // The value; an absent optional attribute fails naming it (q_bits, say, when Q is given).
  int64_t operator[](const char* name) const {
    const Entry& e = Find(name);
    if (!e.present) node_.Fail(std::string("missing integer attribute '") + name + "'");
    return e.value;
  }

  int64_t Or(const char* name, int64_t fallback) const {
    const Entry& e = Find(name);
    return e.present ? e.value : fallback;
  }

 private:
  struct Entry {
    const char* name;
    bool present;
    int64_t value;
  };

  const Entry& Find(const char* name) const {
    for (const Entry& e : entries_)
      if (std::strcmp(e.name, name) == 0) return e;
    throw std::logic_error(std::string("lrq: attribute '") + name + "' is not in the op's tables");
  }

  const NodeInfo& node_;
  std::vector<Entry> entries_;
};

template <typename Kernel>
Attributes AttributesOf(const NodeInfo& node) {
  return Attributes(node, Kernel::kAttributes, Kernel::kOptionalAttributes);
}

// Runs a kernel's Compute, turning exceptions into an OrtStatus.
template <typename Kernel>
OrtStatusPtr Guarded(Kernel& kernel, OrtKernelContext* context) {
  try {
    kernel.Compute(context);
    return nullptr;
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

// X[..., K] → (rows, Y[..., N]).
std::pair<int64_t, float*> Output(Ort::KernelContext& ctx, const char* op, int64_t K, int64_t N, const float** x) {
  auto input = ctx.GetInput(0);
  auto shape = input.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.empty() || shape.back() != K)
    throw std::runtime_error(std::string("lrq.") + op + ": the last dimension of X must be K=" + std::to_string(K));
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  shape.back() = N;
  *x = input.GetTensorData<float>();
  return {rows, ctx.GetOutput(0, shape).GetTensorMutableData<float>()};
}

// A randomized Hadamard transform from inputs first (signs [n]) and first + 1 (small [b, b], needed
// when n = 2^a·b has b > 1); an empty one (n = 0) when the node does not give the signs.
lrq::Transform TransformOf(const NodeInfo& node, size_t first, int64_t n, const std::string& name) {
  lrq::Transform t;
  if (!node.Has(first)) return t;
  t.n = n;
  t.power = n & -n;
  t.odd = n / t.power;
  t.signs = node.Floats(first, name + "_signs", static_cast<size_t>(n));
  if (t.odd > 1) {
    if (!node.Has(first + 1)) node.Fail(name + "_small is required when " + std::to_string(n) + " has an odd factor");
    t.small = node.Floats(first + 1, name + "_small", static_cast<size_t>(t.odd * t.odd));
  }
  return t;
}

// X·F, row by row, into memory the caller owns (X itself when there is no rotation).
const float* Rotated(const lrq::Transform& rotation, const float* x, int64_t rows, std::vector<float>& buffer) {
  if (rotation.n == 0) return x;
  buffer.assign(x, x + rows * rotation.n);
  for (int64_t m = 0; m < rows; ++m) rotation.Forward(buffer.data() + m * rotation.n);
  return buffer.data();
}

// A kernel that multiplies by one prepacked weight (+ bias), after an optional input rotation.
template <typename Derived>
struct OneWeightKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return Guarded(*this, context); }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const float* x;
    auto [rows, y] = Output(ctx, Derived::kName, w_->K(), w_->N(), &x);
    if (rows == 0) return;
    std::vector<float> rotated;
    x = Rotated(rotation_, x, rows, rotated);
    w_->Multiply(x, rows, y, false, bias_.empty() ? nullptr : bias_.data(), OrtParallel(ctx));
  }

  std::unique_ptr<lrq::Weight> w_;
  std::vector<float> bias_;
  lrq::Transform rotation_;
};

struct QMatMulKernel : OneWeightKernel<QMatMulKernel> {
  static constexpr const char* kName = "QMatMul";
  static constexpr Input kInputs[] = {
      {"X", kFloat, true}, {"B_codes", kUint8, true}, {"B_scales", kFloatOrHalf, true},
      {"B_zero_points", kUint8, false}, {"bias", kFloat, false},
      {"rotation_signs", kFloatOrHalf, false}, {"rotation_small", kFloatOrHalf, false}};
  static constexpr std::array<const char*, 4> kAttributes{"K", "N", "bits", "block_size"};
  // rotation_seed: the seed the rotation was drawn from (relower reads it; the kernel takes the inputs)
  static constexpr std::array<const char*, 2> kOptionalAttributes{"accuracy_level", "rotation_seed"};

  explicit QMatMulKernel(const OrtKernelInfo* info) {
    NodeInfo node(info, kName);
    const Attributes a = AttributesOf<QMatMulKernel>(node);
    w_ = node.Weight(1, "B", a["K"], "K", a["N"], "bits", a["bits"], "block_size", a["block_size"],
                     a.Or("accuracy_level", 0) == 4);
    bias_ = node.Bias(4, w_->N());
    rotation_ = TransformOf(node, 5, w_->K(), "rotation");
  }
};

struct QLowRankKernel {
  static constexpr const char* kName = "QLowRankMatMul";
  static constexpr Input kInputs[] = {
      {"X", kFloat, true},
      {"L_codes", kUint8, true}, {"L_scales", kFloatOrHalf, true}, {"L_zero_points", kUint8, false},
      {"R_codes", kUint8, true}, {"R_scales", kFloatOrHalf, true}, {"R_zero_points", kUint8, false},
      {"Q_codes", kUint8, false}, {"Q_scales", kFloatOrHalf, false}, {"Q_zero_points", kUint8, false},
      {"bias", kFloat, false}, {"rotation_signs", kFloatOrHalf, false}, {"rotation_small", kFloatOrHalf, false}};
  static constexpr std::array<const char*, 7> kAttributes{"K", "N", "rank", "l_bits", "l_block_size", "r_bits",
                                                          "r_block_size"};
  // q_bits and q_block_size are required when Q is given
  static constexpr std::array<const char*, 4> kOptionalAttributes{"q_bits", "q_block_size", "accuracy_level",
                                                                  "rotation_seed"};

  explicit QLowRankKernel(const OrtKernelInfo* info) {
    NodeInfo node(info, kName);
    const Attributes a = AttributesOf<QLowRankKernel>(node);
    const bool int8 = a.Or("accuracy_level", 0) == 4;
    const int64_t K = a["K"], N = a["N"], rank = a["rank"];
    left_ = node.Weight(1, "L", K, "K", rank, "l_bits", a["l_bits"], "l_block_size", a["l_block_size"], int8);
    right_ = node.Weight(4, "R", rank, "rank", N, "r_bits", a["r_bits"], "r_block_size", a["r_block_size"], int8);
    if (node.Has(7))
      dense_ = node.Weight(7, "Q", K, "K", N, "q_bits", a["q_bits"], "q_block_size", a["q_block_size"], int8);
    bias_ = node.Bias(10, N);
    rotation_ = TransformOf(node, 11, K, "rotation");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return Guarded(*this, context); }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const float* x;
    auto [rows, y] = Output(ctx, kName, left_->K(), right_->N(), &x);
    if (rows == 0) return;
    OrtParallel parallel(ctx);
    const float* bias = bias_.empty() ? nullptr : bias_.data();
    std::vector<float> rotated;
    x = Rotated(rotation_, x, rows, rotated);
    std::vector<float> inner(static_cast<size_t>(rows) * left_->N());
    left_->Multiply(x, rows, inner.data(), false, nullptr, parallel);
    if (dense_) dense_->Multiply(x, rows, y, false, bias, parallel);
    right_->Multiply(inner.data(), rows, y, dense_ != nullptr, dense_ ? nullptr : bias, parallel);
  }

  std::unique_ptr<lrq::Weight> left_, right_, dense_;
  std::vector<float> bias_;
  lrq::Transform rotation_;
};

struct KashinKernel : OneWeightKernel<KashinKernel> {
  static constexpr const char* kName = "KashinMatMul";
  static constexpr Input kInputs[] = {
      {"X", kFloat, true}, {"codes", kUint8, true}, {"codebook", kFloat, true},
      {"row_signs", kFloat, false}, {"row_small", kFloat, false},
      {"col_signs", kFloat, false}, {"col_small", kFloat, false}, {"bias", kFloat, false}};
  static constexpr std::array<const char*, 3> kAttributes{"K", "N", "bits"};
  static constexpr std::array<const char*, 0> kOptionalAttributes{};

  explicit KashinKernel(const OrtKernelInfo* info) {
    NodeInfo node(info, kName);
    const Attributes a = AttributesOf<KashinKernel>(node);
    lrq::CodebookSpec spec;
    spec.K = a["K"];
    spec.N = a["N"];
    const int64_t bits = a["bits"];
    if (bits < 1 || bits > 8) node.Fail("bits must be in 1..8, got " + std::to_string(bits));
    spec.bits = static_cast<int>(bits);
    if (spec.K < 1 || spec.N < 1) node.Fail("K and N must be positive");
    const size_t entries = size_t{1} << spec.bits;
    const size_t code_bytes = static_cast<size_t>(spec.N) * ((spec.K * spec.bits + 7) / 8);
    Ort::ConstValue codes = node.Constant(1, "codes", code_bytes);
    spec.codes = codes.GetTensorData<uint8_t>();
    const bool rotated = node.Has(3);
    const std::vector<float> book = node.Floats(2, "codebook", entries * (rotated ? 2 : 1));
    for (size_t c = 0; c < entries; ++c) {
      spec.u.push_back(book[c * (rotated ? 2 : 1)]);
      if (rotated) spec.v.push_back(book[2 * c + 1]);
    }
    if (rotated) {
      spec.rows = TransformOf(node, 3, spec.K, "row");
      spec.cols = TransformOf(node, 5, spec.N, "col");
    }
    w_ = lrq::MakeCodebookWeight(spec);
    if (!w_->ReadsStoredCodes()) ReleasePages(spec.codes, code_bytes);
    bias_ = node.Bias(7, spec.N);
  }

};

// One custom-op class for each kernel: inputs and their types come from the kernel's tables;
// errors travel as OrtStatus (exceptions must not cross the C boundary).
template <typename Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return Kernel::kName; }
  size_t GetInputTypeCount() const { return std::size(Kernel::kInputs); }
  ONNXTensorElementDataType GetInputType(size_t index) const { return Kernel::kInputs[index].type; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return Kernel::kInputs[index].required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// The domain every session gets. Created by the first registration: a function-local static is
// initialised exactly once, other callers waiting for it (an exception leaves it to the next call),
// so sessions registering from several threads at once share one domain.
Ort::CustomOpDomain& Domain() {
  static Op<QMatMulKernel> qmatmul;
  static Op<QLowRankKernel> qlowrank;
  static Op<KashinKernel> kashin;
  static Ort::CustomOpDomain domain = [] {
    Ort::CustomOpDomain d(kDomain);
    d.Add(&qmatmul);
    d.Add(&qlowrank);
    d.Add(&kashin);
    return d;
  }();
  return domain;
}

const char* TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case kFloat: return "float";
    case kUint8: return "uint8";
    case kFloatOrHalf: return "float,float16";
    default: return "?";
  }
}

template <typename Kernel>
void Describe(std::string& out) {
  out += std::string("op ") + Kernel::kName + "\n";
  for (const Input& in : Kernel::kInputs)
    out += std::string("input ") + in.name + " " + TypeName(in.type) + (in.required ? " required\n" : " optional\n");
  for (const char* name : Kernel::kAttributes) out += std::string("attribute ") + name + " required\n";
  for (const char* name : Kernel::kOptionalAttributes) out += std::string("attribute ") + name + " optional\n";
}

}  // namespace

extern "C" __attribute__((visibility("default")))
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (api == nullptr) {  // onnxruntime older than 1.16: report through API 1, which every version has
    const OrtApi* old = api_base->GetApi(1);
    if (old == nullptr) return nullptr;  // not an onnxruntime we can talk to at all
    const char* version = api_base->GetVersionString();
    const std::string message = std::string("lrq custom ops: onnxruntime ") + (version ? version : "?") +
                                " is too old, they need onnxruntime " + kMinOrt + " or newer (C API version " +
                                std::to_string(kApiVersion) + "); upgrade onnxruntime (pip install -U onnxruntime)";
    return old->CreateStatus(ORT_FAIL, message.c_str());
  }
  // The C++ API's table, set once; every later registration must come from the same onnxruntime.
  static const OrtApi* const registered = [api] {
    Ort::InitApi(api);
    return api;
  }();
  if (api != registered)
    return api->CreateStatus(ORT_FAIL, "lrq custom ops: already registered with another onnxruntime library in "
                                       "this process; use one onnxruntime");
  try {
    Ort::UnownedSessionOptions(options).Add(Domain());
  } catch (const std::exception& e) {  // nothing may cross the C boundary
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// Every op's inputs (name, types, required|optional) and integer attributes, from the kernels'
// tables, one item a line: "domain lrq", then per op "op NAME", "input NAME TYPES required|optional"
// (TYPES: comma-separated ONNX element type names), "attribute NAME required|optional".
extern "C" __attribute__((visibility("default"))) const char* LrqOpSchema(void) {
  static const std::string text = [] {
    std::string out = std::string("domain ") + kDomain + "\n";
    Describe<QMatMulKernel>(out);
    Describe<QLowRankKernel>(out);
    Describe<KashinKernel>(out);
    return out;
  }();
  return text.c_str();
}

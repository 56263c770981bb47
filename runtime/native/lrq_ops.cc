// lrqgraph's onnxruntime custom ops (domain "lrq"): block-quantized matrix products.
//
// QMatMul: Y[..., N] = X[..., K] · dequant(W) (+ bias), W stored like MatMulNBits: B[N, blocks, blob]
// holds column n of W, its codes along K packed low bits first (any width 2..8, so 3-bit codes
// pack 8 to 3 bytes), one scale per (n, block) (float or float16) and an optional zero point per
// (n, block) (uint8, unpacked; absent: 2^(bits-1)). A code c stands for (c - zp) · scale.
//
// The weight is read once at kernel creation and kept packed (batch 1 is bound by the bytes read);
// each call decodes one block of one column at a time into registers/L1 and applies it to every
// row of X, so decoding is shared by the whole batch. Columns are split over onnxruntime's
// intra-op thread pool. The hot loop is compiled for AVX-512, AVX2 and a portable baseline and the
// CPU picks at load time (GCC target_clones).
//
// The library does not link onnxruntime: the API table arrives through RegisterCustomOps.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr const char* kDomain = "lrq";
constexpr int kApiVersion = 16;  // oldest onnxruntime API this library asks for (1.16+)

float HalfToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Unpack `count` codes of `bits` bits from a low-bits-first stream into floats.
__attribute__((target_clones("avx512f", "avx2", "default")))
void Decode(const uint8_t* src, int bits, int count, float* out) {
  if (bits == 4) {
    for (int i = 0; i < count / 2; ++i) {
      out[2 * i] = static_cast<float>(src[i] & 0xf);
      out[2 * i + 1] = static_cast<float>(src[i] >> 4);
    }
    if (count & 1) out[count - 1] = static_cast<float>(src[count / 2] & 0xf);
  } else if (bits == 8) {
    for (int i = 0; i < count; ++i) out[i] = static_cast<float>(src[i]);
  } else if (bits == 2) {
    for (int i = 0; i < count; ++i) out[i] = static_cast<float>((src[i >> 2] >> ((i & 3) * 2)) & 3);
  } else {
    const uint32_t mask = (1u << bits) - 1;
    for (int i = 0; i < count; ++i) {
      const int bit = i * bits, byte = bit >> 3, shift = bit & 7;
      uint32_t word = src[byte] | (shift + bits > 8 ? static_cast<uint32_t>(src[byte + 1]) << 8 : 0u);
      out[i] = static_cast<float>((word >> shift) & mask);
    }
  }
}

// acc[m] += scale · (w · x[m, k0:k0+len] − zp · xsum[m]) for every row m.
__attribute__((target_clones("avx512f", "avx2", "default")))
void ApplyBlock(const float* w, int len, const float* x, int64_t rows, int64_t ldx, const float* xsum,
                int64_t ldsum, float scale, float zp, float* acc, int64_t ldacc) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * ldx;
    float dot = 0.f;
    for (int k = 0; k < len; ++k) dot += w[k] * xm[k];
    acc[m * ldacc] += scale * (dot - zp * xsum[m * ldsum]);
  }
}

struct PackedWeight {
  int64_t K = 0, N = 0;
  int bits = 0, block = 0, blocks = 0, blob = 0;
  std::vector<uint8_t> codes;   // [N, blocks, blob]
  std::vector<float> scales;    // [N, blocks]
  std::vector<float> zps;       // [N, blocks]
  std::vector<float> bias;      // [N] or empty
};

struct QMatMulKernel {
  QMatMulKernel(const OrtApi& api, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    w_.K = ki.GetAttribute<int64_t>("K");
    w_.N = ki.GetAttribute<int64_t>("N");
    w_.bits = static_cast<int>(ki.GetAttribute<int64_t>("bits"));
    w_.block = static_cast<int>(ki.GetAttribute<int64_t>("block_size"));
    if (w_.bits < 2 || w_.bits > 8) throw std::runtime_error("lrq.QMatMul: bits must be in 2..8");
    if (w_.block < 1 || w_.K < 1 || w_.N < 1) throw std::runtime_error("lrq.QMatMul: bad K, N or block_size");
    w_.blocks = static_cast<int>((w_.K + w_.block - 1) / w_.block);
    w_.blob = (w_.block * w_.bits + 7) / 8;
    const size_t inputs = ki.GetInputCount();
    w_.codes = Constant<uint8_t>(ki, 1, "B", static_cast<size_t>(w_.N) * w_.blocks * w_.blob);
    w_.scales = ConstantFloats(ki, 2, "scales", static_cast<size_t>(w_.N) * w_.blocks);
    if (inputs > 3 && HasInput(ki, 3)) {
      auto zp = Constant<uint8_t>(ki, 3, "zero_points", static_cast<size_t>(w_.N) * w_.blocks);
      w_.zps.assign(zp.begin(), zp.end());
    } else {
      w_.zps.assign(static_cast<size_t>(w_.N) * w_.blocks, static_cast<float>(1 << (w_.bits - 1)));
    }
    if (inputs > 4 && HasInput(ki, 4)) w_.bias = ConstantFloats(ki, 4, "bias", static_cast<size_t>(w_.N));
    (void)api;
  }

  static bool HasInput(const Ort::ConstKernelInfo& ki, size_t index) {
    return !ki.GetInputName(index).empty();
  }

  template <typename T>
  static std::vector<T> Constant(const Ort::ConstKernelInfo& ki, size_t index, const char* what, size_t expected) {
    int is_constant = 0;
    Ort::ConstValue value = ki.GetTensorConstantInput(index, &is_constant);
    if (!is_constant) throw std::runtime_error(std::string("lrq.QMatMul: ") + what + " must be an initializer");
    auto info = value.GetTensorTypeAndShapeInfo();
    if (info.GetElementCount() != expected)
      throw std::runtime_error(std::string("lrq.QMatMul: ") + what + " has the wrong number of elements");
    const T* data = value.GetTensorData<T>();
    return std::vector<T>(data, data + expected);
  }

  static std::vector<float> ConstantFloats(const Ort::ConstKernelInfo& ki, size_t index, const char* what,
                                           size_t expected) {
    int is_constant = 0;
    Ort::ConstValue value = ki.GetTensorConstantInput(index, &is_constant);
    if (!is_constant) throw std::runtime_error(std::string("lrq.QMatMul: ") + what + " must be an initializer");
    auto info = value.GetTensorTypeAndShapeInfo();
    if (info.GetElementCount() != expected)
      throw std::runtime_error(std::string("lrq.QMatMul: ") + what + " has the wrong number of elements");
    std::vector<float> out(expected);
    if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(value.GetTensorRawData());
      for (size_t i = 0; i < expected; ++i) out[i] = HalfToFloat(h[i]);
    } else if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      const float* f = value.GetTensorData<float>();
      std::copy(f, f + expected, out.begin());
    } else {
      throw std::runtime_error(std::string("lrq.QMatMul: ") + what + " must be float or float16");
    }
    return out;
  }

  struct Job {
    const PackedWeight* w;
    const float* x;
    const float* xsum;
    float* y;
    int64_t rows;
    int64_t columns_per_task;
  };

  static void Columns(void* data, size_t task) {
    const Job& job = *static_cast<const Job*>(data);
    const PackedWeight& w = *job.w;
    const int64_t first = static_cast<int64_t>(task) * job.columns_per_task;
    const int64_t last = std::min<int64_t>(w.N, first + job.columns_per_task);
    std::vector<float> decoded(w.block);
    for (int64_t n = first; n < last; ++n) {
      float* acc = job.y + n;  // column n of Y, stride N
      const float b = w.bias.empty() ? 0.f : w.bias[n];
      for (int64_t m = 0; m < job.rows; ++m) acc[m * w.N] = b;
      for (int blk = 0; blk < w.blocks; ++blk) {
        const int k0 = blk * w.block;
        const int len = static_cast<int>(std::min<int64_t>(w.block, w.K - k0));
        const size_t at = static_cast<size_t>(n) * w.blocks + blk;
        Decode(w.codes.data() + at * w.blob, w.bits, len, decoded.data());
        ApplyBlock(decoded.data(), len, job.x + k0, job.rows, w.K, job.xsum + blk, w.blocks,
                   w.scales[at], w.zps[at], acc, w.N);
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto input = ctx.GetInput(0);
    auto shape = input.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != w_.K)
      throw std::runtime_error("lrq.QMatMul: the last dimension of X must be K");
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    shape.back() = w_.N;
    auto output = ctx.GetOutput(0, shape);
    const float* x = input.GetTensorData<float>();
    float* y = output.GetTensorMutableData<float>();
    if (rows == 0) return;
    // per-block sums of X carry the zero points: Σ (c − zp)·x = Σ c·x − zp·Σ x
    std::vector<float> xsum(static_cast<size_t>(rows) * w_.blocks, 0.f);
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t k = 0; k < w_.K; ++k) xsum[m * w_.blocks + k / w_.block] += x[m * w_.K + k];
    Job job{&w_, x, xsum.data(), y, rows, 0};
    const int64_t tasks = std::min<int64_t>(w_.N, 64);
    job.columns_per_task = (w_.N + tasks - 1) / tasks;
    const size_t count = static_cast<size_t>((w_.N + job.columns_per_task - 1) / job.columns_per_task);
    ctx.ParallelFor(&QMatMulKernel::Columns, count, 0, &job);
  }

  PackedWeight w_;
};

struct QMatMulOp : Ort::CustomOpBase<QMatMulOp, QMatMulKernel, true> {
  // errors travel as OrtStatus (exceptions must not cross the C boundary)
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new QMatMulKernel(api, info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return "QMatMul"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case 1: case 3: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float or float16 scales
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

extern "C" __attribute__((visibility("default")))
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (api == nullptr) {
    return nullptr;  // cannot even report: onnxruntime older than 1.16
  }
  Ort::InitApi(api);
  static QMatMulOp qmatmul;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  try {
    if (!domain) {
      domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
      domain->Add(&qmatmul);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

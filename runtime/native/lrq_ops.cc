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
// intra-op thread pool. Decoding and dot products have an AVX2+FMA path chosen at load time when
// the CPU has it, and a portable one otherwise.
//
// The library does not link onnxruntime: the API table arrives through RegisterCustomOps.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

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

// Unpack `count` codes of `bits` bits from a low-bits-first stream into floats (portable path).
// Dequantize `count` codes of `bits` bits (a low-bits-first stream): out = code · scale + offset.
void DecodeScalar(const uint8_t* src, int bits, int count, float scale, float offset, float* out) {
  const uint32_t mask = (1u << bits) - 1;
  for (int i = 0; i < count; ++i) {
    const int bit = i * bits, byte = bit >> 3, shift = bit & 7;
    uint32_t word = src[byte] | (shift + bits > 8 ? static_cast<uint32_t>(src[byte + 1]) << 8 : 0u);
    out[i] = static_cast<float>((word >> shift) & mask) * scale + offset;
  }
}

// out[c] = Σ_k w[c][k] · x[k] for 4 columns at once (x is read once for the four).
void Dot4Scalar(const float* const* w, const float* x, int64_t len, float* out) {
  for (int c = 0; c < 4; ++c) {
    float s0 = 0.f, s1 = 0.f;
    int64_t k = 0;
    for (; k + 2 <= len; k += 2) { s0 += w[c][k] * x[k]; s1 += w[c][k + 1] * x[k + 1]; }
    if (k < len) s0 += w[c][k] * x[k];
    out[c] = s0 + s1;
  }
}

__attribute__((target("avx2,fma"))) static inline void Put(float* dst, __m256i codes, __m256 s, __m256 o) {
  _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), s, o));
}

// AVX2: 4-bit and 2-bit codes decoded 32 at a time with byte shifts and masks (the byte order of
// the stream is restored with unpack), 8-bit codes widened directly; other widths go scalar.
__attribute__((target("avx2,fma")))
static inline void DecodeAvx2(const uint8_t* src, int bits, int count, float scale, float offset, float* out) {
  const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
  int i = 0;
  if (bits == 4) {
    const __m128i low = _mm_set1_epi8(0x0f);
    for (; i + 32 <= count; i += 32) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i / 2));
      const __m128i lo = _mm_and_si128(packed, low), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
      const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
      Put(out + i, _mm256_cvtepu8_epi32(first), s, o);
      Put(out + i + 8, _mm256_cvtepu8_epi32(_mm_srli_si128(first, 8)), s, o);
      Put(out + i + 16, _mm256_cvtepu8_epi32(second), s, o);
      Put(out + i + 24, _mm256_cvtepu8_epi32(_mm_srli_si128(second, 8)), s, o);
    }
  } else if (bits == 8) {
    for (; i + 8 <= count; i += 8) {
      const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
      Put(out + i, _mm256_cvtepu8_epi32(packed), s, o);
    }
  } else if (bits == 2) {
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), three = _mm256_set1_epi32(3);
    for (; i + 8 <= count; i += 8) {  // 8 codes = 2 bytes
      uint16_t word;
      std::memcpy(&word, src + i / 4, 2);
      const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
      Put(out + i, _mm256_and_si256(v, three), s, o);
    }
  } else if (bits == 3) {
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21), seven = _mm256_set1_epi32(7);
    for (; i + 8 <= count; i += 8) {  // 8 codes = 3 bytes
      const uint8_t* b = src + (i / 8) * 3;
      const uint32_t word = b[0] | (b[1] << 8) | (b[2] << 16);
      const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
      Put(out + i, _mm256_and_si256(v, seven), s, o);
    }
  }
  if (i < count) {  // the tail (and widths without a vector path) from the same stream position
    const int bit = i * bits;
    if (bit % 8 == 0) {
      DecodeScalar(src + bit / 8, bits, count - i, scale, offset, out + i);
    } else {
      std::vector<float> all(count);
      DecodeScalar(src, bits, count, scale, offset, all.data());
      std::copy(all.begin() + i, all.end(), out + i);
    }
  }
}

__attribute__((target("avx2,fma")))
static float HorizontalSum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

__attribute__((target("avx2,fma")))
void Dot4Avx2(const float* const* w, const float* x, int64_t len, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w[0] + k), xv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w[1] + k), xv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w[2] + k), xv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w[3] + k), xv, a3);
  }
  out[0] = HorizontalSum(a0); out[1] = HorizontalSum(a1); out[2] = HorizontalSum(a2); out[3] = HorizontalSum(a3);
  for (; k < len; ++k)
    for (int c = 0; c < 4; ++c) out[c] += w[c][k] * x[k];
}

// Consecutive blocks of one column (their blobs are adjacent): one call per run of blocks, so the
// per-block work is a loop iteration, not a call through a pointer.
void DecodeBlocksScalar(const uint8_t* src, int bits, int block, int blob, int64_t count, const float* scales,
                        const float* offsets, float* out) {
  for (int64_t k = 0, b = 0; k < count; k += block, ++b)
    DecodeScalar(src + b * blob, bits, static_cast<int>(std::min<int64_t>(block, count - k)), scales[b], offsets[b],
                 out + k);
}

__attribute__((target("avx2,fma")))
void DecodeBlocksAvx2(const uint8_t* src, int bits, int block, int blob, int64_t count, const float* scales,
                      const float* offsets, float* out) {
  for (int64_t k = 0, b = 0; k < count; k += block, ++b)
    DecodeAvx2(src + b * blob, bits, static_cast<int>(std::min<int64_t>(block, count - k)), scales[b], offsets[b],
               out + k);
}

struct Kernels {
  void (*decode)(const uint8_t*, int, int, int, int64_t, const float*, const float*, float*);
  void (*dot4)(const float* const*, const float*, int64_t, float*);
};

// Chosen once, at load time, from what this CPU supports.
const Kernels& Pick() {
  static const Kernels kernels = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                                     ? Kernels{DecodeBlocksAvx2, Dot4Avx2}
                                     : Kernels{DecodeBlocksScalar, Dot4Scalar};
  return kernels;
}

struct PackedWeight {
  int64_t K = 0, N = 0;
  int bits = 0, block = 0, blocks = 0, blob = 0;
  std::vector<uint8_t> codes;   // [N, blocks, blob]
  std::vector<float> scales;    // [N, blocks]
  std::vector<float> offsets;   // [N, blocks]: −zero point · scale
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
    std::vector<float> zps(w_.scales.size(), static_cast<float>(1 << (w_.bits - 1)));
    if (inputs > 3 && HasInput(ki, 3)) {
      auto zp = Constant<uint8_t>(ki, 3, "zero_points", zps.size());
      std::copy(zp.begin(), zp.end(), zps.begin());
    }
    w_.offsets.resize(zps.size());
    for (size_t i = 0; i < zps.size(); ++i) w_.offsets[i] = -zps[i] * w_.scales[i];
    if (inputs > 4 && HasInput(ki, 4)) w_.bias = ConstantFloats(ki, 4, "bias", static_cast<size_t>(w_.N));
    (void)api;
  }

  static bool HasInput(const Ort::ConstKernelInfo& ki, size_t index) {
    return !ki.GetInputName(index).empty();
  }

  // An initializer input with the expected element count (weights are read once, here).
  static Ort::ConstValue ConstantInput(const Ort::ConstKernelInfo& ki, size_t index, const char* what,
                                       size_t expected) {
    int is_constant = 0;
    Ort::ConstValue value = ki.GetTensorConstantInput(index, &is_constant);
    if (!is_constant) throw std::runtime_error(std::string("lrq.QMatMul: ") + what + " must be an initializer");
    if (value.GetTensorTypeAndShapeInfo().GetElementCount() != expected)
      throw std::runtime_error(std::string("lrq.QMatMul: ") + what + " has the wrong number of elements");
    return value;
  }

  template <typename T>
  static std::vector<T> Constant(const Ort::ConstKernelInfo& ki, size_t index, const char* what, size_t expected) {
    const T* data = ConstantInput(ki, index, what, expected).GetTensorData<T>();
    return std::vector<T>(data, data + expected);
  }

  static std::vector<float> ConstantFloats(const Ort::ConstKernelInfo& ki, size_t index, const char* what,
                                           size_t expected) {
    Ort::ConstValue value = ConstantInput(ki, index, what, expected);
    std::vector<float> out(expected);
    const auto type = value.GetTensorTypeAndShapeInfo().GetElementType();
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(value.GetTensorRawData());
      for (size_t i = 0; i < expected; ++i) out[i] = HalfToFloat(h[i]);
    } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
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
    float* y;
    int64_t rows;
    int64_t columns_per_task;
  };

  // Columns [first, last), four at a time, K in chunks of whole blocks (about 256 values): each
  // chunk of the four columns is dequantized into an L1-resident buffer (scale and zero point
  // folded in) and dotted with that chunk of every row of X.
  static void Columns(void* data, size_t task) {
    const Job& job = *static_cast<const Job*>(data);
    const PackedWeight& w = *job.w;
    const int64_t first = static_cast<int64_t>(task) * job.columns_per_task;
    const int64_t last = std::min<int64_t>(w.N, first + job.columns_per_task);
    const Kernels& kernels = Pick();
    const int chunk_blocks = std::max(1, 256 / w.block);
    const int64_t chunk = static_cast<int64_t>(chunk_blocks) * w.block;
    std::vector<float> buffer(4 * static_cast<size_t>(chunk), 0.f);
    const float* cols[4] = {buffer.data(), buffer.data() + chunk, buffer.data() + 2 * chunk, buffer.data() + 3 * chunk};
    float dots[4];
    for (int64_t n0 = first; n0 < last; n0 += 4) {
      const int width = static_cast<int>(std::min<int64_t>(4, last - n0));
      for (int64_t m = 0; m < job.rows; ++m)
        for (int c = 0; c < width; ++c) job.y[m * w.N + n0 + c] = w.bias.empty() ? 0.f : w.bias[n0 + c];
      for (int b0 = 0; b0 < w.blocks; b0 += chunk_blocks) {
        const int64_t k0 = static_cast<int64_t>(b0) * w.block;
        const int64_t len = std::min<int64_t>(chunk, w.K - k0);
        for (int c = 0; c < width; ++c) {
          const size_t at = static_cast<size_t>(n0 + c) * w.blocks + b0;
          kernels.decode(w.codes.data() + at * w.blob, w.bits, w.block, w.blob, len, &w.scales[at], &w.offsets[at],
                         buffer.data() + c * chunk);
        }
        for (int64_t m = 0; m < job.rows; ++m) {
          kernels.dot4(cols, job.x + m * w.K + k0, len, dots);
          for (int c = 0; c < width; ++c) job.y[m * w.N + n0 + c] += dots[c];
        }
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
    Job job{&w_, x, y, rows, 0};
    const int64_t tasks = std::min<int64_t>((w_.N + 3) / 4, 64);
    job.columns_per_task = ((w_.N + tasks - 1) / tasks + 3) / 4 * 4;
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

// FloatWeight: codes read where onnxruntime keeps them (no copy), decoded to float32 in L1-sized chunks (scale and zero point
// folded in), then dotted with every row of X, so decoding is shared by the whole batch. Serves
// every width and block size on every CPU: AVX2+FMA when the CPU has it, portable code otherwise.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace lrq {

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

namespace {

// Dequantize `count` codes of `bits` bits (a low-bits-first stream): out = code · scale + offset.
void DecodeScalar(const uint8_t* src, int bits, int count, float scale, float offset, float* out) {
  for (int i = 0; i < count; ++i) out[i] = static_cast<float>(CodeAt(src, bits, i)) * scale + offset;
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

__attribute__((target("avx2,fma"))) inline void Put(float* dst, __m256i codes, __m256 s, __m256 o) {
  _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), s, o));
}

// AVX2: 4-bit and 2-bit codes decoded 32 at a time with byte shifts and masks (the byte order of
// the stream is restored with unpack), 3- and 8-bit codes 8 at a time; other widths go scalar.
__attribute__((target("avx2,fma")))
void DecodeAvx2(const uint8_t* src, int bits, int count, float scale, float offset, float* out) {
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
  for (; i < count; ++i) out[i] = static_cast<float>(CodeAt(src, bits, i)) * scale + offset;
}

__attribute__((target("avx2,fma")))
float HorizontalSum(__m256 v) {
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

using DecodeFn = void (*)(const uint8_t*, int, int, float, float, float*);
using Dot4Fn = void (*)(const float* const*, const float*, int64_t, float*);

class FloatWeight final : public Weight {
 public:
  explicit FloatWeight(const WeightSpec& spec)
      : bits_(spec.bits), block_(spec.block), blocks_(spec.blocks()), blob_(spec.blob()),
        codes_(spec.codes),
        scales_(spec.scales), zero_point_(static_cast<float>(1 << (bits_ - 1))) {
    K_ = spec.K;
    N_ = spec.N;
    if (!spec.zero_points.empty()) {
      offsets_.resize(scales_.size());
      for (size_t i = 0; i < offsets_.size(); ++i) offsets_[i] = -static_cast<float>(spec.zero_points[i]) * scales_[i];
    }
    const bool avx2 = Available() >= Isa::kAvx2;
    decode_ = avx2 ? DecodeAvx2 : DecodeScalar;
    dot4_ = avx2 ? Dot4Avx2 : Dot4Scalar;
  }

  bool ReadsStoredCodes() const override { return true; }

  void Multiply(const float* x, int64_t M, float* y, bool accumulate, const float* bias,
                const Parallel& parallel) const override {
    Job job{this, x, y, M, accumulate, bias, 0};
    const int64_t tasks = std::min<int64_t>((N_ + 3) / 4, 64);
    job.columns_per_task = ((N_ + tasks - 1) / tasks + 3) / 4 * 4;
    parallel.For(&FloatWeight::Columns, static_cast<size_t>((N_ + job.columns_per_task - 1) / job.columns_per_task),
                 &job);
  }

 private:
  struct Job {
    const FloatWeight* w;
    const float* x;
    float* y;
    int64_t rows;
    bool accumulate;
    const float* bias;
    int64_t columns_per_task;
  };

  // Columns [first, last), four at a time, K in chunks of whole blocks (about 256 values).
  static void Columns(void* data, size_t task) {
    const Job& job = *static_cast<const Job*>(data);
    const FloatWeight& w = *job.w;
    const int64_t first = static_cast<int64_t>(task) * job.columns_per_task;
    const int64_t last = std::min<int64_t>(w.N_, first + job.columns_per_task);
    const int chunk_blocks = std::max(1, 256 / w.block_);
    const int64_t chunk = static_cast<int64_t>(chunk_blocks) * w.block_;
    std::vector<float> buffer(4 * static_cast<size_t>(chunk), 0.f);
    const float* cols[4] = {buffer.data(), buffer.data() + chunk, buffer.data() + 2 * chunk, buffer.data() + 3 * chunk};
    float dots[4];
    for (int64_t n0 = first; n0 < last; n0 += 4) {
      const int width = static_cast<int>(std::min<int64_t>(4, last - n0));
      for (int64_t m = 0; m < job.rows; ++m)
        for (int c = 0; c < width; ++c) {
          float& out = job.y[m * w.N_ + n0 + c];
          out = (job.accumulate ? out : 0.f) + (job.bias ? job.bias[n0 + c] : 0.f);
        }
      for (int b0 = 0; b0 < w.blocks_; b0 += chunk_blocks) {
        const int64_t k0 = static_cast<int64_t>(b0) * w.block_;
        const int64_t len = std::min<int64_t>(chunk, w.K_ - k0);
        for (int c = 0; c < width; ++c) {
          const size_t at = static_cast<size_t>(n0 + c) * w.blocks_ + b0;
          for (int64_t k = 0, b = 0; k < len; k += w.block_, ++b)
            w.decode_(w.codes_ + (at + b) * w.blob_, w.bits_, static_cast<int>(std::min<int64_t>(w.block_, len - k)),
                      w.scales_[at + b], w.Offset(at + b), buffer.data() + c * chunk + k);
        }
        for (int64_t m = 0; m < job.rows; ++m) {
          w.dot4_(cols, job.x + m * w.K_ + k0, len, dots);
          for (int c = 0; c < width; ++c) job.y[m * w.N_ + n0 + c] += dots[c];
        }
      }
    }
  }

  int bits_, block_, blocks_, blob_;
  const uint8_t* codes_;        // [N, blocks, blob], the initializer itself
  std::vector<float> scales_;   // [N, blocks]
  std::vector<float> offsets_;  // [N, blocks]: −zero point · scale, only when the model gives zero points
  float zero_point_;            // 2^(bits−1) otherwise
  float Offset(size_t cell) const { return offsets_.empty() ? -zero_point_ * scales_[cell] : offsets_[cell]; }
  DecodeFn decode_;
  Dot4Fn dot4_;
};

}  // namespace

std::unique_ptr<Weight> MakeFloatWeight(const WeightSpec& spec) { return std::make_unique<FloatWeight>(spec); }

Isa Available() {
  Isa isa = Isa::kPortable;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = Isa::kAvx2;
  if (isa == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
    isa = Isa::kAvx512;
  const char* cap = std::getenv("LRQGRAPH_KERNELS");
  if (cap && std::strcmp(cap, "portable") == 0) return Isa::kPortable;
  if (cap && std::strcmp(cap, "avx2") == 0) return std::min(isa, Isa::kAvx2);
  return isa;
}

std::unique_ptr<Weight> MakeWeight(const WeightSpec& spec, bool int8_activations) {
  if (int8_activations && Int8Supported(spec.bits, spec.block)) return MakeInt8Weight(spec);
  return MakeFloatWeight(spec);
}

}  // namespace lrq

// Int8Weight: block-quantized codes times int8-quantized activations with AVX-512 VNNI.
//
// Layout, prepacked once: codes in groups of 64 along K, one group decoding into one 512-bit
// register of 64 bytes (byte k = code k) with a few instructions:
//   2-bit: 16 bytes, byte j holds codes j, 16+j, 32+j, 48+j (two bits each, low first):
//          broadcast to four 128-bit lanes, shift lane i right by 2i, mask;
//   3-bit: the 2-bit layout of the low two bits, then a 64-bit mask of the third bits (one masked
//          add of 4);
//   4-bit: 32 bytes, byte j holds code j (low nibble) and code 32+j (high nibble);
//   5..8-bit: one byte per code.
// Activations: each row of X is quantized to int8 per block of K (the weight's block, or 64 when
// the block is smaller), x ≈ sx · xq. For a weight block b of column n, Σ_k x_k (c_k − z) s =
// s · (sx Σ_k xq_k c_k − z Σ_k x̂_k): the first sum is vpdpbusd (unsigned codes × signed xq, 64
// products per instruction, int32 lanes), the second uses the block sums of x̂ computed with the
// quantization, so the result is exactly the product of x̂ with the dequantized weight.
// Kernel: 4 columns × 2 rows per micro-tile; int32 lanes are converted and scaled once per
// activation block. Batch ≤ 2 decodes codes straight into registers; larger batches decode a tile
// of 4 columns into an L1/L2-resident buffer once and sweep every pair of rows over it.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

#define LRQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

namespace lrq {

bool Int8Supported(int bits, int block) {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vnni");
  return cpu && bits >= 2 && bits <= 8 && block >= 4 && (block % 64 == 0 || (64 % block == 0 && block % 4 == 0));
}

namespace {

int StoredBits(int bits) { return bits <= 4 ? bits : 8; }

// 64 codes (one group) into the layout Decode<SB> reads; 8 · SB bytes.
void PackGroup(const uint8_t* c, int sb, uint8_t* out) {
  if (sb == 2 || sb == 3) {
    for (int j = 0; j < 16; ++j) {
      uint8_t b = 0;
      for (int i = 0; i < 4; ++i) b |= static_cast<uint8_t>((c[16 * i + j] & 3) << (2 * i));
      out[j] = b;
    }
    if (sb == 3) {
      uint64_t mask = 0;
      for (int k = 0; k < 64; ++k) mask |= static_cast<uint64_t>((c[k] >> 2) & 1) << k;
      std::memcpy(out + 16, &mask, 8);
    }
  } else if (sb == 4) {
    for (int j = 0; j < 32; ++j) out[j] = static_cast<uint8_t>((c[j] & 15) | (c[32 + j] << 4));
  } else {
    std::memcpy(out, c, 64);
  }
}

template <int SB>
LRQ_AVX512 inline __m512i Decode(const uint8_t* p) {
  if constexpr (SB == 8) {
    return _mm512_loadu_si512(p);
  } else if constexpr (SB == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(0x0f));
  } else {
    const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
    __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi8(3));
    if constexpr (SB == 3) {
      uint64_t high;
      std::memcpy(&high, p + 16, 8);
      codes = _mm512_mask_add_epi8(codes, _cvtu64_mask64(high), codes, _mm512_set1_epi8(4));
    }
    return codes;
  }
}

LRQ_AVX512 float Dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Rows of X quantized to int8: q[M, Kp], sx[M, Kp / xb] (scale per activation block),
// xs[M, Kp / block] (Σ x̂ per weight block, for zero points).
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> sx, xs;
};

LRQ_AVX512 void QuantizeRow(const float* x, int64_t K, int64_t Kp, int xb, int block, int8_t* q, float* sx,
                            float* xs) {
  for (int64_t k0 = 0, j = 0; k0 < Kp; k0 += xb, ++j) {
    const int64_t len = std::clamp<int64_t>(K - k0, 0, xb);
    auto mask_at = [len](int64_t k) -> __mmask16 {
      return k + 16 <= len ? 0xffff : k < len ? static_cast<__mmask16>((1u << (len - k)) - 1) : 0;
    };
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < len; k += 16)
      amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask_at(k), x + k0 + k)));
    const float top = _mm512_reduce_max_ps(amax);
    sx[j] = top / 127.f;
    const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
    for (int64_t k = 0; k < xb; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(mask_at(k), x + k0 + k);
      const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // round to nearest even
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + k), _mm512_cvtsepi32_epi8(i));
    }
  }
  for (int64_t b = 0; b < Kp / block; ++b) {
    const int8_t* src = q + b * block;
    __m512i sum = _mm512_setzero_si512();
    int i = 0;
    for (; i + 16 <= block; i += 16)
      sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    int32_t total = _mm512_reduce_add_epi32(sum);
    for (; i < block; ++i) total += src[i];
    xs[b] = static_cast<float>(total) * sx[(b * block) / xb];
  }
}

class Int8Weight final : public Weight {
 public:
  explicit Int8Weight(const WeightSpec& s)
      : bits_(s.bits), sb_(StoredBits(s.bits)), block_(s.block), xb_(s.block % 64 == 0 ? s.block : 64) {
    K_ = s.K;
    N_ = s.N;
    Kp_ = (K_ + xb_ - 1) / xb_ * xb_;
    groups_ = Kp_ / 64;
    sblocks_ = Kp_ / block_;
    gbytes_ = 8 * sb_;
    codes_.assign(static_cast<size_t>(N_) * groups_ * gbytes_, 0);
    scales_.assign(static_cast<size_t>(N_) * sblocks_, 0.f);
    const int blocks = s.blocks(), blob = s.blob();
    bool uniform = true;
    zero_point_ = s.zero_points.empty() ? static_cast<float>(1 << (bits_ - 1)) : s.zero_points[0];
    for (uint8_t z : s.zero_points) uniform = uniform && z == s.zero_points[0];
    if (!uniform) offsets_.assign(scales_.size(), 0.f);
    std::vector<uint8_t> column(Kp_);
    for (int64_t n = 0; n < N_; ++n) {
      std::fill(column.begin(), column.end(), 0);  // padding codes meet zero activations
      for (int b = 0; b < blocks; ++b) {
        const uint8_t* src = s.codes + (static_cast<size_t>(n) * blocks + b) * blob;
        const int64_t k0 = static_cast<int64_t>(b) * block_;
        const int count = static_cast<int>(std::min<int64_t>(block_, K_ - k0));
        for (int i = 0; i < count; ++i) column[k0 + i] = static_cast<uint8_t>(CodeAt(src, bits_, i));
        const size_t at = static_cast<size_t>(n) * blocks + b;
        scales_[n * sblocks_ + b] = s.scales[at];
        if (!uniform) offsets_[n * sblocks_ + b] = -s.zero_points[at] * s.scales[at];
      }
      for (int64_t g = 0; g < groups_; ++g)
        PackGroup(column.data() + 64 * g, sb_, codes_.data() + (static_cast<size_t>(n) * groups_ + g) * gbytes_);
    }
  }

  void Multiply(const float* x, int64_t M, float* y, bool accumulate, const float* bias,
                const Parallel& parallel) const override {
    Activations a;
    a.q.resize(static_cast<size_t>(M) * Kp_);
    a.sx.resize(static_cast<size_t>(M) * (Kp_ / xb_));
    a.xs.resize(static_cast<size_t>(M) * sblocks_);
    for (int64_t m = 0; m < M; ++m)
      QuantizeRow(x + m * K_, K_, Kp_, xb_, block_, a.q.data() + m * Kp_, a.sx.data() + m * (Kp_ / xb_),
                  a.xs.data() + m * sblocks_);
    Job job{this, &a, y, M, accumulate, bias, 0};
    const int64_t tiles = (N_ + 3) / 4;
    const int64_t tasks = std::min<int64_t>(tiles, 64);
    job.tiles_per_task = (tiles + tasks - 1) / tasks;
    parallel.For(&Int8Weight::Task, static_cast<size_t>((tiles + job.tiles_per_task - 1) / job.tiles_per_task),
                 &job);
  }

 private:
  struct Job {
    const Int8Weight* w;
    const Activations* a;
    float* y;
    int64_t M;
    bool accumulate;
    const float* bias;
    int64_t tiles_per_task;
  };

  static void Task(void* data, size_t task) {
    const Job& job = *static_cast<const Job*>(data);
    const int64_t tiles = (job.w->N_ + 3) / 4;
    const int64_t t0 = static_cast<int64_t>(task) * job.tiles_per_task;
    const int64_t t1 = std::min<int64_t>(tiles, t0 + job.tiles_per_task);
    switch (job.w->sb_) {
      case 2: job.w->Tiles<2>(job, t0, t1); break;
      case 3: job.w->Tiles<3>(job, t0, t1); break;
      case 4: job.w->Tiles<4>(job, t0, t1); break;
      default: job.w->Tiles<8>(job, t0, t1); break;
    }
  }

  template <int SB>
  LRQ_AVX512 void Tiles(const Job& job, int64_t t0, int64_t t1) const {
    const bool direct = job.M <= 2;  // small batches decode codes straight into registers
    std::vector<uint8_t> storage(direct ? 0 : 64 * (4 * static_cast<size_t>(groups_) + 1));
    __m512i* buffer = reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
    const float* coef[4];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = 4 * t;
      const int width = static_cast<int>(std::min<int64_t>(4, N_ - n0));
      const uint8_t* packed[4];
      const float* scales[4];
      for (int c = 0; c < 4; ++c) {  // a short last tile repeats its last column
        const int64_t n = n0 + std::min(c, width - 1);
        packed[c] = codes_.data() + static_cast<size_t>(n) * groups_ * gbytes_;
        scales[c] = scales_.data() + n * sblocks_;
        coef[c] = offsets_.empty() ? scales[c] : offsets_.data() + n * sblocks_;
      }
      if (!direct)
        for (int c = 0; c < 4; ++c)
          for (int64_t g = 0; g < groups_; ++g) _mm512_store_si512(buffer + c * groups_ + g, Decode<SB>(packed[c] + g * gbytes_));
      const float zp_factor = offsets_.empty() ? -zero_point_ : 1.f;
      for (int64_t m0 = 0; m0 < job.M; m0 += 2) {
        const int rows = static_cast<int>(std::min<int64_t>(2, job.M - m0));
        float out[2][4];
        if (rows == 2)
          direct ? Micro<SB, 2, true>(packed, buffer, scales, *job.a, m0, out)
                 : Micro<SB, 2, false>(packed, buffer, scales, *job.a, m0, out);
        else
          direct ? Micro<SB, 1, true>(packed, buffer, scales, *job.a, m0, out)
                 : Micro<SB, 1, false>(packed, buffer, scales, *job.a, m0, out);
        for (int r = 0; r < rows; ++r) {
          const float* xs = job.a->xs.data() + (m0 + r) * sblocks_;
          for (int c = 0; c < width; ++c) {
            float& dst = job.y[(m0 + r) * N_ + n0 + c];
            const float value = out[r][c] + zp_factor * Dot(coef[c], xs, sblocks_) + (job.bias ? job.bias[n0 + c] : 0.f);
            dst = job.accumulate ? dst + value : value;
          }
        }
      }
    }
  }

  // out[r][c] = Σ_k x̂[m0 + r, k] · code[k, column c] · scale (zero points excluded).
  template <int SB, int R, bool kDirect>
  LRQ_AVX512 void Micro(const uint8_t* const* packed, const __m512i* buffer, const float* const* scales,
                        const Activations& a, int64_t m0, float out[2][4]) const {
    const int per_block = xb_ / 64, xblocks = static_cast<int>(Kp_ / xb_);
    const int8_t* xq[R];
    const float* sx[R];
    for (int r = 0; r < R; ++r) {
      xq[r] = a.q.data() + (m0 + r) * Kp_;
      sx[r] = a.sx.data() + (m0 + r) * xblocks;
    }
    // blocks smaller than 64: lane l (bytes 4l..4l+3 of a group) belongs to block 4l / block
    const int small = block_ < 64 ? 64 / block_ : 1;
    __m512i lane_block = _mm512_setzero_si512();
    if (small > 1) {
      alignas(64) int32_t idx[16];
      for (int l = 0; l < 16; ++l) idx[l] = 4 * l / block_;
      lane_block = _mm512_load_si512(idx);
    }
    const __mmask16 small_mask = static_cast<__mmask16>((1u << small) - 1);
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int j = 0; j < xblocks; ++j) {
      __m512i dots[R][4];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) dots[r][c] = _mm512_setzero_si512();
      for (int64_t g = static_cast<int64_t>(j) * per_block; g < static_cast<int64_t>(j + 1) * per_block; ++g) {
        __m512i w[4];
        for (int c = 0; c < 4; ++c) w[c] = kDirect ? Decode<SB>(packed[c] + g * gbytes_) : _mm512_load_si512(buffer + c * groups_ + g);
        for (int r = 0; r < R; ++r) {
          const __m512i xv = _mm512_loadu_si512(xq[r] + 64 * g);
          for (int c = 0; c < 4; ++c) dots[r][c] = _mm512_dpbusd_epi32(dots[r][c], w[c], xv);
        }
      }
      __m512 ws[4];
      for (int c = 0; c < 4; ++c)
        ws[c] = small > 1 ? _mm512_permutexvar_ps(lane_block, _mm512_maskz_loadu_ps(small_mask, scales[c] + j * small))
                          : _mm512_set1_ps(scales[c][j]);
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(sx[r][j]);
        for (int c = 0; c < 4; ++c)
          acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r][c]), _mm512_mul_ps(ws[c], s), acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
  }

  int bits_, sb_, block_, xb_;
  int64_t Kp_ = 0, groups_ = 0, sblocks_ = 0;
  int gbytes_ = 0;
  std::vector<uint8_t> codes_;   // [N, groups, gbytes]
  std::vector<float> scales_;    // [N, sblocks], zero past the last block
  std::vector<float> offsets_;   // [N, sblocks]: −zero point · scale, only when zero points differ
  float zero_point_ = 0.f;       // the common zero point otherwise
};

}  // namespace

std::unique_ptr<Weight> MakeInt8Weight(const WeightSpec& spec) { return std::make_unique<Int8Weight>(spec); }

}  // namespace lrq

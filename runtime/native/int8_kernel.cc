// Int8Weight: block-quantized codes times int8-quantized activations with AVX-512 VNNI.
//
// Activations: each row of X is quantized to int8 per weight block of K, x ≈ sx · xq (as
// MatMulNBits does at accuracy_level 4). For a block b of column n,
//   Σ_k x_k (c_k − z) s ≈ s · sx · (Σ_k xq_k c_k − z Σ_k xq_k),
// so the result is exactly the product of x̂ with the dequantized weight.
// Layout, prepacked once: one int32 lane per output column. A panel is 16 columns; a "quad" is 4
// consecutive k. The 64 codes of one (panel, quad) decode into one 512-bit register, byte 4j + i
// = code (k = 4q + i, column j), so one vpdpbusd against the 4 activations of the quad broadcast
// to every lane does 64 products for 16 columns, and a block's int32 lanes are already the 16
// columns' sums: scales, zero points and the float accumulation run once per block and panel,
// and no horizontal sums are needed. Packed widths (decoded with a few shifts and masks):
//   2-bit: 16 bytes, byte j holds codes j, 16+j, 32+j, 48+j (two bits each, low first):
//          broadcast to four 128-bit lanes, shift lane i right by 2i, mask;
//   3-bit: the 2-bit layout of the low two bits, then a 64-bit mask of the third bits (one masked
//          add of 4);
//   4-bit: 32 bytes, byte j holds code j (low nibble) and code 32+j (high nibble);
//   5..8-bit: one byte per code.
// A tile of 4 panels (64 columns) is stored quad after quad, so a tile is one sequential stream.
// Batch ≤ 2 decodes codes straight into registers; larger batches decode ~256 values of K of a
// tile into an L1-resident buffer and sweep every pair of rows over it.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

#define LRQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
// register-resident accumulators need the small constant loops fully unrolled
#define LRQ_UNROLL _Pragma("GCC unroll 8")

namespace lrq {

bool Int8Supported(int bits, int block) {
  return Available() == Isa::kAvx512 && bits >= 2 && bits <= 8 && block >= 4 && block % 4 == 0;
}

namespace {

constexpr int kPanel = 16;      // columns per panel: one int32 lane each
constexpr int kTile = 4;        // panels per tile
constexpr int kChunk = 256;     // values of K decoded at a time for large batches

int StoredBits(int bits) { return bits <= 4 ? bits : 8; }

// 64 codes (one panel and quad) into the layout Decode<SB> reads; 8 · SB bytes.
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

// Rows of X quantized to int8 per weight block: q[M, Kp], sx[M, blocks], qs[M, blocks] = Σ xq.
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> sx;
  std::vector<int32_t> qs;
};

LRQ_AVX512 void QuantizeRow(const float* x, int64_t K, int block, int64_t blocks, int8_t* q, float* sx, int32_t* qs) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * block, len = std::min<int64_t>(block, K - k0);
    auto mask_at = [len](int64_t k) -> __mmask16 {
      return k + 16 <= len ? 0xffff : k < len ? static_cast<__mmask16>((1u << (len - k)) - 1) : 0;
    };
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < len; k += 16)
      amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask_at(k), x + k0 + k)));
    const float top = _mm512_reduce_max_ps(amax);
    sx[b] = top / 127.f;
    const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < block; k += 16) {  // blocks are multiples of 4: the tail store is masked
      const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask_at(k), x + k0 + k), inv));
      sum = _mm512_add_epi32(sum, i);
      const __mmask16 keep = k + 16 <= block ? 0xffff : static_cast<__mmask16>((1u << (block - k)) - 1);
      _mm512_mask_cvtsepi32_storeu_epi8(q + k0 + k, keep, i);  // round to nearest even above
    }
    qs[b] = _mm512_reduce_add_epi32(sum);
  }
}

class Int8Weight final : public Weight {
 public:
  explicit Int8Weight(const WeightSpec& s) : bits_(s.bits), sb_(StoredBits(s.bits)), block_(s.block) {
    K_ = s.K;
    N_ = s.N;
    blocks_ = s.blocks();
    Kp_ = static_cast<int64_t>(blocks_) * block_;
    quads_ = Kp_ / 4;
    panels_ = (N_ + kPanel - 1) / kPanel;
    tiles_ = (panels_ + kTile - 1) / kTile;
    gbytes_ = 8 * sb_;
    half_scales_ = !s.half_scales.empty();
    zero_point_ = s.zero_points.empty() ? 1 << (bits_ - 1) : s.zero_points[0];
    bool uniform = true;
    for (uint8_t z : s.zero_points) uniform = uniform && z == s.zero_points[0];
    const int blob = s.blob();
    // codes of column n, all of K, one byte each (padding: code 0 meets activation 0)
    std::vector<uint8_t> columns(static_cast<size_t>(panels_) * kPanel * Kp_, 0);
    for (int64_t n = 0; n < N_; ++n)
      for (int b = 0; b < blocks_; ++b) {
        const uint8_t* src = s.codes + (static_cast<size_t>(n) * blocks_ + b) * blob;
        const int64_t k0 = static_cast<int64_t>(b) * block_;
        const int count = static_cast<int>(std::min<int64_t>(block_, K_ - k0));
        for (int i = 0; i < count; ++i) columns[n * Kp_ + k0 + i] = static_cast<uint8_t>(CodeAt(src, bits_, i));
      }
    codes_.assign(static_cast<size_t>(tiles_) * quads_ * kTile * gbytes_, 0);
    const size_t cells = static_cast<size_t>(tiles_) * blocks_ * kTile * kPanel;  // [tile, block, panel, 16]
    half_scales_ ? half_.assign(cells, 0) : scales_.assign(cells, 0.f);
    if (!uniform) zero_points_.assign(cells, 0);
    uint8_t group[64];
    for (int64_t t = 0; t < tiles_; ++t) {
      const int np = Panels(t);
      for (int64_t q = 0; q < quads_; ++q)
        for (int p = 0; p < np; ++p) {
          const int64_t n0 = (t * kTile + p) * kPanel;
          for (int j = 0; j < kPanel; ++j)
            for (int i = 0; i < 4; ++i) group[4 * j + i] = columns[(n0 + j) * Kp_ + 4 * q + i];
          PackGroup(group, sb_, codes_.data() + CodeOffset(t, q, p));
        }
      for (int b = 0; b < blocks_; ++b)
        for (int p = 0; p < np; ++p)
          for (int j = 0; j < kPanel; ++j) {
            const int64_t n = (t * kTile + p) * kPanel + j;
            if (n >= N_) continue;
            const size_t from = static_cast<size_t>(n) * blocks_ + b, to = ScaleOffset(t, b, p) + j;
            half_scales_ ? void(half_[to] = s.half_scales[from]) : void(scales_[to] = s.scales[from]);
            if (!uniform) zero_points_[to] = s.zero_points[from];
          }
    }
  }

  void Multiply(const float* x, int64_t M, float* y, bool accumulate, const float* bias,
                const Parallel& parallel) const override {
    Activations a;
    a.q.resize(static_cast<size_t>(M) * Kp_);
    a.sx.resize(static_cast<size_t>(M) * blocks_);
    a.qs.resize(static_cast<size_t>(M) * blocks_);
    for (int64_t m = 0; m < M; ++m)
      QuantizeRow(x + m * K_, K_, block_, blocks_, a.q.data() + m * Kp_, a.sx.data() + m * blocks_,
                  a.qs.data() + m * blocks_);
    Job job{this, &a, y, M, accumulate, bias};
    parallel.For(&Int8Weight::Task, static_cast<size_t>(tiles_), &job);
  }

 private:
  struct Job {
    const Int8Weight* w;
    const Activations* a;
    float* y;
    int64_t M;
    bool accumulate;
    const float* bias;
  };

  // Where tile t's panels start; the last tile may hold fewer than kTile panels.
  int Panels(int64_t t) const { return static_cast<int>(std::min<int64_t>(kTile, panels_ - t * kTile)); }
  size_t CodeOffset(int64_t t, int64_t q, int p) const {
    return (static_cast<size_t>(t) * quads_ * kTile + static_cast<size_t>(q) * Panels(t) + p) * gbytes_;
  }
  size_t ScaleOffset(int64_t t, int64_t b, int p) const {
    return (static_cast<size_t>(t) * blocks_ * kTile + static_cast<size_t>(b) * Panels(t) + p) * kPanel;
  }

  static void Task(void* data, size_t tile) {
    const Job& job = *static_cast<const Job*>(data);
    switch (job.w->sb_) {
      case 2: job.w->Tile<2>(job, static_cast<int64_t>(tile)); break;
      case 3: job.w->Tile<3>(job, static_cast<int64_t>(tile)); break;
      case 4: job.w->Tile<4>(job, static_cast<int64_t>(tile)); break;
      default: job.w->Tile<8>(job, static_cast<int64_t>(tile)); break;
    }
  }

  // Everything a micro-kernel call needs about its rows and blocks.
  struct Span {
    int64_t m0;              // first row
    int64_t b0, b1;          // blocks [b0, b1)
    const uint8_t* codes;    // the tile's packed codes (read when decoding straight into registers)
    const __m512i* buffer;   // decoded codes of blocks [b0, b1): [quad − first quad of b0, panel]
  };

  template <int SB>
  LRQ_AVX512 void Tile(const Job& job, int64_t t) const {
    const int np = Panels(t);
    const int64_t n0 = t * kTile * kPanel;
    const uint8_t* codes = codes_.data() + CodeOffset(t, 0, 0);
    std::vector<float> acc(static_cast<size_t>(job.M) * kTile * kPanel, 0.f);  // [M, np · 16]
    if (job.M <= 2) {  // small batches: decode straight into registers
      Rows<SB, true>(np, t, Span{0, 0, blocks_, codes, nullptr}, job, acc.data());
    } else {
      const int chunk_blocks = std::max(1, kChunk / block_);
      const int64_t chunk_quads = static_cast<int64_t>(chunk_blocks) * block_ / 4;
      std::vector<uint8_t> storage(64 * (chunk_quads * np + 1));
      __m512i* buffer = reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
      for (int64_t b0 = 0; b0 < blocks_; b0 += chunk_blocks) {
        const int64_t b1 = std::min<int64_t>(blocks_, b0 + chunk_blocks);
        const int64_t q0 = b0 * block_ / 4, q1 = b1 * block_ / 4;
        for (int64_t q = q0; q < q1; ++q)
          for (int p = 0; p < np; ++p)
            _mm512_store_si512(buffer + (q - q0) * np + p, Decode<SB>(codes + ((q * np) + p) * gbytes_));
        Rows<SB, false>(np, t, Span{0, b0, b1, codes, buffer}, job, acc.data());
      }
    }
    // acc → y (columns past N masked off), with bias and accumulation
    for (int64_t m = 0; m < job.M; ++m)
      for (int p = 0; p < np; ++p) {
        const int64_t n = n0 + p * kPanel;
        const __mmask16 mask = n + kPanel <= N_ ? 0xffff : static_cast<__mmask16>((1u << (N_ - n)) - 1);
        __m512 v = _mm512_loadu_ps(acc.data() + (m * kTile + p) * kPanel);
        if (job.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, job.bias + n));
        float* dst = job.y + m * N_ + n;
        if (job.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
        _mm512_mask_storeu_ps(dst, mask, v);
      }
  }

  // Every pair of rows over blocks [span.b0, span.b1), adding into acc[M, kTile · 16].
  template <int SB, bool kDirect>
  LRQ_AVX512 void Rows(int np, int64_t t, Span span, const Job& job, float* acc) const {
    for (int64_t m0 = 0; m0 < job.M; m0 += 2) {
      span.m0 = m0;
      const bool pair = m0 + 1 < job.M;
      if (np == kTile) {
        pair ? Micro<SB, 2, kTile, kDirect>(np, t, 0, span, *job.a, acc) : Micro<SB, 1, kTile, kDirect>(np, t, 0, span, *job.a, acc);
      } else {
        for (int p = 0; p < np; ++p)
          pair ? Micro<SB, 2, 1, kDirect>(np, t, p, span, *job.a, acc) : Micro<SB, 1, 1, kDirect>(np, t, p, span, *job.a, acc);
      }
    }
  }

  // acc[m0 + r, (p0 + p) · 16 + j] += Σ over blocks [b0, b1) of x̂ · dequant(W) for column j of panel p0 + p.
  template <int SB, int R, int P, bool kDirect>
  LRQ_AVX512 void Micro(int np, int64_t t, int p0, const Span& span, const Activations& a, float* acc) const {
    const int quads_per_block = block_ / 4;
    const size_t quad_stride = static_cast<size_t>(np) * gbytes_;
    const uint8_t* codes = span.codes + p0 * gbytes_;
    const int8_t* xq[R];
    const float* sx[R];
    const int32_t* qs[R];
    LRQ_UNROLL
    for (int r = 0; r < R; ++r) {
      xq[r] = a.q.data() + (span.m0 + r) * Kp_;
      sx[r] = a.sx.data() + (span.m0 + r) * blocks_;
      qs[r] = a.qs.data() + (span.m0 + r) * blocks_;
    }
    __m512 sums[R][P];
    LRQ_UNROLL
    for (int r = 0; r < R; ++r)
      LRQ_UNROLL
      for (int p = 0; p < P; ++p) sums[r][p] = _mm512_setzero_ps();
    const int64_t q_base = span.b0 * quads_per_block;
    for (int64_t b = span.b0; b < span.b1; ++b) {
      __m512i dots[R][P];
      LRQ_UNROLL
      for (int r = 0; r < R; ++r)
        LRQ_UNROLL
        for (int p = 0; p < P; ++p) dots[r][p] = _mm512_setzero_si512();
      for (int64_t q = b * quads_per_block; q < (b + 1) * quads_per_block; ++q) {
        __m512i w[P];
        if constexpr (kDirect) {
          const uint8_t* at = codes + q * quad_stride;
          LRQ_UNROLL
          for (int o = 0; o < P * 8 * SB; o += 64)
            _mm_prefetch(reinterpret_cast<const char*>(at + 24 * quad_stride + o), _MM_HINT_T0);
          LRQ_UNROLL
          for (int p = 0; p < P; ++p) w[p] = Decode<SB>(at + p * gbytes_);
        } else {
          LRQ_UNROLL
          for (int p = 0; p < P; ++p) w[p] = _mm512_load_si512(span.buffer + (q - q_base) * np + p0 + p);
        }
        LRQ_UNROLL
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, xq[r] + 4 * q, 4);
          const __m512i xv = _mm512_set1_epi32(four);
          LRQ_UNROLL
          for (int p = 0; p < P; ++p) dots[r][p] = _mm512_dpbusd_epi32(dots[r][p], w[p], xv);
        }
      }
      const size_t at = ScaleOffset(t, b, p0);
      LRQ_UNROLL
      for (int p = 0; p < P; ++p) {
        const __m512 ws = half_scales_
            ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(half_.data() + at + p * kPanel)))
            : _mm512_loadu_ps(scales_.data() + at + p * kPanel);
        const __m512i zp = zero_points_.empty()
            ? _mm512_set1_epi32(zero_point_)
            : _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero_points_.data() + at + p * kPanel)));
        LRQ_UNROLL
        for (int r = 0; r < R; ++r) {
          const __m512i centred = _mm512_sub_epi32(dots[r][p], _mm512_mullo_epi32(zp, _mm512_set1_epi32(qs[r][b])));
          sums[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(ws, _mm512_set1_ps(sx[r][b])), sums[r][p]);
        }
      }
    }
    LRQ_UNROLL
    for (int r = 0; r < R; ++r)
      LRQ_UNROLL
      for (int p = 0; p < P; ++p) {
        float* dst = acc + ((span.m0 + r) * kTile + p0 + p) * kPanel;
        _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), sums[r][p]));
      }
  }

  int bits_, sb_, block_;
  int blocks_ = 0;
  int64_t Kp_ = 0, quads_ = 0, panels_ = 0, tiles_ = 0;
  int gbytes_ = 0;
  std::vector<uint8_t> codes_;        // [tile, quad, panel, gbytes]: one sequential stream per tile
  std::vector<float> scales_;         // [tile, block, panel, 16] (float32 scales)
  std::vector<uint16_t> half_;        // the same as float16, when the model stores float16 scales
  bool half_scales_ = false;
  std::vector<uint8_t> zero_points_;  // [tile, block, panel, 16], only when zero points differ
  int zero_point_ = 0;                // the common zero point otherwise
};

}  // namespace

std::unique_ptr<Weight> MakeInt8Weight(const WeightSpec& spec) { return std::make_unique<Int8Weight>(spec); }

}  // namespace lrq

// Int8Weight: a block-quantized weight prepacked for the int8-activation kernels (int8_layout.h),
// multiplied by the widest kernel this CPU runs: AVX-512 VNNI (int8_avx512.cc) or AVX2
// (int8_avx2.cc, codes up to 4 bits).
//
// Activations: each row of X is quantized to int8 per weight block of K on each call, x ≈ sx · xq
// (as MatMulNBits does at accuracy_level 4). For a block b of column n,
//   Σ_k x_k (c_k − z) s ≈ s · sx · (Σ_k xq_k c_k − z Σ_k xq_k),
// so the result is exactly the product of x̂ with the dequantized weight.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "int8_layout.h"
#include "kernels.h"

namespace lrq {

namespace {

const Int8Kernels* KernelsFor(int bits) {
  const Isa isa = Available();
  if (isa == Isa::kAvx512) return &Avx512Int8Kernels();
  if (isa == Isa::kAvx2 && bits <= Avx2Int8Kernels().max_bits) return &Avx2Int8Kernels();
  return nullptr;
}

// The packed width of `bits`-bit codes. 3-bit codes are held as 4-bit ones where only AVX2 runs:
// without AVX-512's byte masks their third bits cost more to spread than the extra bytes cost to
// read (measured at one row, 640 x 2048: 91 us as 3-bit, 62 us as 4-bit; onnxruntime's 4-bit
// MatMulNBits 60 us). The file keeps 3 bits; the session holds 4.
int StoredBits(int bits) {
  if (bits == 3 && Available() != Isa::kAvx512) return 4;
  return bits <= 4 ? bits : 8;
}

// 64 codes (one panel and quad, byte 4j + i = code (4q + i, column j)) into the packed layout.
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

Int8Layout Pack(const WeightSpec& s) {
  Int8Layout w;
  w.K = s.K;
  w.N = s.N;
  w.block = s.block;
  w.blocks = s.blocks();
  w.Kp = static_cast<int64_t>(w.blocks) * w.block;
  w.quads = w.Kp / 4;
  w.panels = (w.N + kPanel - 1) / kPanel;
  w.tiles = (w.panels + kTile - 1) / kTile;
  w.sb = StoredBits(s.bits);
  w.gbytes = 8 * w.sb;
  w.half_scales = !s.half_scales.empty();
  w.zero_point = s.zero_points.empty() ? 1 << (s.bits - 1) : s.zero_points[0];
  const bool uniform = std::all_of(s.zero_points.begin(), s.zero_points.end(),
                                   [&](uint8_t z) { return z == s.zero_points[0]; });
  const int blob = s.blob();
  // one tile's codes, column by column, all of K, one byte each (padding: code 0 meets activation
  // 0); a tile at a time, so the unpacked bytes never exceed 64 columns' (a 262144-word lm_head
  // would need K·N of them)
  std::vector<uint8_t> columns(static_cast<size_t>(kTile) * kPanel * w.Kp);
  w.codes.assign(static_cast<size_t>(w.tiles) * w.quads * kTile * w.gbytes, 0);
  const size_t cells = static_cast<size_t>(w.tiles) * w.blocks * kTile * kPanel;  // [tile, block, panel, 16]
  w.half_scales ? w.half.assign(cells, 0) : w.scales.assign(cells, 0.f);
  if (!uniform) w.zero_points.assign(cells, 0);
  uint8_t group[64];
  for (int64_t t = 0; t < w.tiles; ++t) {
    const int np = w.Panels(t);
    const int64_t first = t * kTile * kPanel;
    std::fill(columns.begin(), columns.end(), 0);
    for (int64_t n = first; n < std::min<int64_t>(w.N, first + kTile * kPanel); ++n)
      for (int b = 0; b < w.blocks; ++b) {
        const uint8_t* src = s.codes + (static_cast<size_t>(n) * w.blocks + b) * blob;
        const int64_t k0 = static_cast<int64_t>(b) * w.block;
        const int count = static_cast<int>(std::min<int64_t>(w.block, w.K - k0));
        uint8_t* column = columns.data() + (n - first) * w.Kp + k0;
        for (int i = 0; i < count; ++i) column[i] = static_cast<uint8_t>(CodeAt(src, s.bits, i));
      }
    for (int64_t q = 0; q < w.quads; ++q)
      for (int p = 0; p < np; ++p) {
        const int64_t n0 = p * kPanel;  // within the tile
        for (int j = 0; j < kPanel; ++j)
          for (int i = 0; i < 4; ++i) group[4 * j + i] = columns[(n0 + j) * w.Kp + 4 * q + i];
        PackGroup(group, w.sb, w.codes.data() + w.CodeOffset(t, q, p));
      }
    for (int b = 0; b < w.blocks; ++b)
      for (int p = 0; p < np; ++p)
        for (int j = 0; j < kPanel; ++j) {
          const int64_t n = (t * kTile + p) * kPanel + j;
          if (n >= w.N) continue;
          const size_t from = static_cast<size_t>(n) * w.blocks + b, to = w.ScaleOffset(t, b, p) + j;
          w.half_scales ? void(w.half[to] = s.half_scales[from]) : void(w.scales[to] = s.scales[from]);
          if (!uniform) w.zero_points[to] = s.zero_points[from];
        }
  }
  return w;
}

class Int8Weight final : public Weight {
 public:
  Int8Weight(const WeightSpec& spec, const Int8Kernels& kernels) : w_(Pack(spec)), kernels_(kernels) {
    K_ = spec.K;
    N_ = spec.N;
  }

  void Multiply(const float* x, int64_t M, float* y, bool accumulate, const float* bias,
                const Parallel& parallel) const override {
    Int8Activations a;
    a.q.resize(static_cast<size_t>(M) * w_.Kp);
    a.sx.resize(static_cast<size_t>(M) * w_.blocks);
    a.qs.resize(static_cast<size_t>(M) * w_.blocks);
    for (int64_t m = 0; m < M; ++m)
      kernels_.quantize_row(x + m * K_, K_, w_.block, w_.blocks, a.q.data() + m * w_.Kp, a.sx.data() + m * w_.blocks,
                            a.qs.data() + m * w_.blocks);
    Job job{Int8Call{&w_, &a, y, M, accumulate, bias}, &kernels_};
    parallel.For(&Int8Weight::Task, static_cast<size_t>(w_.tiles), &job);
  }

 private:
  struct Job {
    Int8Call call;
    const Int8Kernels* kernels;
  };

  static void Task(void* data, size_t tile) {
    const Job& job = *static_cast<const Job*>(data);
    job.kernels->tile(job.call, static_cast<int64_t>(tile));
  }

  Int8Layout w_;
  const Int8Kernels& kernels_;
};

}  // namespace

void QuantizeRowPortable(const float* x, int64_t K, int block, int64_t blocks, int8_t* q, float* sx, int32_t* qs) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * block, len = std::min<int64_t>(block, K - k0);
    float top = 0.f;
    for (int64_t k = 0; k < len; ++k) top = std::max(top, std::fabs(x[k0 + k]));
    sx[b] = top / 127.f;
    const float inv = top > 0.f ? 127.f / top : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < block; ++k) {
      const int32_t v = k < len ? static_cast<int32_t>(std::nearbyint(x[k0 + k] * inv)) : 0;  // ties to even
      q[k0 + k] = static_cast<int8_t>(v);
      sum += v;
    }
    qs[b] = sum;
  }
}

// The int8 kernels (int8_simd.h) sum Σ xq·c over one block in int32 lanes and subtract z·Σ xq once
// per block. Activations are rounded to int8 within ±127 and codes and zero points are in 0..255,
// so Σ xq·c, z·Σ xq and their difference Σ xq·(c − z) are each at most 127·255·block = 32385·block
// in magnitude. The difference must fit in int32 (the lanes wrap, so it comes out right when it
// does): block ≤ (2^31 − 1) / 32385 = 66311. We allow 32768, where even |Σ xq·c| + |z·Σ xq| ≤
// 2·32385·32768 = 2,122,383,360 < 2^31 − 1, so nothing wraps at all. (The AVX2 kernel's int16 pair
// sums are bounded by the code width, not the block: 2·127·15.) Longer blocks (per-channel weights,
// block_size = K) take the float kernel.
constexpr int kInt8MaxBlock = 32768;

bool Int8Supported(int bits, int block) {
  return bits >= 2 && bits <= 8 && block >= 4 && block % 4 == 0 && block <= kInt8MaxBlock &&
         KernelsFor(bits) != nullptr;
}

std::unique_ptr<Weight> MakeInt8Weight(const WeightSpec& spec) {
  return std::make_unique<Int8Weight>(spec, *KernelsFor(spec.bits));
}

}  // namespace lrq

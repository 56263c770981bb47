// The prepacked form of a block-quantized weight for the int8-activation kernels, and the
// per-instruction-set kernels that multiply by it (int8_avx512.cc, int8_avx2.cc).
//
// Layout (built once, int8_kernel.cc): one int32 lane per output column. A panel is 16 columns; a
// "quad" is 4 consecutive values of K. The 64 codes of one (panel, quad) decode into 64 bytes,
// byte 4j + i = code (k = 4q + i, column j), so one multiply-add of those bytes against the quad's
// 4 int8 activations broadcast to every lane gives 16 columns' partial sums at once, and a block's
// int32 lanes are already the 16 columns' sums: scales and zero points are applied once per block
// and panel, and no horizontal sums are needed. Packed widths (decoded with a few shifts and masks):
//   2-bit: 16 bytes, byte j holds codes j, 16+j, 32+j, 48+j (two bits each, low first);
//   3-bit: the 2-bit layout of the low two bits, then a 64-bit mask of the third bits;
//   4-bit: 32 bytes, byte j holds code j (low nibble) and code 32+j (high nibble);
//   5..8-bit: one byte per code.
// A tile of 4 panels (64 columns) is stored quad after quad: one sequential stream per tile.
#pragma once

#include <cstdint>
#include <vector>

namespace lrq {

constexpr int kPanel = 16;   // columns per panel: one int32 lane each
constexpr int kTile = 4;     // panels per tile
constexpr int kChunk = 256;  // values of K decoded at a time for large batches
constexpr int kRowBlock = 64;  // rows of X whose sums a tile task keeps at a time

struct Int8Layout {
  int64_t K = 0, N = 0, Kp = 0, quads = 0, panels = 0, tiles = 0;
  int block = 0, blocks = 0, sb = 0, gbytes = 0;  // sb: stored bits (2, 3, 4 or 8)
  std::vector<uint8_t> codes;        // [tile, quad, panel, gbytes]
  std::vector<float> scales;         // [tile, block, panel, 16] (float32 scales)
  std::vector<uint16_t> half;        // the same as float16, when the model stores float16 scales
  bool half_scales = false;
  std::vector<uint8_t> zero_points;  // [tile, block, panel, 16], only when zero points differ
  int zero_point = 0;                // the common zero point otherwise

  // the last tile may hold fewer than kTile panels
  int Panels(int64_t t) const { return static_cast<int>(panels - t * kTile < kTile ? panels - t * kTile : kTile); }
  size_t CodeOffset(int64_t t, int64_t q, int p) const {
    return (static_cast<size_t>(t) * quads * kTile + static_cast<size_t>(q) * Panels(t) + p) * gbytes;
  }
  size_t ScaleOffset(int64_t t, int64_t b, int p) const {
    return (static_cast<size_t>(t) * blocks * kTile + static_cast<size_t>(b) * Panels(t) + p) * kPanel;
  }
};

// Rows of X quantized to int8 per weight block: q[M, Kp], sx[M, blocks] (x ≈ sx · q),
// qs[M, blocks] = Σ q over the block (for the zero points).
struct Int8Activations {
  std::vector<int8_t> q;
  std::vector<float> sx;
  std::vector<int32_t> qs;
};

struct Int8Call {
  const Int8Layout* w;
  const Int8Activations* a;
  float* y;
  int64_t M;
  bool accumulate;
  const float* bias;
};

struct Int8Kernels {
  void (*quantize_row)(const float* x, int64_t K, int block, int64_t blocks, int8_t* q, float* sx, int32_t* qs);
  void (*tile)(const Int8Call& call, int64_t t);  // y[:, 64 columns of tile t]
  int max_bits;                                    // widest codes the kernel multiplies exactly
};

const Int8Kernels& Avx512Int8Kernels();  // vpdpbusd: 64 byte products per instruction
const Int8Kernels& Avx2Int8Kernels();    // vpmaddubsw + vpmaddwd: codes up to 4 bits (int16 pair sums)

// Portable: round to nearest even, as the vector conversions do.
void QuantizeRowPortable(const float* x, int64_t K, int block, int64_t blocks, int8_t* q, float* sx, int32_t* qs);

}  // namespace lrq

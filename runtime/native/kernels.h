// Block-quantized weights prepacked for lrqgraph's kernels, and the products they compute.
//
// A weight W[K, N] arrives like MatMulNBits stores it: codes[N, blocks, blob] (column n of W, its
// codes along K packed low bits first at `bits` 2..8), scales[N, blocks], optional zero points
// [N, blocks] (absent: 2^(bits-1)). A code c stands for (c - zero point) · scale.
//
// Kernels, chosen per weight at kernel creation:
//  - Int8Weight (int8_kernel.cc; block sizes that are multiples of 4; AVX-512 VNNI, or AVX2 for
//    codes up to 4 bits): activations are quantized to int8 per block of K on each call (as
//    MatMulNBits does at accuracy_level 4) and codes, repacked one int32 lane per output column,
//    are multiplied as bytes (int8_layout.h).
//  - FloatWeight (any CPU, any block size): the codes onnxruntime holds are decoded to float32 in
//    L1-sized chunks and multiplied in float (AVX2+FMA when the CPU has it, portable code otherwise).
//  - CodebookWeight (codebook_kernel.cc): Kashin and k-means codebooks.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace lrq {

// Runs fn(task) for task in [0, count), possibly in parallel (onnxruntime's thread pool).
struct Parallel {
  virtual void For(void (*fn)(void*, size_t), size_t count, void* data) const = 0;
  virtual ~Parallel() = default;
};

struct WeightSpec {
  int64_t K = 0, N = 0;
  int bits = 0, block = 0;
  const uint8_t* codes = nullptr;  // [N, blocks, blob], blob = ceil(block * bits / 8); outlives the Weight
  std::vector<float> scales;       // [N, blocks]
  std::vector<uint16_t> half_scales;  // the same as given, when the model stores float16 scales
  std::vector<uint8_t> zero_points;  // [N, blocks] or empty
  int blocks() const { return static_cast<int>((K + block - 1) / block); }
  int blob() const { return (block * bits + 7) / 8; }
};

class Weight {
 public:
  virtual ~Weight() = default;
  // y[M, N] (=|+=) x[M, K] · W (+ bias[N] when given).
  virtual void Multiply(const float* x, int64_t M, float* y, bool accumulate, const float* bias,
                        const Parallel& parallel) const = 0;
  int64_t K() const { return K_; }
  int64_t N() const { return N_; }
  // Whether Multiply reads spec.codes (the initializer onnxruntime holds) rather than a copy the
  // kernel made: only then must the initializer's pages stay resident.
  virtual bool ReadsStoredCodes() const { return false; }

 protected:
  int64_t K_ = 0, N_ = 0;
};

// The instruction sets kernels may use: what the CPU has, capped by $LRQGRAPH_KERNELS ("avx2":
// no AVX-512, "portable": plain C++), read when a kernel is created (tests run every path).
enum class Isa { kPortable, kAvx2, kAvx512 };
Isa Available();

// The fastest kernel this CPU has for the weight; int8_activations=false forces float compute.
std::unique_ptr<Weight> MakeWeight(const WeightSpec& spec, bool int8_activations);

// Used by MakeWeight; exposed for tests of one path.
bool Int8Supported(int bits, int block);
std::unique_ptr<Weight> MakeInt8Weight(const WeightSpec& spec);
std::unique_ptr<Weight> MakeFloatWeight(const WeightSpec& spec);

// The randomized Hadamard transform of one axis (lrqgraph.numerics.transforms, kind "hadamard"):
// n = power · odd; Forward(x) = x · diag(signs) · (I ⊗ small) · (H_power/√power ⊗ I), in place.
struct Transform {
  int64_t n = 0, power = 1, odd = 1;  // n = 0: no transform
  std::vector<float> signs;           // [n]
  std::vector<float> small;           // [odd, odd] row-major, empty when odd = 1
  void Forward(float* x) const;
  void Inverse(float* x) const;

 private:
  void MultiplySmall(float* x, bool transpose) const;
  void Walsh(float* x) const;
};

struct CodebookSpec {
  int64_t K = 0, N = 0;
  int bits = 0;
  const uint8_t* codes = nullptr;  // [N, ceil(K · bits / 8)]: column n's codes along K, low bits first
  std::vector<float> u, v;         // centroids [2^bits] of U and of V (v empty: W = U)
  Transform rows, cols;            // F1 over K and F2 over N (unused when v is empty)
};

std::unique_ptr<Weight> MakeCodebookWeight(const CodebookSpec& spec);

float HalfToFloat(uint16_t h);

// Code i of a low-bits-first stream of `bits`-bit codes.
inline uint32_t CodeAt(const uint8_t* src, int bits, int64_t i) {
  const int64_t bit = i * bits, byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t word = src[byte] | (shift + bits > 8 ? static_cast<uint32_t>(src[byte + 1]) << 8 : 0u);
  return (word >> shift) & ((1u << bits) - 1);
}

}  // namespace lrq

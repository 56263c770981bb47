// CUDA kernels for lrqgraph's block-quantized products (the lrq::QMatMul form; lrq::QLowRankMatMul
// is two or three of them), behind a C ABI: lrq_cuda_qmatmul(...) on device pointers and a stream.
//
// Weights use the ops' input layout (runtime/native/lrq_ops.cc): codes[N, blocks, blob] (column
// n along K, low bits first, any width 2..8), scales[N, blocks] float or half, optional zero
// points [N, blocks] uint8 (absent: 2^(bits-1)). Activations stay float32.
// Batches up to kGemvRows: one warp per output column. For 2/4/8-bit codes whose blocks fill whole
// 32-bit words, lane l reads words l, l + 32, ... of the column (a warp's loads coalesce), sums
// code·x and x over the word's 16/8/4 codes, and applies its block's scale and zero point once
// per word; other widths decode code by code. A warp shuffle sums the lanes.
// Larger batches: the weight is dequantized into a float32 scratch matrix (one pass, memory-bound)
// and multiplied by cuBLAS SGEMM.
//
// Build: nvcc -O3 -shared -Xcompiler -fPIC -o liblrq_cuda.so lrq_cuda.cu -lcublas
// Registering these kernels with onnxruntime's CUDA execution provider needs onnxruntime-gpu and
// its provider headers (core/providers/cuda/cuda_context.h), which no machine here has.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kRows = 4;
constexpr int kGemvRows = 16;

__device__ __forceinline__ uint32_t CodeAt(const uint8_t* src, int bits, int64_t i) {
  const int64_t bit = i * bits, byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t word = src[byte];
  if (shift + bits > 8) word |= static_cast<uint32_t>(src[byte + 1]) << 8;
  return (word >> shift) & ((1u << bits) - 1);
}

template <bool kHalf>
__device__ __forceinline__ float ScaleAt(const void* scales, int64_t at) {
  return kHalf ? __half2float(static_cast<const __half*>(scales)[at]) : static_cast<const float*>(scales)[at];
}

// Σ over one word's codes of code · x and of x, for kBits-bit codes (kBits > 0), x 16-byte aligned.
template <int kBits>
__device__ __forceinline__ void WordSums(uint32_t word, const float* __restrict__ x, float& cx, float& sx) {
  constexpr int kPerWord = 32 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1;
#pragma unroll
  for (int j = 0; j < kPerWord / 4; ++j) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(x) + j);
    const uint32_t w = word >> (4 * j * kBits);
    cx += static_cast<float>(w & kMask) * v.x + static_cast<float>((w >> kBits) & kMask) * v.y +
          static_cast<float>((w >> (2 * kBits)) & kMask) * v.z + static_cast<float>((w >> (3 * kBits)) & kMask) * v.w;
    sx += (v.x + v.y) + (v.z + v.w);
  }
}

// kBits 2, 4 or 8: codes read a 32-bit word at a time (blocks holding whole words, K % 4 == 0);
// kBits 0: any width, code by code.
template <bool kHalf, int kBits>
__global__ void QMatMulKernel(const float* __restrict__ x, int64_t M, int64_t K, int64_t N,
                              const uint8_t* __restrict__ codes, int bits, int block, const void* scales_raw,
                              const uint8_t* __restrict__ zero_points, const float* __restrict__ bias,
                              float* __restrict__ y, int accumulate) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;
  const int blocks = static_cast<int>((K + block - 1) / block);
  const int blob = (block * bits + 7) / 8;
  const uint8_t* column = codes + n * blocks * blob;
  const int implicit_zp = 1 << (bits - 1);
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    float acc[kRows] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (kBits > 0) {
      constexpr int kPerWord = 32 / kBits;
      const int words_per_block = blob / 4;
      const int64_t total = static_cast<int64_t>(blocks) * words_per_block;
      const uint32_t* stream = reinterpret_cast<const uint32_t*>(column);
      for (int64_t w = lane; w < total; w += kWarp) {
        const int b = static_cast<int>(w / words_per_block);
        const int64_t k0 = static_cast<int64_t>(b) * block + (w % words_per_block) * kPerWord;
        if (k0 >= K) continue;  // padding of the last block
        const uint32_t word = __ldg(stream + w);
        const int64_t at = n * blocks + b;
        const float scale = ScaleAt<kHalf>(scales_raw, at);
        const float zp = static_cast<float>(zero_points ? zero_points[at] : implicit_zp);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (m0 + r >= M) break;
          const float* xr = x + (m0 + r) * K + k0;
          float cx = 0.f, sx = 0.f;
          if (k0 + kPerWord <= K) {
            WordSums<kBits>(word, xr, cx, sx);
          } else {
            for (int i = 0; k0 + i < K; ++i) {
              cx += static_cast<float>((word >> (i * kBits)) & ((1u << kBits) - 1)) * xr[i];
              sx += xr[i];
            }
          }
          acc[r] += scale * (cx - zp * sx);
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += kWarp) {
        const int b = static_cast<int>(k / block);
        const int64_t at = n * blocks + b;
        const float zp = static_cast<float>(zero_points ? zero_points[at] : implicit_zp);
        const float w = (static_cast<float>(CodeAt(column + b * blob, bits, k - static_cast<int64_t>(b) * block)) - zp) *
                        ScaleAt<kHalf>(scales_raw, at);
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          if (m0 + r < M) acc[r] += w * x[(m0 + r) * K + k];
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = acc[r];
      for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0 && m0 + r < M) {
        float* dst = y + (m0 + r) * N + n;
        const float value = v + (bias ? bias[n] : 0.f);
        *dst = accumulate ? *dst + value : value;
      }
    }
  }
}

template <bool kHalf>
void LaunchGemv(dim3 grid, dim3 threads, cudaStream_t s, const float* x, int64_t M, int64_t K, int64_t N,
                const uint8_t* codes, int bits, int block, const void* scales, const uint8_t* zero_points,
                const float* bias, float* y, int accumulate) {
  // whole 32-bit words of 2/4/8-bit codes, none straddling a block, rows of X 16-byte aligned
  const bool words = (bits == 2 || bits == 4 || bits == 8) && (block * bits) % 32 == 0 && K % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int b = words ? bits : 0;
  if (b == 2)
    QMatMulKernel<kHalf, 2><<<grid, threads, 0, s>>>(x, M, K, N, codes, bits, block, scales, zero_points, bias, y, accumulate);
  else if (b == 4)
    QMatMulKernel<kHalf, 4><<<grid, threads, 0, s>>>(x, M, K, N, codes, bits, block, scales, zero_points, bias, y, accumulate);
  else if (b == 8)
    QMatMulKernel<kHalf, 8><<<grid, threads, 0, s>>>(x, M, K, N, codes, bits, block, scales, zero_points, bias, y, accumulate);
  else
    QMatMulKernel<kHalf, 0><<<grid, threads, 0, s>>>(x, M, K, N, codes, bits, block, scales, zero_points, bias, y, accumulate);
}

// w[K, N] row-major = dequant(W): one thread per entry, consecutive threads along N.
template <bool kHalf>
__global__ void DequantizeKernel(int64_t K, int64_t N, const uint8_t* __restrict__ codes, int bits, int block,
                                 const void* scales_raw, const uint8_t* __restrict__ zero_points, float* __restrict__ w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= K * N) return;
  const int64_t k = i / N, n = i % N;
  const int blocks = static_cast<int>((K + block - 1) / block), blob = (block * bits + 7) / 8;
  const int b = static_cast<int>(k / block);
  const int64_t at = n * blocks + b;
  const float zp = static_cast<float>(zero_points ? zero_points[at] : 1 << (bits - 1));
  const uint32_t c = CodeAt(codes + at * blob, bits, k - static_cast<int64_t>(b) * block);
  w[i] = (static_cast<float>(c) - zp) * ScaleAt<kHalf>(scales_raw, at);
}

// y[m, :] = bias (or 0)
__global__ void FillRowsKernel(int64_t M, int64_t N, const float* __restrict__ bias, float* __restrict__ y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < M * N) y[i] = bias ? bias[i % N] : 0.f;
}

cublasHandle_t Blas() {
  static cublasHandle_t handle = [] {
    cublasHandle_t h = nullptr;
    cublasCreate(&h);
    return h;
  }();
  return handle;
}

}  // namespace

extern "C" {

// y[M, N] (=|+=) x[M, K] · dequant(W) (+ bias). Device pointers; returns a cudaError_t.
__attribute__((visibility("default"))) int lrq_cuda_qmatmul(
    const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* codes, int bits, int block, const void* scales,
    int half_scales, const uint8_t* zero_points, const float* bias, float* y, int accumulate, void* stream) {
  if (bits < 2 || bits > 8 || block < 1 || K < 1 || N < 1 || M < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (M > kGemvRows) {  // dequantize once, then SGEMM: Yᵀ[N, M] = Wᵀ · Xᵀ in cuBLAS' column-major terms
    if (accumulate && bias) return static_cast<int>(cudaErrorInvalidValue);  // SGEMM adds onto y: bias goes first
    float* w = nullptr;
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&w), sizeof(float) * K * N, s);
    if (err) return static_cast<int>(err);
    const unsigned threads = 256, grid = static_cast<unsigned>((K * N + threads - 1) / threads);
    if (half_scales)
      DequantizeKernel<true><<<grid, threads, 0, s>>>(K, N, codes, bits, block, scales, zero_points, w);
    else
      DequantizeKernel<false><<<grid, threads, 0, s>>>(K, N, codes, bits, block, scales, zero_points, w);
    if (!accumulate)
      FillRowsKernel<<<static_cast<unsigned>((M * N + threads - 1) / threads), threads, 0, s>>>(M, N, bias, y);
    const float one = 1.f, beta = 1.f;
    cublasSetStream(Blas(), s);
    const cublasStatus_t status = cublasSgemm(Blas(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
                                              static_cast<int>(K), &one, w, static_cast<int>(N), x, static_cast<int>(K),
                                              &beta, y, static_cast<int>(N));
    cudaFreeAsync(w, s);
    if (status != CUBLAS_STATUS_SUCCESS) return static_cast<int>(cudaErrorUnknown);
    return static_cast<int>(cudaGetLastError());
  }
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock)), threads(kWarp * kWarpsPerBlock);
  if (half_scales)
    LaunchGemv<true>(grid, threads, s, x, M, K, N, codes, bits, block, scales, zero_points, bias, y, accumulate);
  else
    LaunchGemv<false>(grid, threads, s, x, M, K, N, codes, bits, block, scales, zero_points, bias, y, accumulate);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"

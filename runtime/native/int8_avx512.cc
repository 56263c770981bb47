// The int8-activation kernel with AVX-512 VNNI: vpdpbusd multiplies 64 code bytes by 64 activation
// bytes and adds them into 16 int32 lanes in one instruction (int8_layout.h, int8_simd.h).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "int8_layout.h"

#define LRQ_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define LRQ_UNROLL _Pragma("GCC unroll 8")  // register-resident accumulators need the small loops unrolled

namespace lrq {
namespace avx512 {

struct Traits {
  using Codes = __m512i;  // 64 codes, byte 4j + i = code (k = 4q + i, column j)
  using Dots = __m512i;   // 16 int32 column sums
  using Sums = __m512;    // 16 float column sums
  using X = __m512i;      // 4 int8 activations in every lane

  template <int SB>
  LRQ_TARGET static inline Codes Decode(const uint8_t* p) {
    if constexpr (SB == 8) {
      return _mm512_loadu_si512(p);
    } else if constexpr (SB == 4) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
      return _mm512_and_si512(both, _mm512_set1_epi8(0x0f));
    } else {  // broadcast 16 bytes to four 128-bit lanes, shift lane i right by 2i, mask
      const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
      __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi8(3));
      if constexpr (SB == 3) {  // third bits: a byte mask, one masked add of 4
        uint64_t high;
        std::memcpy(&high, p + 16, 8);
        codes = _mm512_mask_add_epi8(codes, _cvtu64_mask64(high), codes, _mm512_set1_epi8(4));
      }
      return codes;
    }
  }
  LRQ_TARGET static inline void Store(Codes* to, Codes c) { _mm512_store_si512(to, c); }
  LRQ_TARGET static inline Codes Load(const Codes* from) { return _mm512_load_si512(from); }
  LRQ_TARGET static inline X Broadcast(int32_t four) { return _mm512_set1_epi32(four); }
  LRQ_TARGET static inline Dots Zero() { return _mm512_setzero_si512(); }
  LRQ_TARGET static inline Dots Dp(Dots acc, Codes c, X x) { return _mm512_dpbusd_epi32(acc, c, x); }
  LRQ_TARGET static inline Sums ZeroSums() { return _mm512_setzero_ps(); }
  LRQ_TARGET static inline Sums Scales(const float* s) { return _mm512_loadu_ps(s); }
  LRQ_TARGET static inline Sums Scales(const uint16_t* s) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  }
  LRQ_TARGET static inline Dots ZeroPoints(const uint8_t* z) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z)));
  }
  LRQ_TARGET static inline Dots ZeroPoint(int z) { return _mm512_set1_epi32(z); }
  // sums += scale · sx · (Σ xq·c − z · Σ xq)
  LRQ_TARGET static inline Sums Update(Sums sums, Dots dots, Dots zp, int32_t qs, Sums ws, float sx) {
    const __m512i centred = _mm512_sub_epi32(dots, _mm512_mullo_epi32(zp, _mm512_set1_epi32(qs)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(ws, _mm512_set1_ps(sx)), sums);
  }
  LRQ_TARGET static inline void AddTo(float* dst, Sums s) { _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), s)); }
};

using T = Traits;
#include "int8_simd.h"

LRQ_TARGET void QuantizeRow(const float* x, int64_t K, int block, int64_t blocks, int8_t* q, float* sx, int32_t* qs) {
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
      _mm512_mask_cvtsepi32_storeu_epi8(q + k0 + k, keep, i);  // rounded to nearest even above
    }
    qs[b] = _mm512_reduce_add_epi32(sum);
  }
}

}  // namespace avx512

const Int8Kernels& Avx512Int8Kernels() {
  static const Int8Kernels kernels{avx512::QuantizeRow, avx512::Tile, 8};
  return kernels;
}

}  // namespace lrq

// The int8-activation kernel with AVX2: 64 codes are two 256-bit halves (columns 0-7 and 8-15);
// vpmaddubsw multiplies code bytes by activation bytes and adds pairs into int16, vpmaddwd adds
// those pairs into int32 lanes. The int16 pair sums stay exact only while codes ≤ 15 (2 · 15 · 127),
// so this kernel takes codes up to 4 bits; wider codes use the float kernel.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "int8_layout.h"

#define LRQ_TARGET __attribute__((target("avx2,fma,f16c")))
#define LRQ_UNROLL _Pragma("GCC unroll 8")

namespace lrq {
namespace avx2 {

struct Pair {
  __m256i lo, hi;  // columns 0-7, 8-15
};
struct FloatPair {
  __m256 lo, hi;
};

struct Traits {
  using Codes = Pair;
  using Dots = Pair;
  using Sums = FloatPair;
  using X = __m256i;

  // Bytes 0-31 of the 64-byte group are columns 0-7, bytes 32-63 columns 8-15 (int8_layout.h).
  template <int SB>
  LRQ_TARGET static inline Codes Decode(const uint8_t* p) {
    if constexpr (SB == 8) {
      return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
    } else if constexpr (SB == 4) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), low = _mm256_set1_epi8(0x0f);
      return {_mm256_and_si256(v, low), _mm256_and_si256(_mm256_srli_epi16(v, 4), low)};
    } else {
      const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256i three = _mm256_set1_epi8(3);
      Codes c{_mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), three),
              _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), three)};
      if constexpr (SB == 3) {  // third bits: spread each mask bit to its byte, add 4 where set
        uint32_t half[2];
        std::memcpy(half, p + 16, 8);
        c.lo = _mm256_add_epi8(c.lo, _mm256_and_si256(Spread(half[0]), _mm256_set1_epi8(4)));
        c.hi = _mm256_add_epi8(c.hi, _mm256_and_si256(Spread(half[1]), _mm256_set1_epi8(4)));
      }
      return c;
    }
  }
  // 32 bits → 32 bytes of 0xff (bit set) or 0
  LRQ_TARGET static inline __m256i Spread(uint32_t bits) {
    const __m256i bytes = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
    return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
  }
  LRQ_TARGET static inline void Store(Codes* to, Codes c) { *to = c; }
  LRQ_TARGET static inline Codes Load(const Codes* from) { return *from; }
  LRQ_TARGET static inline X Broadcast(int32_t four) { return _mm256_set1_epi32(four); }
  LRQ_TARGET static inline Dots Zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  LRQ_TARGET static inline __m256i Dp8(__m256i acc, __m256i c, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1)));
  }
  LRQ_TARGET static inline Dots Dp(Dots acc, Codes c, X x) { return {Dp8(acc.lo, c.lo, x), Dp8(acc.hi, c.hi, x)}; }
  LRQ_TARGET static inline Sums ZeroSums() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  LRQ_TARGET static inline Sums Scales(const float* s) { return {_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8)}; }
  LRQ_TARGET static inline Sums Scales(const uint16_t* s) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 8)))};
  }
  LRQ_TARGET static inline Dots ZeroPoints(const uint8_t* z) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + 8)))};
  }
  LRQ_TARGET static inline Dots ZeroPoint(int z) { return {_mm256_set1_epi32(z), _mm256_set1_epi32(z)}; }
  LRQ_TARGET static inline __m256 Update8(__m256 sums, __m256i dots, __m256i zp, __m256i qs, __m256 scale) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(dots, _mm256_mullo_epi32(zp, qs))), scale, sums);
  }
  LRQ_TARGET static inline Sums Update(Sums sums, Dots dots, Dots zp, int32_t qs, Sums ws, float sx) {
    const __m256i q = _mm256_set1_epi32(qs);
    const __m256 s = _mm256_set1_ps(sx);
    return {Update8(sums.lo, dots.lo, zp.lo, q, _mm256_mul_ps(ws.lo, s)),
            Update8(sums.hi, dots.hi, zp.hi, q, _mm256_mul_ps(ws.hi, s))};
  }
  LRQ_TARGET static inline void AddTo(float* dst, Sums s) {
    _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), s.lo));
    _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), s.hi));
  }
};

using T = Traits;
#include "int8_simd.h"

}  // namespace avx2

const Int8Kernels& Avx2Int8Kernels() {
  static const Int8Kernels kernels{QuantizeRowPortable, avx2::Tile, 4};
  return kernels;
}

}  // namespace lrq

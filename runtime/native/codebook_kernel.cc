// CodebookWeight: W = U + F1·V·F2ᵀ, each entry coded by one index into a codebook of (u, v)
// pairs (Kashin quantization), or W = U alone (k-means, a codebook of scalars).
//
// F1 (K×K) and F2 (N×N) are randomized Hadamard transforms: a vector of length n = 2^a·b is
// multiplied by diag(signs), then by a small orthogonal b×b matrix on the odd part, then by the
// normalized Walsh-Hadamard transform on the power-of-two part (lrqgraph.numerics.transforms).
// Hence X·W = X·U + ((X·F1)·V)·F2ᵀ: X is transformed once per row (O(K log K)), one pass over
// the codes accumulates both X·U and (X·F1)·V, and the result of the second is transformed back
// along N. Codes are prepacked one int32 lane per output column (16-column panels), 4-bit codes
// two k per byte; centroids are looked up with vpermps from registers (≤ 32 entries), once for up
// to 4 rows of X.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

#define LRQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace lrq {

void Transform::Forward(float* x) const {
  if (n == 0) return;
  for (int64_t i = 0; i < n; ++i) x[i] *= signs[i];
  MultiplySmall(x, false);
  Walsh(x);
}

void Transform::Inverse(float* x) const {
  if (n == 0) return;
  Walsh(x);
  MultiplySmall(x, true);
  for (int64_t i = 0; i < n; ++i) x[i] *= signs[i];
}

// Each row of x viewed as [power, odd] times small (or its transpose).
void Transform::MultiplySmall(float* x, bool transpose) const {
  if (odd == 1) return;
  std::vector<float> row(odd);
  for (int64_t p = 0; p < power; ++p) {
    float* v = x + p * odd;
    for (int64_t j = 0; j < odd; ++j) {
      float s = 0.f;
      for (int64_t i = 0; i < odd; ++i) s += v[i] * (transpose ? small[j * odd + i] : small[i * odd + j]);
      row[j] = s;
    }
    std::copy(row.begin(), row.end(), v);
  }
}

// Normalized Walsh-Hadamard transform over the power axis of x viewed as [power, odd].
// Rows j and j + h of [power, odd] for j in [i, i + h) are two contiguous runs of h·odd values, so
// each butterfly stage is a loop over contiguous memory the compiler vectorizes (a loop per row
// would be one value long when odd = 1).
void Transform::Walsh(float* x) const {
  for (int64_t h = 1; h < power; h *= 2) {
    const int64_t run = h * odd;
    for (int64_t i = 0; i < power; i += 2 * h) {
      float* __restrict a = x + i * odd;
      float* __restrict b = a + run;
      for (int64_t t = 0; t < run; ++t) {
        const float u = a[t], v = b[t];
        a[t] = u + v;
        b[t] = u - v;
      }
    }
  }
  const float norm = 1.f / std::sqrt(static_cast<float>(power));
  for (int64_t i = 0; i < n; ++i) x[i] *= norm;
}

namespace {

constexpr int kPanel = 16;
constexpr int kTile = 4;
constexpr int kRows = 4;  // rows of X per pass over a panel's codes

class CodebookWeight final : public Weight {
 public:
  explicit CodebookWeight(const CodebookSpec& s)
      : bits_(s.bits), entries_(1 << s.bits), u_(s.u), v_(s.v), rows_(s.rows), cols_(s.cols) {
    K_ = s.K;
    N_ = s.N;
    panels_ = (N_ + kPanel - 1) / kPanel;
    tiles_ = (panels_ + kTile - 1) / kTile;
    u_.resize(std::max(32, entries_), 0.f);  // vector lookups read 32 entries
    if (!v_.empty()) v_.resize(u_.size(), 0.f);
    vector_ = Available() == Isa::kAvx512 && bits_ <= 5;
    wide_ = bits_ > 4;  // one byte per code; two per byte otherwise
    const int64_t steps = wide_ ? K_ : (K_ + 1) / 2;
    codes_.assign(static_cast<size_t>(panels_) * steps * kPanel, 0);
    const int64_t blob = (K_ * bits_ + 7) / 8;
    for (int64_t n = 0; n < N_; ++n) {
      const uint8_t* src = s.codes + n * blob;
      const int64_t panel = n / kPanel, lane = n % kPanel;
      for (int64_t k = 0; k < K_; ++k) {
        const uint32_t c = CodeAt(src, bits_, k);
        uint8_t& dst = codes_[(panel * steps + (wide_ ? k : k / 2)) * kPanel + lane];
        dst = static_cast<uint8_t>(wide_ ? c : dst | (c << (4 * (k % 2))));
      }
    }
  }

  void Multiply(const float* x, int64_t M, float* y, bool accumulate, const float* bias,
                const Parallel& parallel) const override {
    const bool rotated = !v_.empty();
    std::vector<float> xr(rotated ? static_cast<size_t>(M) * K_ : 0);
    for (int64_t m = 0; m < M && rotated; ++m) {
      std::copy(x + m * K_, x + (m + 1) * K_, xr.begin() + m * K_);
      rows_.Forward(xr.data() + m * K_);
    }
    std::vector<float> yu(static_cast<size_t>(M) * N_), z(rotated ? yu.size() : 0);
    Job job{this, x, rotated ? xr.data() : nullptr, M, yu.data(), rotated ? z.data() : nullptr};
    parallel.For(&CodebookWeight::Task, static_cast<size_t>(tiles_), &job);
    for (int64_t m = 0; m < M; ++m) {
      float* zr = rotated ? z.data() + m * N_ : nullptr;
      if (zr) cols_.Inverse(zr);
      for (int64_t n = 0; n < N_; ++n) {
        const float value = yu[m * N_ + n] + (zr ? zr[n] : 0.f) + (bias ? bias[n] : 0.f);
        y[m * N_ + n] = accumulate ? y[m * N_ + n] + value : value;
      }
    }
  }

 private:
  struct Job {
    const CodebookWeight* w;
    const float* x;   // [M, K]
    const float* xr;  // [M, K] = X·F1, or null
    int64_t M;
    float* yu;        // [M, N] = X·U
    float* z;         // [M, N] = (X·F1)·V, or null
  };

  static void Task(void* data, size_t tile) {
    const Job& job = *static_cast<const Job*>(data);
    const CodebookWeight& w = *job.w;
    const int64_t p0 = static_cast<int64_t>(tile) * kTile, p1 = std::min<int64_t>(w.panels_, p0 + kTile);
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m = 0; m < job.M; m += kRows) {  // codes decoded and looked up once per kRows rows
        const int64_t rows = std::min<int64_t>(kRows, job.M - m);
        if (!w.vector_) {
          for (int64_t r = m; r < m + rows; ++r) w.PanelScalar(job, p, r);
        } else if (job.z) {
          rows == kRows ? w.PanelAvx512<true, kRows>(job, p, m) : w.Rows<true>(job, p, m, rows);
        } else {
          rows == kRows ? w.PanelAvx512<false, kRows>(job, p, m) : w.Rows<false>(job, p, m, rows);
        }
      }
  }

  template <bool kRotated>
  void Rows(const Job& job, int64_t panel, int64_t m, int64_t rows) const {
    for (int64_t r = m; r < m + rows; ++r) PanelAvx512<kRotated, 1>(job, panel, r);
  }

  int Code(int64_t panel, int64_t k, int lane) const {
    const int64_t steps = wide_ ? K_ : (K_ + 1) / 2;
    const uint8_t b = codes_[(panel * steps + (wide_ ? k : k / 2)) * kPanel + lane];
    return wide_ ? b : (b >> (4 * (k % 2))) & 15;
  }

  void PanelScalar(const Job& job, int64_t panel, int64_t m) const {
    const float* x = job.x + m * K_;
    for (int lane = 0; lane < kPanel; ++lane) {
      const int64_t n = panel * kPanel + lane;
      if (n >= N_) break;
      float su = 0.f, sv = 0.f;
      for (int64_t k = 0; k < K_; ++k) {
        const int c = Code(panel, k, lane);
        su += x[k] * u_[c];
        if (job.z) sv += job.xr[m * K_ + k] * v_[c];
      }
      job.yu[m * N_ + n] = su;
      if (job.z) job.z[m * N_ + n] = sv;
    }
  }

  // Codebook lookup: 16 indices → 16 centroids, from 32 entries held in two registers.
  LRQ_AVX512 static inline __m512 Lookup(__m512i idx, __m512 lo, __m512 hi) {
    return _mm512_permutex2var_ps(lo, idx, hi);
  }

  // Rows [m, m + R) of one panel: acc_u[r] += x[r, k] · u[code], acc_v[r] += (X·F1)[r, k] · v[code].
  template <bool kRotated, int R>
  LRQ_AVX512 void PanelAvx512(const Job& job, int64_t panel, int64_t m) const {
    const __m512 ulo = _mm512_loadu_ps(u_.data()), uhi = _mm512_loadu_ps(u_.data() + 16);
    const __m512 vlo = kRotated ? _mm512_loadu_ps(v_.data()) : ulo, vhi = kRotated ? _mm512_loadu_ps(v_.data() + 16) : uhi;
    const float* x = job.x + m * K_;
    const float* xr = kRotated ? job.xr + m * K_ : nullptr;
    __m512 su[R], sv[R];
    for (int r = 0; r < R; ++r) su[r] = sv[r] = _mm512_setzero_ps();
    const int64_t steps = wide_ ? K_ : (K_ + 1) / 2;
    const uint8_t* codes = codes_.data() + panel * steps * kPanel;
    const __m512i low = _mm512_set1_epi32(15);
    auto step = [&](int64_t k, __m512 u, __m512 v) LRQ_AVX512 {
      for (int r = 0; r < R; ++r) {
        su[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K_ + k]), u, su[r]);
        if constexpr (kRotated) sv[r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[r * K_ + k]), v, sv[r]);
      }
    };
    for (int64_t s = 0; s < steps; ++s) {
      const __m512i packed = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + s * kPanel)));
      if (wide_) {
        step(s, Lookup(packed, ulo, uhi), kRotated ? Lookup(packed, vlo, vhi) : ulo);
      } else {
        const __m512i first = _mm512_and_si512(packed, low), second = _mm512_srli_epi32(packed, 4);
        step(2 * s, _mm512_permutexvar_ps(first, ulo), kRotated ? _mm512_permutexvar_ps(first, vlo) : ulo);
        if (2 * s + 1 < K_)
          step(2 * s + 1, _mm512_permutexvar_ps(second, ulo), kRotated ? _mm512_permutexvar_ps(second, vlo) : ulo);
      }
    }
    const int64_t n = panel * kPanel;
    const __mmask16 mask = n + kPanel <= N_ ? 0xffff : static_cast<__mmask16>((1u << (N_ - n)) - 1);
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(job.yu + (m + r) * N_ + n, mask, su[r]);
      if constexpr (kRotated) _mm512_mask_storeu_ps(job.z + (m + r) * N_ + n, mask, sv[r]);
    }
  }

  int bits_, entries_;
  std::vector<float> u_, v_;  // centroids (padded to 32); v empty: no rotated part
  Transform rows_, cols_;
  int64_t panels_ = 0, tiles_ = 0;
  bool vector_ = false, wide_ = false;
  std::vector<uint8_t> codes_;  // [panel, k (or k pair), 16 lanes]
};

}  // namespace

std::unique_ptr<Weight> MakeCodebookWeight(const CodebookSpec& spec) { return std::make_unique<CodebookWeight>(spec); }

}  // namespace lrq

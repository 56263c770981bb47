// The int8-activation kernel body, written once over a traits type T that supplies the vector
// operations of one instruction set. Included by int8_avx512.cc and int8_avx2.cc, each with its
// own LRQ_TARGET (the target attribute of every function here) inside its own namespace.
//
// T provides: Codes (64 decoded codes), Dots (16 int32 column sums), Sums (16 float sums),
// Decode<SB>(p), Store/Load(Codes), Broadcast(int32 four activations) -> X, Zero(),
// Dp(Dots, Codes, X), ZeroSums(), Update(Sums, Dots, zero points, Σxq, scales, sx),
// Scales(const float*) / Scales(const uint16_t*), ZeroPoints(const uint8_t*), ZeroPoint(int),
// AddTo(float* 16, Sums).

// Everything a micro-kernel call needs about its rows and blocks.
struct Span {
  int64_t m0;                  // first row
  int64_t b0, b1;              // blocks [b0, b1)
  const uint8_t* codes;        // the tile's packed codes (read when decoding straight into registers)
  const typename T::Codes* buffer;  // decoded codes of blocks [b0, b1): [quad − first quad of b0, panel]
};

// acc[r, (p0 + p) · 16 + j] += Σ over blocks [b0, b1) of x̂[m0 + r] · dequant(W) for column j of panel p0 + p.
template <int SB, int R, int P, bool kDirect>
LRQ_TARGET void Micro(const Int8Layout& w, int np, int64_t t, int p0, const Span& span, const Int8Activations& a,
                      float* acc) {
  const int quads_per_block = w.block / 4;
  const size_t quad_stride = static_cast<size_t>(np) * w.gbytes;
  const uint8_t* codes = span.codes + p0 * w.gbytes;
  const int8_t* xq[R];
  const float* sx[R];
  const int32_t* qs[R];
  LRQ_UNROLL
  for (int r = 0; r < R; ++r) {
    xq[r] = a.q.data() + (span.m0 + r) * w.Kp;
    sx[r] = a.sx.data() + (span.m0 + r) * w.blocks;
    qs[r] = a.qs.data() + (span.m0 + r) * w.blocks;
  }
  typename T::Sums sums[R][P];
  LRQ_UNROLL
  for (int r = 0; r < R; ++r)
    LRQ_UNROLL
    for (int p = 0; p < P; ++p) sums[r][p] = T::ZeroSums();
  const int64_t q_base = span.b0 * quads_per_block;
  for (int64_t b = span.b0; b < span.b1; ++b) {
    typename T::Dots dots[R][P];
    LRQ_UNROLL
    for (int r = 0; r < R; ++r)
      LRQ_UNROLL
      for (int p = 0; p < P; ++p) dots[r][p] = T::Zero();
    for (int64_t q = b * quads_per_block; q < (b + 1) * quads_per_block; ++q) {
      typename T::Codes c[P];
      if constexpr (kDirect) {
        const uint8_t* at = codes + q * quad_stride;
        LRQ_UNROLL
        for (int o = 0; o < P * 8 * SB; o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(at + 24 * quad_stride + o), _MM_HINT_T0);
        LRQ_UNROLL
        for (int p = 0; p < P; ++p) c[p] = T::template Decode<SB>(at + p * w.gbytes);
      } else {
        LRQ_UNROLL
        for (int p = 0; p < P; ++p) c[p] = T::Load(span.buffer + (q - q_base) * np + p0 + p);
      }
      LRQ_UNROLL
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, xq[r] + 4 * q, 4);
        const typename T::X xv = T::Broadcast(four);
        LRQ_UNROLL
        for (int p = 0; p < P; ++p) dots[r][p] = T::Dp(dots[r][p], c[p], xv);
      }
    }
    const size_t at = w.ScaleOffset(t, b, p0);
    LRQ_UNROLL
    for (int p = 0; p < P; ++p) {
      const typename T::Sums ws = w.half_scales ? T::Scales(w.half.data() + at + p * kPanel)
                                                : T::Scales(w.scales.data() + at + p * kPanel);
      const typename T::Dots zp = w.zero_points.empty() ? T::ZeroPoint(w.zero_point)
                                                        : T::ZeroPoints(w.zero_points.data() + at + p * kPanel);
      LRQ_UNROLL
      for (int r = 0; r < R; ++r) sums[r][p] = T::Update(sums[r][p], dots[r][p], zp, qs[r][b], ws, sx[r][b]);
    }
  }
  LRQ_UNROLL
  for (int r = 0; r < R; ++r)
    LRQ_UNROLL
    for (int p = 0; p < P; ++p) T::AddTo(acc + (r * kTile + p0 + p) * kPanel, sums[r][p]);
}

// Every pair of rows [span.m0, span.m0 + rows.M) over blocks [span.b0, span.b1), adding into
// acc[rows.M, kTile · 16].
template <int SB, bool kDirect>
LRQ_TARGET void Rows(const Int8Layout& w, int np, int64_t t, Span span, const Int8Call& rows, float* acc) {
  const int64_t first = span.m0;  // rows.M rows from here; acc holds them from its start
  for (int64_t m = 0; m < rows.M; m += 2) {
    span.m0 = first + m;
    float* at = acc + m * kTile * kPanel;
    const bool pair = m + 1 < rows.M;
    if (np == kTile) {
      pair ? Micro<SB, 2, kTile, kDirect>(w, np, t, 0, span, *rows.a, at)
           : Micro<SB, 1, kTile, kDirect>(w, np, t, 0, span, *rows.a, at);
    } else {
      for (int p = 0; p < np; ++p)
        pair ? Micro<SB, 2, 1, kDirect>(w, np, t, p, span, *rows.a, at)
             : Micro<SB, 1, 1, kDirect>(w, np, t, p, span, *rows.a, at);
    }
  }
}

template <int SB>
LRQ_TARGET void TileOf(const Int8Call& call, int64_t t) {
  const Int8Layout& w = *call.w;
  const int np = w.Panels(t);
  const int64_t n0 = t * kTile * kPanel;
  const uint8_t* codes = w.codes.data() + w.CodeOffset(t, 0, 0);
  // rows in blocks of kRowBlock: their sums and a chunk of their activations stay in L1
  const int64_t rows_here = call.M < kRowBlock ? call.M : kRowBlock;
  std::vector<float> acc(static_cast<size_t>(rows_here) * kTile * kPanel);  // [rows, np · 16]
  const int chunk_blocks = kChunk / w.block > 1 ? kChunk / w.block : 1;
  const int64_t chunk_quads = static_cast<int64_t>(chunk_blocks) * w.block / 4;
  std::vector<uint8_t> storage(call.M <= 2 ? 0 : sizeof(typename T::Codes) * (chunk_quads * np + 1));
  auto* buffer = reinterpret_cast<typename T::Codes*>(
      (reinterpret_cast<uintptr_t>(storage.data()) + alignof(typename T::Codes) - 1) &
      ~uintptr_t{alignof(typename T::Codes) - 1});
  for (int64_t r0 = 0; r0 < call.M; r0 += kRowBlock) {
    Int8Call rows = call;  // rows [r0, r0 + rows.M), viewed from their first
    rows.M = call.M - r0 < kRowBlock ? call.M - r0 : kRowBlock;
    std::fill(acc.begin(), acc.end(), 0.f);
    if (call.M <= 2) {  // small batches: decode straight into registers
      Rows<SB, true>(w, np, t, Span{r0, 0, w.blocks, codes, nullptr}, rows, acc.data());
    } else {
      for (int64_t b0 = 0; b0 < w.blocks; b0 += chunk_blocks) {
        const int64_t b1 = b0 + chunk_blocks < w.blocks ? b0 + chunk_blocks : w.blocks;
        const int64_t q0 = b0 * w.block / 4, q1 = b1 * w.block / 4;
        for (int64_t q = q0; q < q1; ++q)
          for (int p = 0; p < np; ++p)
            T::Store(buffer + (q - q0) * np + p, T::template Decode<SB>(codes + (q * np + p) * w.gbytes));
        Rows<SB, false>(w, np, t, Span{r0, b0, b1, codes, buffer}, rows, acc.data());
      }
    }
    // acc → y (columns past N left alone), with bias and accumulation
    for (int64_t m = 0; m < rows.M; ++m)
      for (int64_t j = 0; j < static_cast<int64_t>(np) * kPanel && n0 + j < w.N; ++j) {
        const float v = acc[m * kTile * kPanel + j] + (call.bias ? call.bias[n0 + j] : 0.f);
        float& dst = call.y[(r0 + m) * w.N + n0 + j];
        dst = call.accumulate ? dst + v : v;
      }
  }
}

LRQ_TARGET void Tile(const Int8Call& call, int64_t t) {
  switch (call.w->sb) {
    case 2: TileOf<2>(call, t); break;
    case 3: TileOf<3>(call, t); break;
    case 4: TileOf<4>(call, t); break;
    default: TileOf<8>(call, t); break;
  }
}

// The skinny-batch Linear sweep behind lipkern::sn_linear (float32, AVX-512): the layer's
// matmul z = x W^T for a few rows of x AND the power iteration's y = W v, xn = W^T y, in ONE
// pass over W.
//
// Why: at batch 8 a 512x512 layer's matmul is a matrix-vector product in disguise -- each
// weight is used 8 times -- so it runs at the speed W streams from memory, not at the FMA
// rate. Torch's power iteration needs W v and W^T (W v): two more uses of each weight. Done
// in the same pass they are two more FMAs on a row already in registers / L1, mostly hidden
// while the loop waits on memory (not all: ~5 us per 512x512 layer here); done after the
// matmul (MKL's call, then a pass of our own) they cost a second pass over a 1 MB W from
// L2/L3 (~16 us per layer here). Measurements: bench/NOTES.md.
//
// Shape of the loop: two rows of W at a time, loaded 16 columns at a time and multiplied
// into up to 9 vectors (8 rows of x, and v: 18 accumulators fit the 32 zmm registers); x rows
// past the first 8 take further chunks of 8 over the same two rows, now in L1. The 16 x
// accumulators of a row pair end in one transposed reduction. Then, with y_i = W_i . v
// known, xn += y_i W_i (the rows still in L1). Rows a few ahead are prefetched.
//
// Only GCC/Clang on x86-64 with AVX-512F at run time; elsewhere sn_linear keeps its
// at::mm + dense_pass path (skinny_supported() says which).
#pragma once
#include <algorithm>
#include <cstdint>

#include "dense.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LIPKERN_HAVE_SKINNY 1
#define LIPKERN_AVX512 __attribute__((target("avx512f")))
#else
#define LIPKERN_HAVE_SKINNY 0
#endif

namespace lipkern {
namespace cpu {
namespace {

#if LIPKERN_HAVE_SKINNY

inline bool skinny_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// The 16 sums of a[0..15]'s lanes, as one vector (lane k = sum of a[k]): a transposed
// reduction, 15 adds and 30 shuffles for all 16 instead of ~8 dependent steps each.
LIPKERN_AVX512 inline __m512 reduce16(const __m512* a) {
  __m512 t[8], u[4];
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)  // per 128-bit lane: [A0+A2, B0+B2, A1+A3, B1+B3]
    t[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]),
                         _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)  // per 128-bit lane: [A, B, C, D] (that lane's part)
    u[p] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // 128-bit lanes: [u0 L0+L1, u0 L2+L3, u1 L0+L1, u1 L2+L3], then the same over v0, v1
  const __m512 v0 =
      _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 v1 =
      _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// rows of W this far ahead are prefetched while the current ones are multiplied (the
// sweep streams W from DRAM: the hardware prefetcher alone left it well short of bandwidth)
constexpr int64_t kPrefetchRows = 4;

// For R rows of W (ldw apart) and n columns:
//   d[r * KX + k] = W_r . x_k   for the KX rows x_k of x (ldx apart)
//   dv[r] = W_r . v             when V
// pf: the rows to prefetch (R rows, ldw apart) or nullptr.
template <int R, int KX, bool V>
LIPKERN_AVX512 inline void skinny_dots(const float* w, int64_t ldw, const float* x,
                                       int64_t ldx, const float* v, int64_t n, float* d,
                                       float* dv, const float* pf) {
  __m512 acc[R * KX + 1];  // + 1: never empty
  __m512 accv[R];
#pragma GCC unroll 16
  for (int q = 0; q < R * KX; ++q) acc[q] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) accv[r] = _mm512_setzero_ps();
  auto step = [&](int64_t j, __mmask16 m) LIPKERN_AVX512 {
    __m512 wr[R];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) wr[r] = _mm512_maskz_loadu_ps(m, w + r * ldw + j);
#pragma GCC unroll 8
    for (int k = 0; k < KX; ++k) {
      __m512 xv = _mm512_maskz_loadu_ps(m, x + k * ldx + j);
      // one load of x_k for both rows: left alone, GCC folds the load into each FMA and
      // the loop becomes bound by its 20 loads per step rather than its 18 FMAs
      __asm__("" : "+v"(xv));
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r)
        acc[r * KX + k] = _mm512_fmadd_ps(wr[r], xv, acc[r * KX + k]);
    }
    if constexpr (V) {
      __m512 vv = _mm512_maskz_loadu_ps(m, v + j);
      __asm__("" : "+v"(vv));
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) accv[r] = _mm512_fmadd_ps(wr[r], vv, accv[r]);
    }
  };
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    if (pf) {
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * ldw + j),
                                               _MM_HINT_T0);
    }
    step(j, static_cast<__mmask16>(0xFFFF));
  }
  if (j < n) step(j, static_cast<__mmask16>((1u << (n - j)) - 1u));  // masked: no overread
  if constexpr (R * KX == 16) {
    _mm512_storeu_ps(d, reduce16(acc));
  } else {
#pragma GCC unroll 16
    for (int q = 0; q < R * KX; ++q) d[q] = _mm512_reduce_add_ps(acc[q]);
  }
  if constexpr (V) {
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) dv[r] = _mm512_reduce_add_ps(accv[r]);
  }
}

// skinny_dots with R in {1, 2}, KX in 0..8 and V chosen at run time
LIPKERN_AVX512 inline void skinny_dots_rt(int R, int KX, bool V, const float* w, int64_t ldw,
                                          const float* x, int64_t ldx, const float* v,
                                          int64_t n, float* d, float* dv, const float* pf) {
#define LIPKERN_SKINNY_CASE(k)                                                  \
  case k:                                                                       \
    if (R == 2 && V)                                                            \
      skinny_dots<2, k, true>(w, ldw, x, ldx, v, n, d, dv, pf);                 \
    else if (R == 2)                                                            \
      skinny_dots<2, k, false>(w, ldw, x, ldx, v, n, d, dv, pf);                \
    else if (V)                                                                 \
      skinny_dots<1, k, true>(w, ldw, x, ldx, v, n, d, dv, pf);                 \
    else                                                                        \
      skinny_dots<1, k, false>(w, ldw, x, ldx, v, n, d, dv, pf);                \
    return;
  switch (KX) {
    LIPKERN_SKINNY_CASE(0)
    LIPKERN_SKINNY_CASE(1)
    LIPKERN_SKINNY_CASE(2)
    LIPKERN_SKINNY_CASE(3)
    LIPKERN_SKINNY_CASE(4)
    LIPKERN_SKINNY_CASE(5)
    LIPKERN_SKINNY_CASE(6)
    LIPKERN_SKINNY_CASE(7)
    LIPKERN_SKINNY_CASE(8)
    default:
      return;
  }
#undef LIPKERN_SKINNY_CASE
}

// xn += sum over r < R of c[r] * (row r of W: w + r * n), R in 1..4, n columns: xn is
// loaded and stored once for up to four rows
LIPKERN_AVX512 inline void skinny_axpy(float* __restrict xn, const float* w, const float* c,
                                       int R, int64_t n) {
  __m512 cv[4];
  for (int r = 0; r < 4; ++r) cv[r] = _mm512_set1_ps(r < R ? c[r] : 0.f);
  auto step = [&](int64_t j, __mmask16 m) LIPKERN_AVX512 {
    // two independent chains of at most two FMAs (one chain of four is 16 cycles of
    // latency per step)
    __m512 a = _mm512_fmadd_ps(cv[0], _mm512_maskz_loadu_ps(m, w + j),
                               _mm512_maskz_loadu_ps(m, xn + j));
    if (R > 1) a = _mm512_fmadd_ps(cv[1], _mm512_maskz_loadu_ps(m, w + n + j), a);
    if (R > 2) {
      __m512 b = _mm512_mul_ps(cv[2], _mm512_maskz_loadu_ps(m, w + 2 * n + j));
      if (R > 3) b = _mm512_fmadd_ps(cv[3], _mm512_maskz_loadu_ps(m, w + 3 * n + j), b);
      a = _mm512_add_ps(a, b);
    }
    _mm512_mask_storeu_ps(xn + j, m, a);
  };
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) step(j, static_cast<__mmask16>(0xFFFF));
  if (j < n) step(j, static_cast<__mmask16>((1u << (n - j)) - 1u));
}

// Rows [r0, r1) of W (row-major, n columns):
//   z[b * ldz + i] = x_b . W_i   for the B rows x_b of x (n apart)
//   y[i] = W_i . v               when v
//   xn += y[i] W_i               when v and xn (xn: this caller's own partial)
// Two rows at a time; x in chunks of 8 rows over the same two rows (in L1 after the first
// chunk), v riding in the first. Returns the sum of y[i]^2 over the rows (0 without v).
LIPKERN_AVX512 inline float skinny_rows(const float* W, int64_t n, int64_t r0, int64_t r1,
                                        const float* x, int64_t B, float* z, int64_t ldz,
                                        const float* v, float* y, float* xn) {
  float ss = 0;
  float d[16], dv[2];
  int64_t pend = r0;  // first row not yet in xn
  for (int64_t i = r0; i < r1;) {
    const int R = r1 - i >= 2 ? 2 : 1;
    const float* w = W + i * n;
    const float* pf = i + R + kPrefetchRows + R <= r1 ? w + kPrefetchRows * n : nullptr;
    for (int64_t b = 0; b == 0 || b < B;) {
      const bool with_v = b == 0 && v != nullptr;
      const int KX = static_cast<int>(std::min<int64_t>(B - b, 8));
      if (KX == 0 && !with_v) break;
      skinny_dots_rt(R, KX, with_v, w, n, x + b * n, n, v, n, d, dv, b == 0 ? pf : nullptr);
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < KX; ++k) z[(b + k) * ldz + i + r] = d[r * KX + k];
      if (with_v)
        for (int r = 0; r < R; ++r) {
          y[i + r] = dv[r];
          ss += dv[r] * dv[r];
        }
      b += KX;
      if (KX == 0) break;
    }
    i += R;
    // xn += y_k W_k for the rows done since the last axpy: four at a time (still in L1)
    if (v && xn && (i - pend >= 4 || i == r1)) {
      skinny_axpy(xn, W + pend * n, y + pend, static_cast<int>(i - pend), n);
      pend = i;
    }
  }
  return ss;
}

#else

inline bool skinny_supported() { return false; }

inline float skinny_rows(const float*, int64_t, int64_t, int64_t, const float*, int64_t,
                         float*, int64_t, const float*, float*, float*) {
  return 0.f;
}

#endif  // LIPKERN_HAVE_SKINNY

// skinny_rows over all rows of W (rows x n): when parallel, the rows split in blocks of
// whole row pairs over the threads (dense.h's split_rows). xn, when given with v, is
// overwritten. Returns the sum of y^2.
inline float skinny_pass(int64_t rows, int64_t n, const float* W, const float* x, int64_t B,
                         float* z, const float* v, float* y, float* xn, bool parallel) {
  return split_rows(rows, n, v != nullptr ? xn : nullptr, parallel ? at::get_num_threads() : 1,
                    2, [&](int64_t r0, int64_t r1, float* part) {
                      return skinny_rows(W, n, r0, r1, x, B, z, rows, v, y, part);
                    });
}

}  // namespace
}  // namespace cpu
}  // namespace lipkern

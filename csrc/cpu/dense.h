// Dense inner loops and small vector helpers shared by the CPU kernels (power_iter.cpp,
// sn_linear.cpp). Everything sits in an anonymous namespace: each translation unit gets its
// own multi-versioned copies.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>

namespace lipkern {
namespace cpu {
namespace {

// ---------------------------------------------------------------- dense inner loops
// Built for AVX-512, AVX2 and baseline x86-64, chosen at load time (GCC target_clones):
// these loops stream W, and the vector width sets how fast (measured: see bench/NOTES.md).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LIPKERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LIPKERN_CLONES
#endif

// The dot product keeps 32 independent partial sums (two AVX-512 registers): vectorized
// without any licence to reassociate, and enough to hide the FMA latency (an
// `omp simd reduction` here stayed scalar).
#define LIPKERN_INLINE inline __attribute__((always_inline))

// Whole loops are multi-versioned (not per-row helpers: an ifunc call per row cost 30% of
// a 256x256 pass); the helpers inline into each version.
template <typename T>
LIPKERN_INLINE T dot_(const T* __restrict a, const T* __restrict b, int64_t n) {
  T part[32] = {0};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32)
    for (int k = 0; k < 32; ++k) part[k] += a[j + k] * b[j + k];
  for (; j < n; ++j) part[j & 31] += a[j] * b[j];
  for (int w = 16; w > 0; w >>= 1)  // a tree: a chain of 32 dependent adds is 128 cycles
    for (int k = 0; k < w; ++k) part[k] += part[k + w];
  return part[0];
}

#define LIPKERN_DENSE_LOOPS(T)                                                              \
  /* y = W x for rows [r0, r1); if xn: xn += W^T y over those rows (rows still in L1).      \
     Four rows at a time: xn is loaded and stored once per four axpys (one row at a time,   \
     that load/store made a hot 512x512 pass 1.8x the dot-only pass; the dots stay one row  \
     at a time: a four-row dot ran 35% slower here).                                       \
     Returns sum of y^2, accumulated in double (a float32 y of 1e20 squares past float32). */ \
  LIPKERN_CLONES double dense_rows(const T* W, int64_t n, int64_t r0, int64_t r1,           \
                                   const T* x, T* y, T* __restrict xn) {                    \
    double ss = 0;                                                                          \
    int64_t i = r0;                                                                         \
    for (; i + 4 <= r1; i += 4) {                                                           \
      const T* __restrict a0 = W + i * n;                                                   \
      const T* __restrict a1 = a0 + n;                                                      \
      const T* __restrict a2 = a1 + n;                                                      \
      const T* __restrict a3 = a2 + n;                                                      \
      const T d[4] = {dot_(a0, x, n), dot_(a1, x, n), dot_(a2, x, n), dot_(a3, x, n)};      \
      for (int k = 0; k < 4; ++k) {                                                         \
        y[i + k] = d[k];                                                                    \
        ss += double(d[k]) * d[k];                                                          \
      }                                                                                     \
      if (xn)                                                                               \
        for (int64_t j = 0; j < n; ++j)                                                     \
          xn[j] += d[0] * a0[j] + d[1] * a1[j] + d[2] * a2[j] + d[3] * a3[j];               \
    }                                                                                       \
    for (; i < r1; ++i) {                                                                   \
      const T* __restrict row = W + i * n;                                                  \
      const T acc = dot_(row, x, n);                                                        \
      y[i] = acc;                                                                           \
      ss += double(acc) * acc;                                                              \
      if (xn)                                                                               \
        for (int64_t j = 0; j < n; ++j) xn[j] += acc * row[j];                              \
    }                                                                                       \
    return ss;                                                                              \
  }                                                                                         \
  /* grad[i, j] = c * u[i] * x[j] for rows [r0, r1) */                                      \
  LIPKERN_CLONES void outer_rows(T* __restrict grad, int64_t n, int64_t r0, int64_t r1,     \
                                 T c, const T* __restrict u, const T* __restrict x) {       \
    for (int64_t i = r0; i < r1; ++i) {                                                     \
      const T cu = c * u[i];                                                                \
      for (int64_t j = 0; j < n; ++j) grad[i * n + j] = cu * x[j];                          \
    }                                                                                       \
  }                                                                                         \
  LIPKERN_CLONES void copy_into(T* __restrict y, const T* __restrict x, int64_t n) {        \
    for (int64_t j = 0; j < n; ++j) y[j] = x[j];                                            \
  }                                                                                         \
  LIPKERN_CLONES void add_into(T* __restrict y, const T* __restrict x, int64_t n) {         \
    for (int64_t j = 0; j < n; ++j) y[j] += x[j];                                           \
  }                                                                                         \
  /* y[r, j] = z[r, j] / s (+ b[j] when b), rows x cols */                                  \
  LIPKERN_CLONES void div_rows(T* __restrict y, const T* __restrict z,                      \
                               const T* __restrict b, T s, int64_t rows, int64_t cols) {    \
    for (int64_t r = 0; r < rows; ++r) {                                                    \
      T* yr = y + r * cols;                                                                 \
      const T* zr = z + r * cols;                                                           \
      if (b)                                                                                \
        for (int64_t j = 0; j < cols; ++j) yr[j] = zr[j] / s + b[j];                        \
      else                                                                                  \
        for (int64_t j = 0; j < cols; ++j) yr[j] = zr[j] / s;                               \
    }                                                                                       \
  }                                                                                         \
  LIPKERN_CLONES T dot_wide(const T* a, const T* b, int64_t n) { return dot_(a, b, n); }

LIPKERN_DENSE_LOOPS(float)
LIPKERN_DENSE_LOOPS(double)

// ---------------------------------------------------------------- helpers
template <typename T>
at::Tensor view(const T* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(p), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Sums of squares in double: the squares of float32 entries above ~1.8e19 (sigma 1e30 is
// in range, its square is not) overflow float32, those below ~1e-19 underflow it.
template <typename T>
double sumsq(const T* v, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += double(v[i]) * double(v[i]);
  return s;
}

// max |v_i| (0 for n == 0)
template <typename T>
T maxabs(const T* v, int64_t n) {
  T m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(v[i]));
  return m;
}

// The floor of an operator image's norm (reference.py, N1): eps * min(1, max|W|), not below
// the smallest normal. Never below a norm >= eps, so max|W| (one pass over W) is read only
// when a norm falls below eps, and then once per layer.
template <typename T>
struct ImageFloor {
  const T* W;
  int64_t n;
  double eps;
  T value = -1;
  T at(T norm) {  // the divisor max(norm, floor)
    if (norm >= T(eps)) return norm;
    if (value < 0)
      value = std::max(T(eps * std::min(1.0, double(maxabs(W, n)))),
                       std::numeric_limits<T>::min());
    return std::max(norm, value);
  }
};

// The one-pass dense W^T (W x) is used only while ||W x||^2 lies in [2^-60, 2^60]: then the
// accumulator (of size sigma^2) can neither overflow nor underflow float32 (N2 of
// reference.py); outside, the half-steps run separately, each normalized.
inline bool one_pass_ok(double ss) { return ss >= 0x1p-60 && ss <= 0x1p60; }

// dst (cols) = W^T u for W (rows, cols) row-major: the separate adjoint half-step of the
// rare out-of-range case above (serial; the hot paths use dense_pass / skinny_pass).
template <typename T>
void adjoint_rows(int64_t rows, int64_t cols, const T* W, const T* u, T* dst) {
  std::fill(dst, dst + cols, T(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T ui = u[i];
    const T* wr = W + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) dst[j] += ui * wr[j];
  }
}

// The deterministic fallback start vector (lipkern.layout.fallback_vector): exact uint32
// arithmetic, the same numbers as the Python, Triton and CUDA versions.
template <typename T>
void fallback_into(T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = uint32_t(i) * 2654435761u + 1013904223u;
    dst[i] = T(double(h) / 4294967296.0 - 0.5);
  }
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
void scale_into(const T* src, T* dst, int64_t n, T s) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * s;
}

// dst = src / max(||src||, eps); returns ||src||
template <typename T>
T normalize_into(const T* src, T* dst, int64_t n, double eps) {
  const T nrm = T(std::sqrt(sumsq(src, n)));
  const T inv = T(1) / std::max(nrm, T(eps));
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * inv;
  return nrm;
}

// A start vector (reference.start_vector): dst = src / max(||src||, eps), or the normalized
// fallback vector when src is all zero or not finite (N4).
template <typename T>
void start_into(const T* src, T* dst, int64_t n, double eps) {
  const double nrm = std::sqrt(sumsq(src, n));
  if (std::isfinite(nrm) && nrm > 0) {
    normalize_into(src, dst, n, eps);
    return;
  }
  fallback_into(dst, n);
  normalize_into(dst, dst, n, eps);
}

// Runs body(r0, r1, xn_part) -> T over the rows [0, rows) of a (rows, cols) matrix: in one
// call, or when nt > 1 split in nt blocks over the threads (block edges multiples of
// `align`), each block with its own zeroed xn partial (nullptr when xn is). The partials are
// summed into xn, which is overwritten. Returns the sum of the bodies' results.
template <typename T, typename Body>
double split_rows(int64_t rows, int64_t cols, T* xn, int nt, int64_t align, const Body& body) {
  if (xn) std::fill(xn, xn + cols, T(0));
  const int64_t units = (rows + align - 1) / align;
  nt = static_cast<int>(std::min<int64_t>(nt, units));
  if (nt <= 1) return body(int64_t(0), rows, xn);
  // per-thread partials: the calling thread's scratch, reused across calls (named through
  // references: inside the lambda a thread_local name would be the worker's own)
  thread_local std::vector<T> part_tl;
  thread_local std::vector<double> ss_tl;
  std::vector<T>& part = part_tl;
  std::vector<double>& ss = ss_tl;
  part.assign(xn ? size_t(nt) * cols : 0, T(0));
  ss.assign(nt, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t r0 = std::min(rows, align * (units * t / nt)),
                    r1 = std::min(rows, align * (units * (t + 1) / nt));
      ss[t] = body(r0, r1, xn ? part.data() + t * cols : nullptr);
    }
  });
  if (xn)
    for (int t = 0; t < nt; ++t) add_into(xn, part.data() + t * cols, cols);
  return std::accumulate(ss.begin(), ss.end(), 0.0);
}

// One pass over the (rows, cols) matrix W: y = W x and, when xn != nullptr, xn = W^T y
// (row i still in L1). parallel: rows split over the threads, each with its own xn
// partial. Returns sum of y^2 (in double).
template <typename T>
double dense_pass(int64_t rows, int64_t cols, const T* W, const T* x, T* y, T* xn, bool parallel) {
  return split_rows(rows, cols, xn, parallel ? at::get_num_threads() : 1, 1,
                    [&](int64_t r0, int64_t r1, T* part) {
                      return dense_rows(W, cols, r0, r1, x, y, part);
                    });
}

}  // namespace
}  // namespace cpu
}  // namespace lipkern

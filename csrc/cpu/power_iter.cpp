// C++ CPU kernels of the fused power iteration: the forward (all iterations of all layers and
// the product) and the backward (every weight gradient), one call each.
//
// Work split: layers whose cost exceeds a thread's fair share run one at a time with the
// whole machine (BLAS threads, parallel dense rows); the rest are handed out one layer at a
// time to the threads in decreasing order of cost (an atomic ticket: no thread idles while a
// big layer sits in another's queue), each layer single-threaded.
//
// Per layer the map C runs as im2col + GEMM (ATen's BLAS: 90 GFLOP/s single-threaded on
// the toy shape 32x288 @ 288x256 here, against 37 for at::conv2d), C^T as GEMM + col2im.
// 1x1/stride-1/unpadded convs skip the copy. Circular padding wraps the input into a padded
// buffer (and folds the adjoint back), so the im2col only ever sees zero padding.
// Dense layers take one hand-written pass over W per iteration: y_i = <W_i, x>, then
// xn += y_i W_i while row i is still in L1, so W^T W x never needs y whole.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include "../layout.h"
#include "dense.h"

namespace lipkern {
namespace cpu {
namespace {


inline bool direct_1x1(const Geom& g) {  // C is a plain matmul per group: no im2col
  return g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
         !g.circular;
}

// The geometry the GEMM path sees for a circular layer: the wrapped input, no padding.
inline Geom padded_geom(const Geom& g) {
  Geom p = g;
  if (g.circular) {
    p.h = g.h + 2 * g.ph;
    p.w = g.w + 2 * g.pw;
    p.ph = p.pw = 0;
    p.circular = 0;
  }
  return p;
}

inline int64_t wrap(int64_t i, int64_t n) { return ((i % n) + n) % n; }

// Circular padding of src (c, h, w) into dst (c, h + 2ph, w + 2pw).
template <typename T>
void pad_circular(const Geom& g, const T* src, T* dst) {
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t i = 0; i < hp; ++i) {
      const T* line = src + (c * g.h + wrap(i - g.ph, g.h)) * g.w;
      T* out = dst + (c * hp + i) * wp;
      for (int64_t j = 0; j < wp; ++j) out[j] = line[wrap(j - g.pw, g.w)];
    }
}

// Adjoint of pad_circular: dst (c, h, w) = sum of the padded entries that wrap onto it.
template <typename T>
void fold_circular(const Geom& g, const T* src, T* dst) {
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
  std::fill(dst, dst + g.in_numel(), T(0));
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t i = 0; i < hp; ++i) {
      T* line = dst + (c * g.h + wrap(i - g.ph, g.h)) * g.w;
      const T* in = src + (c * hp + i) * wp;
      for (int64_t j = 0; j < wp; ++j) line[wrap(j - g.pw, g.w)] += in[j];
    }
}

// Output columns [lo, hi) whose input column ow*s - p + k*d lies inside [0, n).
inline void valid_range(int64_t out_n, int64_t s, int64_t off, int64_t n, int64_t* lo,
                        int64_t* hi) {
  // off = k*d - p; need 0 <= o*s + off < n
  int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
  int64_t b = n - off <= 0 ? 0 : (n - off + s - 1) / s;
  *lo = std::min(a, out_n);
  *hi = std::max(*lo, std::min(b, out_n));
}

// Rows here are short (16-32 floats on CIFAR-sized layers): plain loops, kept from being
// turned into memmove/memset calls, which cost more than the copy itself at that length
// (memmove + memset were 5% of the toy forward's samples).
#if defined(__GNUC__) && !defined(__clang__)
#define LIPKERN_NO_LIBCALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define LIPKERN_NO_LIBCALLS
#endif

// Stride-1 convs whose output is as wide as the input ("same" width): a kernel tap is then
// one flat shift of the whole plane, out[q] = plane[q + off] with off = (kh*dh - ph) * W +
// kw*dw - pw, except the border columns, which are zeroed after the copy. One long
// vectorized loop per tap instead of OH short ones (im2col + col2im were 25% of the toy
// forward with per-row loops).
inline bool flat_shift(const Geom& g) { return g.sh == 1 && g.sw == 1 && g.ow == g.w; }

// rows oh in [*o0, *o1) read input rows inside [0, h)
inline void valid_rows(const Geom& g, int64_t kh, int64_t* o0, int64_t* o1) {
  const int64_t off = kh * g.dh - g.ph;  // ih = oh + off
  *o0 = std::min(std::max<int64_t>(0, -off), g.oh);
  *o1 = std::max(*o0, std::min(g.oh, g.h - off));
}

// Zero columns [0, lo) and [hi, ow) of rows [o0, o1): one strided loop per border column
// (a 3x3 "same" conv has one per side), not two tiny loops per row (those were most of
// the flat path's time: 288 taps x 16 rows x 2 loops per application).
template <typename T>
void zero_border_columns(T* a, int64_t ow, int64_t o0, int64_t o1, int64_t lo, int64_t hi) {
  for (int64_t c = 0; c < lo; ++c)
    for (int64_t r = o0; r < o1; ++r) a[r * ow + c] = T(0);
  for (int64_t c = hi; c < ow; ++c)
    for (int64_t r = o0; r < o1; ++r) a[r * ow + c] = T(0);
}

template <typename T>
LIPKERN_NO_LIBCALLS void im2col_row_flat(const Geom& g, const T* plane, int64_t kh, int64_t kw,
                                         int64_t lo, int64_t hi, T* __restrict out) {
  const int64_t OW = g.ow, P = g.oh * OW, HW = g.h * g.w;
  const int64_t off = (kh * g.dh - g.ph) * g.w + kw * g.dw - g.pw;
  int64_t o0, o1;
  valid_rows(g, kh, &o0, &o1);
  // in-bounds part of the valid rows; what lies outside it is border columns
  const int64_t q0 = std::max(o0 * OW, -off), q1 = std::max(q0, std::min(o1 * OW, HW - off));
  for (int64_t q = 0; q < q0; ++q) out[q] = T(0);
  copy_into(out + q0, plane + q0 + off, q1 - q0);
  for (int64_t q = q1; q < P; ++q) out[q] = T(0);
  zero_border_columns(out, OW, o0, o1, lo, hi);
}

// col2im of one tap; zeroes the border columns of `row` (GEMM scratch) first, so the flat
// add puts nothing where a border entry would land.
template <typename T>
LIPKERN_NO_LIBCALLS void col2im_row_flat(const Geom& g, T* __restrict row, int64_t kh,
                                         int64_t kw, int64_t lo, int64_t hi,
                                         T* __restrict plane) {
  const int64_t OW = g.ow, HW = g.h * g.w;
  const int64_t off = (kh * g.dh - g.ph) * g.w + kw * g.dw - g.pw;
  int64_t o0, o1;
  valid_rows(g, kh, &o0, &o1);
  zero_border_columns(row, OW, o0, o1, lo, hi);
  const int64_t q0 = std::max(o0 * OW, -off), q1 = std::max(q0, std::min(o1 * OW, HW - off));
  add_into(plane + q0 + off, row + q0, q1 - q0);
}

// col ((c1 - c0) * kh * kw x P): the rows of input channels [c0, c1) of group grp of src
// (C's input space, zero padding only).
template <typename T>
LIPKERN_NO_LIBCALLS void im2col(const Geom& g, int64_t grp, const T* src, T* col, int64_t c0,
                                int64_t c1) {
  const int64_t P = g.oh * g.ow, cig = g.cig(), OW = g.ow, SW = g.sw;
  for (int64_t ci = c0; ci < c1; ++ci) {
    const T* plane = src + (grp * cig + ci) * g.h * g.w;
    for (int64_t kh = 0; kh < g.kh; ++kh)
      for (int64_t kw = 0; kw < g.kw; ++kw) {
        T* row = col + (((ci - c0) * g.kh + kh) * g.kw + kw) * P;
        int64_t lo, hi;
        valid_range(OW, SW, kw * g.dw - g.pw, g.w, &lo, &hi);
        if (flat_shift(g)) {
          im2col_row_flat(g, plane, kh, kw, lo, hi, row);
          continue;
        }
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          T* __restrict out = row + oh * OW;
          const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
          if (ih < 0 || ih >= g.h) {
            for (int64_t ow = 0; ow < OW; ++ow) out[ow] = T(0);
            continue;
          }
          const T* __restrict line = plane + ih * g.w + kw * g.dw - g.pw;
          for (int64_t ow = 0; ow < lo; ++ow) out[ow] = T(0);
          if (SW == 1)
            for (int64_t ow = lo; ow < hi; ++ow) out[ow] = line[ow];
          else
            for (int64_t ow = lo; ow < hi; ++ow) out[ow] = line[ow * SW];
          for (int64_t ow = hi; ow < OW; ++ow) out[ow] = T(0);
        }
      }
  }
}

// Adjoint of im2col: input channels [c0, c1) of group grp of dst += col ((c1 - c0) * kh *
// kw x P); may zero entries of col that map outside the input.
template <typename T>
LIPKERN_NO_LIBCALLS void col2im(const Geom& g, int64_t grp, T* col, T* dst, int64_t c0,
                                int64_t c1) {  // col: scratch
  const int64_t P = g.oh * g.ow, cig = g.cig(), OW = g.ow, SW = g.sw;
  for (int64_t ci = c0; ci < c1; ++ci) {
    T* plane = dst + (grp * cig + ci) * g.h * g.w;
    for (int64_t kh = 0; kh < g.kh; ++kh)
      for (int64_t kw = 0; kw < g.kw; ++kw) {
        T* row = col + (((ci - c0) * g.kh + kh) * g.kw + kw) * P;
        int64_t lo, hi;
        valid_range(OW, SW, kw * g.dw - g.pw, g.w, &lo, &hi);
        if (flat_shift(g)) {
          col2im_row_flat(g, row, kh, kw, lo, hi, plane);
          continue;
        }
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
          if (ih < 0 || ih >= g.h) continue;
          T* __restrict line = plane + ih * g.w + kw * g.dw - g.pw;
          const T* __restrict in = row + oh * OW;
          if (SW == 1)
            for (int64_t ow = lo; ow < hi; ++ow) line[ow] += in[ow];
          else
            for (int64_t ow = lo; ow < hi; ++ow) line[ow * SW] += in[ow];
        }
      }
  }
}

// Per-thread scratch, grown on demand.
template <typename T>
struct Scratch {
  std::vector<T> col, pad, xn;
  T* get(std::vector<T>& v, int64_t n) {
    if (int64_t(v.size()) < n) v.resize(n);
    return v.data();
  }
};

// ---------------------------------------------------------------- the maps
// dst (cout*oh*ow) = C src (cin*h*w); returns ||dst||^2.
// C's input-space vector as the GEMM sees it: wrapped into s.pad for circular padding.
template <typename T>
const T* padded_input(const Geom& g0, const T* src, Scratch<T>& s) {
  if (!g0.circular) return src;
  T* p = s.get(s.pad, padded_geom(g0).in_numel());
  pad_circular(g0, src, p);
  return p;
}

// The column matrix of a group is built and consumed in slices of input channels whose
// rows fit in L2 with room for the GEMM's own packing: the whole (red x P) matrix of a
// 128-channel 3x3 conv at 32x32 is 4.7 MB (this CPU: 2 MB L2); built whole (im2col, then the
// GEMM reading it back from L3; col2im likewise) one power iteration of that layer took
// 5.5 ms, in slices 4.6-5.0 ms, against 2.3 + 1.9 ms for its two GEMMs on cache-resident
// operands (1 thread, shared machine; 256 KiB-2 MiB slices measured the same within noise).
constexpr int64_t kColBytes = 512 * 1024;
// The weight gradient's GEMM (out x col^T) streams col once: slices there only cut its N
// into pieces of ~126 (ResDiscriminator32's 32x32 conv: 2.7 ms sliced, 2.4 ms whole, 1
// thread), so it slices only beyond this.
constexpr int64_t kGradColBytes = 16 * 1024 * 1024;

template <typename T>
int64_t chunk_channels(const Geom& g, int64_t bytes = kColBytes) {
  const int64_t per = g.kh * g.kw * g.oh * g.ow * int64_t(sizeof(T));
  return std::max<int64_t>(1, std::min<int64_t>(g.cig(), bytes / per));
}

// Row-major (rows x cols) view with leading dimension ld (a block of columns of a wider
// matrix).
template <typename T>
at::Tensor view_ld(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// body(c0, c1, B): B the column rows of input channels [c0, c1) of group grp (the input
// itself for 1x1 convs, in one piece; else im2col into scratch, slice by slice).
template <typename T, typename F>
void for_each_column_slice(const Geom& g, int64_t grp, const T* src, Scratch<T>& s, F body,
                           int64_t bytes = kColBytes) {
  const int64_t P = g.oh * g.ow, cig = g.cig();
  if (direct_1x1(g)) return body(int64_t(0), cig, src + grp * cig * P);
  const int64_t cc = chunk_channels<T>(g, bytes);
  T* col = s.get(s.col, std::min(cc, cig) * g.kh * g.kw * P);
  for (int64_t c0 = 0; c0 < cig; c0 += cc) {
    const int64_t c1 = std::min(cig, c0 + cc);
    im2col(g, grp, src, col, c0, c1);
    body(c0, c1, static_cast<const T*>(col));
  }
}

template <typename T>
double apply_c(const Geom& g0, const T* W, const T* src, T* dst, Scratch<T>& s) {
  const Geom g = padded_geom(g0);
  src = padded_input(g0, src, s);
  const int64_t P = g.oh * g.ow, cog = g.cog(), R = g.red(), taps = g.kh * g.kw;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    auto out = view(dst + grp * cog * P, cog, P);
    const T* Wg = W + grp * cog * R;
    for_each_column_slice(g, grp, src, s, [&](int64_t c0, int64_t c1, const T* B) {
      const int64_t r0 = c0 * taps, rc = (c1 - c0) * taps;
      auto wv = view_ld(Wg + r0, cog, rc, R);
      if (c0 == 0)
        at::mm_out(out, wv, view(B, rc, P));
      else
        at::addmm_out(out, out, wv, view(B, rc, P));
    });
  }
  return sumsq(dst, g.out_numel());
}

// dst (cin*h*w) = C^T src (cout*oh*ow); returns ||dst||^2. In slices of input channels
// (see kColBytes): col = W[:, slice]^T y, then its col2im, while col is in L2.
template <typename T>
double apply_ct(const Geom& g0, const T* W, const T* src, T* dst, Scratch<T>& s) {
  const Geom g = padded_geom(g0);
  T* target = g0.circular ? s.get(s.pad, g.in_numel()) : dst;
  const int64_t P = g.oh * g.ow, cog = g.cog(), R = g.red(), cig = g.cig(),
                taps = g.kh * g.kw;
  const bool direct = direct_1x1(g);
  if (!direct) std::fill(target, target + g.in_numel(), T(0));
  const int64_t cc = direct ? cig : chunk_channels<T>(g);
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const T* Wg = W + grp * cog * R;
    auto y = view(src + grp * cog * P, cog, P);
    if (direct) {
      auto out = view(target + grp * cig * P, R, P);
      at::mm_out(out, view(Wg, cog, R).t(), y);
      continue;
    }
    T* col = s.get(s.col, std::min(cc, cig) * taps * P);
    for (int64_t c0 = 0; c0 < cig; c0 += cc) {
      const int64_t c1 = std::min(cig, c0 + cc), rc = (c1 - c0) * taps;
      auto out = view(col, rc, P);
      at::mm_out(out, view_ld(Wg + c0 * taps, cog, rc, R).t(), y);
      col2im(g, grp, col, target, c0, c1);
    }
  }
  if (g0.circular) fold_circular(g0, target, dst);
  return sumsq(dst, g0.in_numel());
}

// ---------------------------------------------------------------- one layer, forward
template <typename T>
double dense_pass(const Geom& g, const T* W, const T* x, T* y, T* xn, bool parallel) {
  return dense_pass(g.cout, g.cin, W, x, y, xn, parallel);
}

// y = A x (and for dense, xn = A^T A x in the same pass when xn != nullptr)
template <typename T>
double apply_a(const Geom& g, const T* W, const T* x, T* y, T* xn, Scratch<T>& s, bool parallel) {
  if (g.kind == kDense) return dense_pass(g, W, x, y, xn, parallel);
  return g.kind == kConv ? apply_c(g, W, x, y, s) : apply_ct(g, W, x, y, s);
}


// The adjoint half-step from u_raw = A x (ss = ||u_raw||^2): u = u_raw / max(||u_raw||, f)
// in place, x = A^T u / max(||A^T u||, f); returns ||A^T u||. `accumulated`: xn already holds
// A^T u_raw (the dense one pass), else xn is scratch and A^T u runs here.
template <typename T>
T adjoint_half_step(const Geom& g, const T* W, T* u, double ss, bool accumulated, T* xn,
                    T* x, ImageFloor<T>& f, Scratch<T>& s) {
  const int64_t nx = g.x_numel(), ny = g.y_numel();
  const T cu = T(1) / f.at(T(std::sqrt(ss)));
  scale_into(u, u, ny, cu);
  if (!accumulated) {
    if (g.kind == kConvT)
      apply_c(g, W, u, xn, s);
    else
      apply_ct(g, W, u, xn, s);  // a dense layer is a 1x1 conv: a plain GEMM here
  }
  const T c = accumulated ? cu : T(1);  // A^T u = c * xn
  const T t = T(std::sqrt(sumsq(xn, nx))) * c;
  scale_into(xn, x, nx, c / f.at(t));
  return t;
}

template <typename T>
T forward_layer(const Geom& g, const T* W, const T* x0, T* x, T* u, int64_t n_iters,
                double eps, double tol, Scratch<T>& s, bool parallel) {
  const int64_t nx = g.x_numel(), ny = g.y_numel();
  T* xn = s.get(s.xn, nx);
  ImageFloor<T> f{W, g.w_numel(), eps};
  start_into(x0, x, nx, eps);
  T s_prev = -1;
  double sig2 = 0;
  bool have_y = false;
  for (int64_t k = 0; k < n_iters; ++k) {
    const bool dense = g.kind == kDense;
    sig2 = apply_a(g, W, x, u, dense ? xn : static_cast<T*>(nullptr), s, parallel);
    const T sk = T(std::sqrt(sig2));
    if (tol >= 0 && k > 0 && std::abs(sk - s_prev) <= T(tol) * sk) {
      have_y = true;  // x unchanged since u = A x: that is the final step already
      break;
    }
    s_prev = sk;
    adjoint_half_step(g, W, u, sig2, dense && one_pass_ok(sig2), xn, x, f, s);
  }
  if (!have_y) sig2 = apply_a(g, W, x, u, static_cast<T*>(nullptr), s, parallel);
  const T sigma = T(std::sqrt(sig2));
  const T inv = T(1) / f.at(sigma);
  for (int64_t i = 0; i < ny; ++i) u[i] *= inv;
  return sigma;
}

// torch's spectral_norm update (variant "spectral_norm"): per iteration u = normalize(A x),
// x = normalize(A^T u); sigma = u^T A x. After an iteration x = A^T u / max(||A^T u||, f), so
// u^T A x = ||A^T u|| * (||A^T u|| / max(||A^T u||, f)): no extra matvec, and no square that
// could overflow. With no iteration (eval mode) sigma = u0^T A x0 = <x0, A^T u0>.
template <typename T>
T forward_layer_sn(const Geom& g, const T* W, const T* x0, const T* u0, T* x, T* u,
                   int64_t n_iters, double eps, Scratch<T>& s, bool parallel) {
  const int64_t nx = g.x_numel(), ny = g.y_numel();
  T* xn = s.get(s.xn, nx);
  ImageFloor<T> f{W, g.w_numel(), eps};
  start_into(x0, x, nx, eps);
  if (n_iters == 0) {
    start_into(u0, u, ny, eps);
    if (g.kind == kConvT)
      apply_c(g, W, u, xn, s);
    else
      apply_ct(g, W, u, xn, s);  // a dense layer is a 1x1 conv: a plain GEMM here
    return dot(x, xn, nx);
  }
  T t = 0;  // ||A^T u|| of the last iteration
  for (int64_t k = 0; k < n_iters; ++k) {
    const bool dense = g.kind == kDense;
    const double ss = apply_a(g, W, x, u, dense ? xn : static_cast<T*>(nullptr), s, parallel);
    t = adjoint_half_step(g, W, u, ss, dense && one_pass_ok(ss), xn, x, f, s);
  }
  return t * (t / f.at(t));
}

// ---------------------------------------------------------------- one layer, backward
template <typename T>
void backward_layer(const Geom& g0, const T* x, const T* u, T coef, T* grad, Scratch<T>& s,
                    bool parallel) {
  if (g0.kind == kDense) {
    if (!parallel) return outer_rows(grad, g0.cin, 0, g0.cout, coef, u, x);
    at::parallel_for(0, g0.cout, 16, [&](int64_t b, int64_t e) {
      outer_rows(grad, g0.cin, b, e, coef, u, x);
    });
    return;
  }
  // sigma = <u, C x> (conv) or <x, C u> (transposed): grad = out @ im2col(in)^T
  const T* in = g0.kind == kConv ? x : u;
  const T* out = g0.kind == kConv ? u : x;
  const Geom g = padded_geom(g0);
  in = padded_input(g0, in, s);
  const int64_t P = g.oh * g.ow, cog = g.cog(), R = g.red(), taps = g.kh * g.kw;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    T* Gg = grad + grp * cog * R;
    auto o = view(out + grp * cog * P, cog, P);
    for_each_column_slice(g, grp, in, s, [&](int64_t c0, int64_t c1, const T* B) {
      const int64_t rc = (c1 - c0) * taps;
      auto gv = view_ld(static_cast<const T*>(Gg + c0 * taps), cog, rc, R);
      at::addmm_out(gv, gv, o, view(B, rc, P).t(), /*beta=*/0, /*alpha=*/coef);
    }, kGradColBytes);
  }
}

// ---------------------------------------------------------------- scheduling
// Runs body(layer, parallel) over all layers: big ones first with the whole machine, then
// the rest dynamically, largest first, one per thread at a time.
template <typename F>
void for_each_layer(const std::vector<Geom>& geoms, double iters, F body) {
  const int64_t L = geoms.size();
  const int nt = at::get_num_threads();
  std::vector<double> cost(L);
  double total = 0;
  for (int64_t i = 0; i < L; ++i) total += cost[i] = geoms[i].flops() * iters + 1e4;
  std::vector<int64_t> order(L);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  int64_t nbig = 0;
  // a layer is big if it alone is more than a thread's share (and worth threading at all)
  while (nt > 1 && nbig < L && cost[order[nbig]] > total / nt && cost[order[nbig]] > 2e6)
    ++nbig;
  for (int64_t k = 0; k < nbig; ++k) body(order[k], true);
  if (nbig == L) return;
  std::atomic<int64_t> next{nbig};
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t k = next++; k < L; k = next++) body(order[k], false);
  });
}

template <typename T>
void check_inputs(at::TensorList weights, const at::Tensor& x0, const at::Tensor& u0,
                  const std::vector<Geom>& geoms) {
  TORCH_CHECK(int64_t(weights.size()) == int64_t(geoms.size()),
              "lipkern: weights has ", weights.size(), " tensors, meta describes ",
              geoms.size(), " layers");
  int64_t total_x = 0, total_y = 0;
  for (size_t i = 0; i < geoms.size(); ++i) {
    TORCH_CHECK(weights[i].numel() == geoms[i].w_numel(), "lipkern: weights[", i, "] has ",
                weights[i].numel(), " elements, meta says ", geoms[i].w_numel());
    TORCH_CHECK(weights[i].device().is_cpu(), "lipkern: weights[", i, "] is not on the CPU");
    total_x += geoms[i].x_numel();
    total_y += geoms[i].y_numel();
  }
  TORCH_CHECK(x0.numel() == total_x && x0.dim() == 1, "lipkern: x0 must be 1-D of ", total_x,
              " elements");
  TORCH_CHECK(!u0.defined() || (u0.numel() == total_y && u0.dim() == 1),
              "lipkern: u0 must be 1-D of ", total_y, " elements");
}

}  // namespace

// ---------------------------------------------------------------- the ops
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> power_iter_cpu(
    at::TensorList weights, const at::Tensor& x0_in, const std::optional<at::Tensor>& u0_in,
    at::IntArrayRef meta, int64_t n_iters, double eps, double tol) {
  // The ATen calls inside (mm on from_blob views) would otherwise re-enter the dispatcher
  // through the autograd layer each time: 16.9 ms instead of 11.2 ms per toy forward.
  // (Not InferenceMode: the outputs must stay saveable for backward.)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto geoms = parse_meta(meta.data(), meta.size());
  TORCH_CHECK(n_iters >= 0, "lipkern: n_iters must be >= 0");
  TORCH_CHECK(!weights.empty(), "lipkern: weights is empty");
  const auto wdtype = weights[0].scalar_type();
  const auto cdtype = wdtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> ws;
  for (const auto& w : weights) {
    TORCH_CHECK(w.scalar_type() == wdtype, "lipkern: weights must share one dtype");
    ws.push_back(w.to(cdtype).contiguous());  // no copy when already fp32/fp64 contiguous
  }
  const at::Tensor x0 = x0_in.to(cdtype).contiguous();
  const bool sn = u0_in.has_value();
  TORCH_CHECK(!sn || tol < 0, "lipkern: tol is not supported with u0 (variant spectral_norm)");
  const at::Tensor u0 = sn ? u0_in->to(cdtype).contiguous() : at::Tensor();
  int64_t total_y = 0;
  for (const auto& g : geoms) total_y += g.y_numel();
  auto opt = x0.options();
  at::Tensor x = at::empty({x0.numel()}, opt), u = at::empty({total_y}, opt);
  at::Tensor sig = at::empty({int64_t(geoms.size())}, opt);
  AT_DISPATCH_FLOATING_TYPES(cdtype, "lipkern_power_iter_cpu", [&] {
    check_inputs<scalar_t>(ws, x0, u0, geoms);
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* sp = sig.data_ptr<scalar_t>();
    const scalar_t* x0p = x0.data_ptr<scalar_t>();
    const scalar_t* u0p = sn ? u0.data_ptr<scalar_t>() : nullptr;
    for_each_layer(geoms, 2.0 * n_iters + 1, [&](int64_t l, bool parallel) {
      thread_local Scratch<scalar_t> scratch;
      const Geom& g = geoms[l];
      const scalar_t* W = ws[l].data_ptr<scalar_t>();
      sp[l] = sn ? forward_layer_sn<scalar_t>(g, W, x0p + g.x_off, u0p + g.y_off, xp + g.x_off,
                                              up + g.y_off, n_iters, eps, scratch, parallel)
                 : forward_layer<scalar_t>(g, W, x0p + g.x_off, xp + g.x_off, up + g.y_off,
                                           n_iters, eps, tol, scratch, parallel);
    });
  });
  // the bound: the product (no log/exp round trip) and the log-sum (-inf for a zero sigma)
  at::Tensor lip = sig.prod();
  // (N5: a NaN sigma logs as NaN, not -inf)
  at::Tensor loglip = at::where(sig > 0, sig.clamp_min(1e-300).log(),
                                at::where(sig == 0, at::full({}, -INFINITY, opt),
                                          at::full({}, NAN, opt)))
                          .sum();
  return {sig, lip, loglip, x, u};
}

at::Tensor power_iter_backward_cpu(const at::Tensor& x_in, const at::Tensor& u_in,
                                   const at::Tensor& sig_in,
                                   const std::optional<at::Tensor>& grad_sigmas,
                                   const std::optional<at::Tensor>& grad_lip,
                                   const std::optional<at::Tensor>& grad_log,
                                   at::IntArrayRef meta, at::ScalarType wdtype) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
  const auto geoms = parse_meta(meta.data(), meta.size());
  const int64_t L = geoms.size();
  const auto cdtype = x_in.scalar_type();
  TORCH_CHECK(cdtype == at::kFloat || cdtype == at::kDouble, "lipkern: x must be fp32/fp64");
  const at::Tensor x = x_in.contiguous(), u = u_in.contiguous(),
                   sig = sig_in.to(cdtype).contiguous();
  TORCH_CHECK(sig.numel() == L, "lipkern: sigmas must have one entry per layer");
  int64_t total_x = 0, total_y = 0;
  for (const auto& g : geoms) {
    total_x += g.x_numel();
    total_y += g.y_numel();
  }
  TORCH_CHECK(x.numel() == total_x && u.numel() == total_y, "lipkern: x / u must have ",
              total_x, " / ", total_y, " elements, got ", x.numel(), " / ", u.numel());
  int64_t total_w = 0;
  for (const auto& g : geoms) total_w += g.w_numel();
  at::Tensor grad = at::empty({total_w}, x.options());
  AT_DISPATCH_FLOATING_TYPES(cdtype, "lipkern_power_iter_backward_cpu", [&] {
    // coef_l = dLoss/dsigma_l = gs_l + gL prod_{j != l} sigma_j + glog / sigma_l, with the
    // product from prefix/suffix scans (no division: a zero sigma gives no NaN)
    const scalar_t* sp = sig.data_ptr<scalar_t>();
    std::vector<scalar_t> coef(L, scalar_t(0));
    if (grad_sigmas.has_value()) {
      at::Tensor gs = grad_sigmas->to(cdtype).contiguous();
      TORCH_CHECK(gs.numel() == L, "lipkern: grad_sigmas must have one entry per layer");
      for (int64_t l = 0; l < L; ++l) coef[l] += gs.data_ptr<scalar_t>()[l];
    }
    if (grad_lip.has_value()) {
      const scalar_t gl = grad_lip->item<double>();
      if (gl != 0) {
        std::vector<scalar_t> before(L + 1, 1), after(L + 1, 1);
        for (int64_t l = 0; l < L; ++l) before[l + 1] = before[l] * sp[l];
        for (int64_t l = L - 1; l >= 0; --l) after[l] = after[l + 1] * sp[l];
        for (int64_t l = 0; l < L; ++l) coef[l] += gl * before[l] * after[l + 1];
      }
    }
    if (grad_log.has_value()) {
      const scalar_t glog = grad_log->item<double>();
      for (int64_t l = 0; l < L; ++l)
        if (sp[l] > 0) coef[l] += glog / sp[l];
    }
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    for_each_layer(geoms, 1.0, [&](int64_t l, bool parallel) {
      thread_local Scratch<scalar_t> scratch;
      const Geom& g = geoms[l];
      backward_layer<scalar_t>(g, xp + g.x_off, up + g.y_off, coef[l], gp + g.w_off, scratch,
                               parallel);
    });
  });
  return wdtype == cdtype ? grad : grad.to(wdtype);
}

}  // namespace cpu
}  // namespace lipkern

TORCH_LIBRARY_IMPL(lipkern, CPU, m) {
  m.impl("power_iter_ext", &lipkern::cpu::power_iter_cpu);
  m.impl("power_iter_ext_backward", &lipkern::cpu::power_iter_backward_cpu);
}

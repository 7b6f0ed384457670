// CUDA kernels of the fused power iteration. Needs only the CUDA toolkit (no torch headers):
// CI compiles this file with `nvcc -arch=sm_90 -c`; power_iter_binding.cpp (compiled only
// when torch has CUDA) calls the launchers at the bottom on torch's current stream.
//
// v1 design (correct first; not yet run on a GPU in this repository's history):
//   forward:  one launch, grid = L layers, one block per layer running that layer's whole
//             iteration; phases (A x, A^T y, normalize) separated by __syncthreads. Each
//             thread computes whole output elements (direct conv; the adjoint is a gather,
//             so no atomics). The last block to finish (atomic ticket after a fence) writes
//             the product and the log-sum, then resets the ticket for the next launch.
//   backward: one launch, grid = (weight chunks, L); each thread one weight-gradient entry
//             g_l * sum_p out[co, p] * in[gathered(r, p)], with g_l from the three upstream
//             gradients (product of the other sigmas by a loop: no division).
// The persistent multi-block version (several blocks per layer, grid sync between phases,
// tensor cores) is the GPU tuning work of bench/NOTES.md.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../layout.h"

namespace lipkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();  // warp_part may still be read by a previous call
  if (lane == 0) warp_part[wid] = v;
  __syncthreads();
  T total = 0;
  for (int i = 0; i < kThreads / 32; ++i) total += warp_part[i];
  return total;  // every thread gets the sum
}

template <typename T>
__device__ T block_max(T v) {
  __shared__ T warp_part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) warp_part[wid] = v;
  __syncthreads();
  T m = 0;
  for (int i = 0; i < kThreads / 32; ++i) m = fmax(m, warp_part[i]);
  return m;  // every thread gets the max
}

__device__ inline int64_t wrap(int64_t i, int64_t n) { return ((i % n) + n) % n; }

// Input coordinate that output coordinate o reads at kernel tap k: o*s - p + k*d, wrapped for
// circular padding, -1 where it falls in zero padding.
__device__ inline int64_t input_coord(int64_t o, int64_t k, int64_t s, int64_t p, int64_t d,
                                      int64_t n, int64_t circular) {
  const int64_t i = o * s - p + k * d;
  if (circular) return wrap(i, n);
  return (i < 0 || i >= n) ? -1 : i;
}

__device__ inline Geom load_geom(const int64_t* __restrict__ meta, int64_t l) {
  const int64_t* r = meta + l * kMetaWidth;
  return Geom{r[0],  r[1],  r[2],  r[3],  r[4],  r[5],  r[6],  r[7],  r[8],  r[9],
              r[10], r[11], r[12], r[13], r[14], r[15], r[16], r[17], r[18], r[19]};
}

// dst (cout*oh*ow) = C src (cin*h*w); returns ||dst||^2 (to every thread), summed in double
// (N3 of python/lipkern/reference.py: float32 squares overflow above ~1.8e19).
template <typename T>
__device__ double conv_c(const Geom& g, const T* __restrict__ w, const T* __restrict__ src,
                    T* __restrict__ dst) {
  const int64_t P = g.oh * g.ow, cig = g.cig(), cog = g.cog(), R = g.red();
  double ss = 0;
  for (int64_t i = threadIdx.x; i < g.out_numel(); i += blockDim.x) {
    const int64_t co = i / P, p = i % P, oh = p / g.ow, ow = p % g.ow, grp = co / cog;
    const T* wr = w + co * R;
    T acc = 0;
    for (int64_t ci = 0; ci < cig; ++ci) {
      const T* plane = src + (grp * cig + ci) * g.h * g.w;
      for (int64_t kh = 0; kh < g.kh; ++kh) {
        const int64_t ih = input_coord(oh, kh, g.sh, g.ph, g.dh, g.h, g.circular);
        if (ih < 0) continue;
        for (int64_t kw = 0; kw < g.kw; ++kw) {
          const int64_t iw = input_coord(ow, kw, g.sw, g.pw, g.dw, g.w, g.circular);
          if (iw < 0) continue;
          acc += wr[(ci * g.kh + kh) * g.kw + kw] * plane[ih * g.w + iw];
        }
      }
    }
    dst[i] = acc;
    ss += double(acc) * acc;
  }
  return block_sum(ss);
}

// dst (cin*h*w) = C^T src (cout*oh*ow): input pixel (ih, iw) gathers the output pixels with
// oh*sh + kh*dh == ih + ph (+ t*h for circular padding, t in {-1, 0, 1} since ph <= h).
template <typename T>
__device__ double conv_ct(const Geom& g, const T* __restrict__ w, const T* __restrict__ src,
                     T* __restrict__ dst) {
  const int64_t P = g.oh * g.ow, HW = g.h * g.w, cig = g.cig(), cog = g.cog(), R = g.red();
  const int64_t wrap_n = g.circular ? 1 : 0;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < g.in_numel(); i += blockDim.x) {
    const int64_t c = i / HW, q = i % HW, ih = q / g.w, iw = q % g.w;
    const int64_t grp = c / cig, ci = c % cig;
    T acc = 0;
    for (int64_t co = grp * cog; co < (grp + 1) * cog; ++co) {
      const T* wr = w + co * R + ci * g.kh * g.kw;
      const T* yc = src + co * P;
      for (int64_t kh = 0; kh < g.kh; ++kh)
        for (int64_t th = -wrap_n; th <= wrap_n; ++th) {
          const int64_t nh = ih + g.ph - kh * g.dh + th * g.h;
          if (nh < 0 || nh % g.sh) continue;
          const int64_t oh = nh / g.sh;
          if (oh >= g.oh) continue;
          for (int64_t kw = 0; kw < g.kw; ++kw)
            for (int64_t tw = -wrap_n; tw <= wrap_n; ++tw) {
              const int64_t nw = iw + g.pw - kw * g.dw + tw * g.w;
              if (nw < 0 || nw % g.sw) continue;
              const int64_t ow = nw / g.sw;
              if (ow >= g.ow) continue;
              acc += wr[kh * g.kw + kw] * yc[oh * g.ow + ow];
            }
        }
    }
    dst[i] = acc;
    ss += double(acc) * acc;
  }
  return block_sum(ss);
}

// y = A x; returns ||y||^2
template <typename T>
__device__ double apply_a(const Geom& g, const T* w, const T* x, T* y) {
  return g.kind == kConvT ? conv_ct(g, w, x, y) : conv_c(g, w, x, y);
}

// xn = A^T y; returns ||xn||^2
template <typename T>
__device__ double apply_at(const Geom& g, const T* w, const T* y, T* xn) {
  return g.kind == kConvT ? conv_c(g, w, y, xn) : conv_ct(g, w, y, xn);
}

template <typename T>
__device__ void scale_into(const T* src, T* dst, int64_t n, T s) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i] * s;
}

// The floor of an operator image's norm (N1 of reference.py): max(norm, f) with
// f = max(eps * min(1, max|W|), tiny). f <= eps, so max|W| (a block-wide pass over W) is read
// only for a norm below eps. Block-uniform: every thread holds the same norm.
template <typename T>
struct ImageFloor {
  const T* w;
  int64_t n;
  T eps;
  T value;
  __device__ T at(T norm) {
    if (norm >= eps) return norm;
    if (value < 0) {
      T m = 0;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmax(m, fabs(w[i]));
      m = block_max(m);
      const T tiny = sizeof(T) == 4 ? T(1.1754943508222875e-38) : T(2.2250738585072014e-308);
      value = fmax(eps * fmin(m, T(1)), tiny);
    }
    return fmax(norm, value);
  }
};

// dst = src / max(||src||, eps), or the normalized fallback vector
// (lipkern.layout.fallback_vector, exact uint32 arithmetic) for an all-zero or non-finite
// src (N4). Block-wide.
template <typename T>
__device__ void start_into(const T* src, T* dst, int64_t n, T e) {
  double s2 = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s2 += double(src[i]) * src[i];
  const double n0 = sqrt(block_sum(s2));
  if (isfinite(n0) && n0 > 0) {
    scale_into(src, dst, n, T(1) / fmax(T(n0), e));
    return;
  }
  double f2 = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const uint32_t h = uint32_t(i) * 2654435761u + 1013904223u;
    const T v = T(double(h) / 4294967296.0 - 0.5);
    dst[i] = v;
    f2 += double(v) * v;
  }
  const T inv = T(1) / fmax(T(sqrt(block_sum(f2))), e);
  __syncthreads();
  scale_into(dst, dst, n, inv);
}

// The adjoint half-step after u_raw = A x (ss = ||u_raw||^2): u = u_raw / max(||u_raw||, f)
// in place, x = A^T u / max(||A^T u||, f); returns ||A^T u||. Both halves normalized (N2):
// nothing of size sigma^2 is formed.
template <typename T>
__device__ T adjoint_half_step(const Geom& g, const T* w, T* xl, T* ul, T* xnl, double ss,
                               ImageFloor<T>& f) {
  const int64_t nx = g.x_numel(), ny = g.y_numel();
  const T cu = T(1) / f.at(T(sqrt(ss)));
  __syncthreads();
  scale_into(ul, ul, ny, cu);
  __syncthreads();
  const T t = T(sqrt(apply_at(g, w, ul, xnl)));
  const T inv = T(1) / f.at(t);
  __syncthreads();
  scale_into(xnl, xl, nx, inv);
  __syncthreads();
  return t;
}

// The default update on one layer (block-wide): x normalized on entry; leaves u = A x / sigma
// and returns sigma = ||A x||.
template <typename T>
__device__ T power_iter_layer(const Geom& g, const T* w, T* xl, T* ul, T* xnl, int64_t n_iters,
                              T e, T tol) {
  const int64_t ny = g.y_numel();
  ImageFloor<T> f{w, g.w_numel(), e, T(-1)};
  T s_prev = -1;
  double sig2 = 0;
  bool have_y = false;
  for (int64_t k = 0; k < n_iters; ++k) {
    sig2 = apply_a(g, w, xl, ul);  // block_sum synchronizes: y complete below
    const T sk = T(sqrt(sig2));
    if (tol >= 0 && k > 0 && fabs(sk - s_prev) <= tol * sk) {  // same value in all threads
      have_y = true;
      break;
    }
    s_prev = sk;
    adjoint_half_step(g, w, xl, ul, xnl, sig2, f);
  }
  if (!have_y) sig2 = apply_a(g, w, xl, ul);
  __syncthreads();
  const T sigma = T(sqrt(sig2));
  const T inv = T(1) / f.at(sigma);
  __syncthreads();
  scale_into(ul, ul, ny, inv);
  return sigma;
}

// torch's spectral_norm update on one layer (block-wide): per iteration u = normalize(A x),
// x = normalize(A^T u); sigma = u^T A x = t * (t / max(t, f)) with t = ||A^T u|| after an
// iteration (x is A^T u normalized; no t^2 to overflow), <x0, A^T u0> with none (eval mode).
template <typename T>
__device__ T power_iter_sn(const Geom& g, const T* w, const T* u0, T* xl, T* ul, T* xnl,
                           int64_t n_iters, T e) {
  const int64_t nx = g.x_numel(), ny = g.y_numel();
  ImageFloor<T> f{w, g.w_numel(), e, T(-1)};
  if (n_iters == 0) {
    start_into(u0, ul, ny, e);
    __syncthreads();
    apply_at(g, w, ul, xnl);
    T d = 0;
    for (int64_t i = threadIdx.x; i < nx; i += blockDim.x) d += xl[i] * xnl[i];
    return block_sum(d);
  }
  T t = 0;
  for (int64_t k = 0; k < n_iters; ++k) {
    const double ss = apply_a(g, w, xl, ul);
    t = adjoint_half_step(g, w, xl, ul, xnl, ss, f);
  }
  return t * (t / f.at(t));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    power_iter_fwd(const int64_t* __restrict__ meta, const T* const* __restrict__ weights,
                   int64_t L, const T* __restrict__ x0, const T* __restrict__ u0,
                   T* __restrict__ x, T* __restrict__ u,
                   T* __restrict__ xn, T* __restrict__ sig, T* __restrict__ lip,
                   T* __restrict__ loglip, unsigned int* __restrict__ ticket, int64_t n_iters,
                   double eps, double tol) {
  const int64_t l = blockIdx.x;
  const Geom g = load_geom(meta, l);
  const T* w = weights[l];
  const int64_t nx = g.x_numel();
  T* xl = x + g.x_off;
  T* ul = u + g.y_off;
  T* xnl = xn + g.x_off;
  const T e = T(eps);

  start_into(x0 + g.x_off, xl, nx, e);
  __syncthreads();

  T sigma;
  if (u0) {  // torch's spectral_norm update (see power_iter_sn)
    sigma = power_iter_sn(g, w, u0 + g.y_off, xl, ul, xnl, n_iters, e);
  } else {
    sigma = power_iter_layer(g, w, xl, ul, xnl, n_iters, e, T(tol));
  }
  if (threadIdx.x == 0) sig[l] = sigma;

  // the network bound, by the last block to finish
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == unsigned(L - 1);
  __syncthreads();
  if (last && threadIdx.x == 0) {
    __threadfence();
    T p = 1, ls = 0;
    for (int64_t j = 0; j < L; ++j) {
      const T s = *(volatile T*)(sig + j);
      p *= s;
      ls += s > 0 ? log(s) : (s == 0 ? -INFINITY : NAN);  // N5: NaN stays NaN
    }
    *lip = p;
    *loglip = ls;
    *ticket = 0u;  // ready for the next launch on this stream
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    power_iter_bwd(const int64_t* __restrict__ meta, int64_t L, const T* __restrict__ x,
                   const T* __restrict__ u, const T* __restrict__ sig,
                   const T* __restrict__ grad_sigmas, const T* __restrict__ grad_lip,
                   const T* __restrict__ grad_log, T* __restrict__ grad) {
  const int64_t l = blockIdx.y;
  const Geom g = load_geom(meta, l);
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= g.w_numel()) return;
  // dLoss/dsigma_l without dividing by any sigma
  T coef = grad_sigmas ? grad_sigmas[l] : T(0);
  if (grad_lip && *grad_lip != T(0)) {
    T p = *grad_lip;
    for (int64_t j = 0; j < L; ++j)
      if (j != l) p *= sig[j];
    coef += p;
  }
  if (grad_log && sig[l] > 0) coef += *grad_log / sig[l];
  // sigma = <u, C x> (conv, dense) or <x, C u> (transposed)
  const T* in = g.kind == kConvT ? u + g.y_off : x + g.x_off;
  const T* out = g.kind == kConvT ? x + g.x_off : u + g.y_off;
  const int64_t R = g.red(), co = e / R, rr = e % R, grp = co / g.cog();
  const int64_t ci = rr / (g.kh * g.kw), kh = (rr / g.kw) % g.kh, kw = rr % g.kw;
  const int64_t P = g.oh * g.ow;
  const T* plane = in + (grp * g.cig() + ci) * g.h * g.w;
  const T* oc = out + co * P;
  T acc = 0;
  for (int64_t oh = 0; oh < g.oh; ++oh) {
    const int64_t ih = input_coord(oh, kh, g.sh, g.ph, g.dh, g.h, g.circular);
    if (ih < 0) continue;
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const int64_t iw = input_coord(ow, kw, g.sw, g.pw, g.dw, g.w, g.circular);
      if (iw < 0) continue;
      acc += oc[oh * g.ow + ow] * plane[ih * g.w + iw];
    }
  }
  grad[g.w_off + e] = coef * acc;
}

template <typename T>
cudaError_t forward_impl(const int64_t* meta, const void* const* weights, int64_t L,
                         const T* x0, const T* u0, T* x, T* u, T* xn, T* sig, T* lip,
                         T* loglip, unsigned int* ticket, int64_t n_iters, double eps,
                         double tol, cudaStream_t stream) {
  if (L <= 0 || L > 0x7fffffff) return cudaErrorInvalidValue;
  power_iter_fwd<T><<<unsigned(L), kThreads, 0, stream>>>(
      meta, reinterpret_cast<const T* const*>(weights), L, x0, u0, x, u, xn, sig, lip, loglip,
      ticket, n_iters, eps, tol);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const int64_t* meta, int64_t L, int64_t max_w_numel, const T* x,
                          const T* u, const T* sig, const T* gs, const T* gl, const T* glog,
                          T* grad, cudaStream_t stream) {
  if (L <= 0 || L > 65535 || max_w_numel <= 0) return cudaErrorInvalidValue;
  const dim3 grid(unsigned((max_w_numel + kThreads - 1) / kThreads), unsigned(L));
  power_iter_bwd<T><<<grid, kThreads, 0, stream>>>(meta, L, x, u, sig, gs, gl, glog, grad);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------- launchers (C ABI-ish)
// meta: (L, kMetaWidth) int64 on the device; weights: (L,) device pointers, contiguous, in
// the compute dtype; every other pointer is device memory of the compute dtype; ticket:
// one unsigned int, 0 on entry (left 0 on exit). u0: nullptr for the default update, else
// (total_y,) start left vectors of torch's spectral_norm update.
cudaError_t launch_forward_f32(const int64_t* meta, const void* const* weights, int64_t L,
                               const float* x0, const float* u0, float* x, float* u, float* xn,
                               float* sig, float* lip, float* loglip, unsigned int* ticket,
                               int64_t n_iters, double eps, double tol, cudaStream_t stream) {
  return forward_impl<float>(meta, weights, L, x0, u0, x, u, xn, sig, lip, loglip, ticket,
                             n_iters, eps, tol, stream);
}

cudaError_t launch_forward_f64(const int64_t* meta, const void* const* weights, int64_t L,
                               const double* x0, const double* u0, double* x, double* u,
                               double* xn, double* sig, double* lip, double* loglip, unsigned int* ticket,
                               int64_t n_iters, double eps, double tol, cudaStream_t stream) {
  return forward_impl<double>(meta, weights, L, x0, u0, x, u, xn, sig, lip, loglip, ticket,
                              n_iters, eps, tol, stream);
}

cudaError_t launch_backward_f32(const int64_t* meta, int64_t L, int64_t max_w_numel,
                                const float* x, const float* u, const float* sig,
                                const float* gs, const float* gl, const float* glog,
                                float* grad, cudaStream_t stream) {
  return backward_impl<float>(meta, L, max_w_numel, x, u, sig, gs, gl, glog, grad, stream);
}

cudaError_t launch_backward_f64(const int64_t* meta, int64_t L, int64_t max_w_numel,
                                const double* x, const double* u, const double* sig,
                                const double* gs, const double* gl, const double* glog,
                                double* grad, cudaStream_t stream) {
  return backward_impl<double>(meta, L, max_w_numel, x, u, sig, gs, gl, glog, grad, stream);
}

}  // namespace cuda
}  // namespace lipkern

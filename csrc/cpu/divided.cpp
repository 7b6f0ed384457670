// The first-order backward of a weight divided by its spectral norm, W / sigma with
// sigma = u^T A(W) x for constant vectors (strategy "mixed"'s divided layers:
// python/lipkern/nn/divided_weight.py, DividedBySigma):
//
//   grad_W = g / s + c D,   c = -<g, W> / s^2,   D = dsigma/dW = u x^T (matrix) or d (given)
//
// Shapes: g, w (rows, ...) with rows = w.size(0); u (rows,), x (numel / rows,) for the
// matrix (unused when d, weight-sized, is given: the conv operator's unit gradient); sigma
// one element; all of w's dtype (float32/float64). Returns a new contiguous tensor like w.
//
// in two passes over the weight (the dot, then one write) instead of the three ATen ops of
// the Python path (g / s into a new tensor, a dot on it, the rank-one or unit term added in
// place). The weights of a conv net do not fit in cache, so the passes are the cost
// (WRN-16-4: 11 MB of weights; bench/NOTES.md, issue 16, fifth session). The dot is summed
// per fixed block of rows and the blocks in order, in double: the result does not depend
// on the thread count. g / s is taken as g * (1 / s) (within an ulp of the division).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dense.h"

namespace lipkern {
namespace cpu {
namespace {

#define LIPKERN_DIVIDED_LOOPS(T)                                                            \
  /* out[i, j] = g[i, j] * inv_s + c * (d ? d[i, j] : u[i] * x[j]) for rows [r0, r1) */     \
  LIPKERN_CLONES void divided_rows(T* __restrict out, const T* __restrict g, int64_t n,     \
                                   int64_t r0, int64_t r1, T inv_s, T c,                   \
                                   const T* __restrict u, const T* __restrict x,           \
                                   const T* __restrict d) {                                \
    for (int64_t i = r0; i < r1; ++i) {                                                     \
      const T* __restrict gi = g + i * n;                                                   \
      T* __restrict oi = out + i * n;                                                       \
      if (d) {                                                                              \
        const T* __restrict di = d + i * n;                                                 \
        for (int64_t j = 0; j < n; ++j) oi[j] = gi[j] * inv_s + c * di[j];                  \
      } else {                                                                              \
        const T cu = c * u[i];                                                              \
        for (int64_t j = 0; j < n; ++j) oi[j] = gi[j] * inv_s + cu * x[j];                  \
      }                                                                                     \
    }                                                                                       \
  }

LIPKERN_DIVIDED_LOOPS(float)
LIPKERN_DIVIDED_LOOPS(double)

constexpr int64_t kBlock = 1 << 14;  // elements per block of rows (dot partials, threads)

template <typename T>
at::Tensor divided_backward_impl(const at::Tensor& g, const at::Tensor& w, const at::Tensor& s,
                                 const at::Tensor& u, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& d) {
  const int64_t rows = w.dim() ? w.size(0) : 1;
  int64_t n = 1;  // elements per row (also for a weight of 0 rows)
  for (int64_t k = 1; k < w.dim(); ++k) n *= w.size(k);
  TORCH_CHECK(d.has_value() || (u.numel() == rows && x.numel() == n),
              "divided_backward: u, x of ", u.numel(), " and ", x.numel(),
              " entries for a weight of ", rows, " rows of ", n);
  TORCH_CHECK(!d.has_value() || d->numel() == w.numel(),
              "divided_backward: d must have the weight's numel");
  const T* gp = g.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* up = u.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* dp = d.has_value() ? d->data_ptr<T>() : nullptr;
  const double sd = static_cast<double>(*s.data_ptr<T>());
  const int64_t per = std::max<int64_t>(1, kBlock / std::max<int64_t>(n, 1));  // rows/block
  const int64_t blocks = (rows + per - 1) / per;
  std::vector<double> part(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * per, r1 = std::min(rows, r0 + per);
      part[b] = static_cast<double>(dot_wide(gp + r0 * n, wp + r0 * n, (r1 - r0) * n));
    }
  });
  double dot = 0;
  for (double p : part) dot += p;
  const T inv_s = static_cast<T>(1.0 / sd);
  const T c = static_cast<T>(-(dot / sd) / sd);  // not dot / s^2: s^2 leaves double's range
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  T* op = out.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * per, r1 = std::min(rows, b1 * per);
    divided_rows(op, gp, n, r0, r1, inv_s, c, up, xp, dp);
  });
  return out;
}

at::Tensor divided_backward_cpu(const at::Tensor& g, const at::Tensor& w, const at::Tensor& s,
                                const at::Tensor& u, const at::Tensor& x,
                                const c10::optional<at::Tensor>& d) {
  const auto dt = w.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
              "divided_backward: float32 or float64 weights, got ", dt);
  for (const at::Tensor* t : {&g, &s, &u, &x})
    TORCH_CHECK(t->scalar_type() == dt, "divided_backward: every input in the weight's dtype");
  TORCH_CHECK(!d.has_value() || d->scalar_type() == dt,
              "divided_backward: d in the weight's dtype");
  TORCH_CHECK(g.sizes() == w.sizes(), "divided_backward: g must have the weight's shape");
  TORCH_CHECK(s.numel() == 1, "divided_backward: sigma must have one element");
  const at::Tensor gc = g.contiguous(), wc = w.contiguous(), uc = u.contiguous(),
                   xc = x.contiguous();
  const c10::optional<at::Tensor> dc =
      d.has_value() ? c10::optional<at::Tensor>(d->contiguous()) : c10::nullopt;
  return dt == at::kFloat ? divided_backward_impl<float>(gc, wc, s, uc, xc, dc)
                          : divided_backward_impl<double>(gc, wc, s, uc, xc, dc);
}

}  // namespace
}  // namespace cpu
}  // namespace lipkern

TORCH_LIBRARY_FRAGMENT(lipkern, m) {
  m.def("divided_backward(Tensor g, Tensor w, Tensor sigma, Tensor u, Tensor x, Tensor? d) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(lipkern, CPU, m) {
  m.impl("divided_backward", &lipkern::cpu::divided_backward_cpu);
}

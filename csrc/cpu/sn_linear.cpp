// One spectrally normalized Linear layer on the CPU, its power iteration riding inside its
// own matmul: lipkern::sn_linear (autograd), lipkern::sn_linear_forward and
// lipkern::sn_linear_backward (CPU kernels). Spec: python/lipkern/reference.py::sn_linear
// (torch's spectral_norm update and sigma, then y = x (W / sigma)^T + b).
//
// Why: a separate power-iteration pass streams every weight from DRAM once more per step
// (100 x 512^2 fp32: 100 MB, ~4 ms here), about as much as all of torch's per-layer
// normalization overhead divided by ten. The layer's own matmul already streams W, so the
// power iteration runs right after it, on a W that is hot in L2/L3:
//
//   forward   z = x W^T                     the layer's own GEMM (F.linear's call)
//             y1 = W v0, t = W^T y1         one pass over the hot W (row i: a dot, then an
//                                           axpy while the row is in L1)
//             u1 = y1 / ||y1||, v1 = t / ||t||, sigma = ||W^T u1||^2 / max(||W^T u1||, eps)
//                                           (= u1^T W v1, torch's sigma)
//             y = z / sigma + b             (B x out)
//   backward  g_z = g_y / sigma, g_sigma = -<g_z, z> / sigma
//             g_x = g_z W                                      one GEMM
//             g_W = [g_z; g_sigma u1]^T [x; v1]                 one GEMM, one extra row
//             g_b = sum of g_y rows
//
// so the normalization adds no weight-sized tensor and no DRAM pass over W to a training
// step. Each further iteration (n_iters > 1) is one more hot pass; n_iters = 0 (eval):
// sigma = u0^T (W v0), one hot pass. u0 and v0 are renormalized before use, as the fused
// op does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "dense.h"

namespace lipkern {
namespace cpu {
namespace {

using at::Tensor;

// rows x cols above which the hot passes split rows over the threads
constexpr int64_t kParallelNumel = 1 << 16;

// Tests set LIPKERN_POISON_OUTPUTS=1: every output and scratch buffer starts NaN, so a value
// the kernel forgot to write cannot pass for a result.
bool poison() {
  const char* v = std::getenv("LIPKERN_POISON_OUTPUTS");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

void poison_all(std::initializer_list<Tensor*> ts) {
  if (!poison()) return;
  for (Tensor* t : ts)
    if (t->numel()) t->fill_(std::numeric_limits<double>::quiet_NaN());
}

void check_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                   const Tensor& u, const Tensor& v, int64_t n_iters) {
  TORCH_CHECK(w.dim() == 2, "lipkern::sn_linear: weight must be 2-D (out, in), got ", w.dim(),
              "-D");
  const auto dt = w.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
              "lipkern::sn_linear: weight must be float32 or float64, got ", dt);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "lipkern::sn_linear: x must end in ",
              w.size(1), " features, got shape ", x.sizes());
  TORCH_CHECK(u.dim() == 1 && u.size(0) == w.size(0), "lipkern::sn_linear: u must be (",
              w.size(0), ",), got ", u.sizes());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == w.size(1), "lipkern::sn_linear: v must be (",
              w.size(1), ",), got ", v.sizes());
  TORCH_CHECK(!b.has_value() || (b->dim() == 1 && b->size(0) == w.size(0)),
              "lipkern::sn_linear: bias must be (", w.size(0), ",)");
  for (const Tensor* t : {&x, &u, &v})
    TORCH_CHECK(t->scalar_type() == dt, "lipkern::sn_linear: x, u, v must be ", dt);
  TORCH_CHECK(!b.has_value() || b->scalar_type() == dt, "lipkern::sn_linear: bias must be ", dt);
  TORCH_CHECK(n_iters >= 0, "lipkern::sn_linear: n_iters must be >= 0");
}

// (y (*x.shape[:-1], out), z (B, out), x_aug (B+1, in), sigma (), u_new (out,),
//  v_new (in,))
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sn_linear_forward_cpu(
    const Tensor& x_in, const Tensor& w_in, const std::optional<Tensor>& b_in,
    const Tensor& u_in, const Tensor& v_in, int64_t n_iters, double eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner mm: no autograd layer
  check_forward(x_in, w_in, b_in, u_in, v_in, n_iters);
  const Tensor w = w_in.contiguous(), x = x_in.contiguous(), u0 = u_in.contiguous(),
               v0 = v_in.contiguous();
  const Tensor b = b_in.has_value() ? b_in->contiguous() : Tensor();
  const int64_t out = w.size(0), in = w.size(1), B = in ? x.numel() / in : 0;
  const auto opt = w.options();
  Tensor xa = at::empty({B + 1, in}, opt);
  Tensor u_new = at::empty({out}, opt), v_new = at::empty({in}, opt);
  Tensor sigma = at::empty({}, opt);
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;
  Tensor y = at::empty(y_shape, opt);
  poison_all({&xa, &u_new, &v_new, &sigma, &y});
  // the layer's own GEMM, the call F.linear makes (x W^T: MKL packs W, which leaves it in
  // cache for the pass below; an extra row of x for W v0 would cost more than that pass:
  // MKL's 9-row sgemm took 27% longer than its 8-row one here)
  Tensor za = at::mm(x.view({B, in}), w.t());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lipkern_sn_linear_forward", [&] {
    using T = scalar_t;
    const T e = T(eps);
    T* xap = xa.data_ptr<T>();
    if (B) std::memcpy(xap, x.data_ptr<T>(), sizeof(T) * B * in);
    const T* W = w.data_ptr<T>();
    T* up = u_new.data_ptr<T>();
    T* vp = v_new.data_ptr<T>();
    const bool par = out * in >= kParallelNumel;
    thread_local std::vector<T> yk, xn;  // scratch, reused across calls
    yk.resize(out);
    xn.resize(in);
    normalize_into(v0.data_ptr<T>(), vp, in, eps);
    T s;
    if (n_iters == 0) {  // eval: sigma = u0^T W v0, one pass over the (hot) W
      normalize_into(u0.data_ptr<T>(), up, out, eps);
      dense_pass(out, in, W, vp, yk.data(), static_cast<T*>(nullptr), par);
      s = dot(up, yk.data(), out);
    } else {
      T t = 0;
      for (int64_t k = 0; k < n_iters; ++k) {
        // y = W v and xn = W^T y in one pass; u = y / ||y||, W^T u = xn / ||y||
        const T ms =
            std::max(std::sqrt(dense_pass(out, in, W, vp, yk.data(), xn.data(), par)), e);
        scale_into(yk.data(), up, out, T(1) / ms);
        t = std::sqrt(sumsq(xn.data(), in)) / ms;
        scale_into(xn.data(), vp, in, T(1) / (ms * std::max(t, e)));
      }
      s = t * t / std::max(t, e);  // = u^T W v
    }
    *sigma.data_ptr<T>() = s;
    copy_into(xap + B * in, vp, in);  // x_aug row B: v_new (the backward's rank-one row)
    const T* zp = za.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    for (int64_t r = 0; r < B; ++r)  // y = z / sigma + b
      for (int64_t j = 0; j < out; ++j)
        yp[r * out + j] = zp[r * out + j] / s + (bp ? bp[j] : T(0));
  });
  return {y, za, xa, sigma, u_new, v_new};
}

// (grad_x (B, in), grad_weight (out, in), grad_bias (out,)); empty where output_mask is false
std::tuple<Tensor, Tensor, Tensor> sn_linear_backward_cpu(
    const Tensor& gy_in, const Tensor& xa, const Tensor& w_in, const Tensor& za,
    const Tensor& sigma, const Tensor& u_new, std::array<bool, 3> mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor w = w_in.contiguous();
  const int64_t out = w.size(0), in = w.size(1), B = xa.size(0) - 1;
  TORCH_CHECK(gy_in.numel() == B * out, "lipkern::sn_linear_backward: grad_y has ",
              gy_in.numel(), " elements, expected ", B * out);
  TORCH_CHECK(gy_in.scalar_type() == w.scalar_type(),
              "lipkern::sn_linear_backward: grad_y must be ", w.scalar_type());
  const Tensor gy = gy_in.contiguous();
  const auto opt = w.options();
  Tensor ga = at::empty({B + 1, out}, opt);
  Tensor gb = at::empty({mask[2] ? out : 0}, opt);
  poison_all({&ga, &gb});
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lipkern_sn_linear_backward", [&] {
    using T = scalar_t;
    const T s = *sigma.data_ptr<T>();
    const T* g = gy.data_ptr<T>();
    const T* z = za.data_ptr<T>();
    T* a = ga.data_ptr<T>();
    T acc = 0;
    for (int64_t i = 0; i < B * out; ++i) {
      a[i] = g[i] / s;
      acc += a[i] * z[i];
    }
    scale_into(u_new.contiguous().data_ptr<T>(), a + B * out, out, -acc / s);  // g_sigma u
    if (mask[2]) {
      T* gbp = gb.data_ptr<T>();
      std::fill(gbp, gbp + out, T(0));
      for (int64_t r = 0; r < B; ++r) add_into(gbp, g + r * out, out);
    }
  });
  Tensor gx = mask[0] ? at::mm(ga.narrow(0, 0, B), w) : at::empty({0}, opt);
  Tensor gw = mask[1] ? at::mm(ga.t(), xa) : at::empty({0}, opt);
  return {gx, gw, gb};
}

// ---------------------------------------------------------------- autograd
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct SnLinearFunction : public torch::autograd::Function<SnLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                               const std::optional<Tensor>& b, const Tensor& u,
                               const Tensor& v, int64_t n_iters, double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lipkern::sn_linear_forward", "")
                         .typed<decltype(sn_linear_forward_cpu)>();
    ctx->set_materialize_grads(false);  // no zero-filled grads for sigma, u_new, v_new
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, za, xa, sigma, un, vn] =
        op.call(x, w, b, u, v, n_iters, eps);
    ctx->save_for_backward({xa, w, za, sigma, un});
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->mark_non_differentiable({sigma, un, vn});
    return {y, sigma, un, vn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lipkern::sn_linear_backward", "")
                         .typed<decltype(sn_linear_backward_cpu)>();
    const Tensor& gy = grads[0];
    variable_list out(7);
    if (!gy.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->needs_input_grad(2)};
    auto [gx, gw, gb] = op.call(gy, saved[0], saved[1], saved[2], saved[3], saved[4], mask);
    if (mask[0]) out[0] = gx.view(ctx->saved_data["x_sizes"].toIntVector());
    if (mask[1]) out[1] = gw;
    if (mask[2]) out[2] = gb;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> sn_linear_autograd(
    const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, const Tensor& u,
    const Tensor& v, int64_t n_iters, double eps) {
  auto r = SnLinearFunction::apply(x, w, b, u, v, n_iters, eps);
  return {r[0], r[1], r[2], r[3]};
}

// below autograd (inference mode): the forward, without what the backward would read
std::tuple<Tensor, Tensor, Tensor, Tensor> sn_linear_cpu(
    const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, const Tensor& u,
    const Tensor& v, int64_t n_iters, double eps) {
  auto [y, za, xa, sigma, un, vn] = sn_linear_forward_cpu(x, w, b, u, v, n_iters, eps);
  return {y, sigma, un, vn};
}

}  // namespace
}  // namespace cpu
}  // namespace lipkern

TORCH_LIBRARY_IMPL(lipkern, CPU, m) {
  m.impl("sn_linear", &lipkern::cpu::sn_linear_cpu);
  m.impl("sn_linear_forward", &lipkern::cpu::sn_linear_forward_cpu);
  m.impl("sn_linear_backward", &lipkern::cpu::sn_linear_backward_cpu);
}

TORCH_LIBRARY_IMPL(lipkern, Autograd, m) {
  m.impl("sn_linear", &lipkern::cpu::sn_linear_autograd);
}

// One spectrally normalized Linear layer on the CPU, its power iteration riding inside its
// own matmul: lipkern::sn_linear (autograd), lipkern::sn_linear_forward and
// lipkern::sn_linear_backward (CPU kernels); and lipkern::linear, the same matmul without
// the normalization (the benchmark's equal-matmul baseline). Spec:
// python/lipkern/reference.py::sn_linear (torch's spectral_norm update and sigma, then
// y = x (W / sigma)^T + b).
//
// Why: a separate power-iteration pass streams every weight from DRAM once more per step
// (100 x 512^2 fp32: 100 MB, ~4 ms here), about as much as all of torch's per-layer
// normalization overhead divided by ten. The layer's own matmul already streams W, so the
// power iteration rides on that stream:
//
//   forward   z = x W^T, y1 = W v0, t = W^T y1
//                 float32, up to kSkinnyMaxRows rows of x, AVX-512: ONE sweep over W
//                 (skinny.h: per pair of rows, 8 rows of x and v in one register-blocked
//                 loop, then t += y1_i W_i while the rows are in L1);
//                 otherwise the layer's own GEMM (F.linear's call), then one pass over the
//                 W it left in L2/L3 (dense.h: row i dotted, then axpy'd while in L1)
//             u1 = y1 / ||y1||, v1 = t / ||t||, sigma = ||W^T u1||^2 / max(||W^T u1||, eps)
//                                           (= u1^T W v1, torch's sigma)
//             y = z / sigma + b             (B x out)
//   backward  g_z = g_y / sigma, g_sigma = -<g_z, z> / sigma
//             g_x = g_z W                                      one GEMM
//             g_W = [g_z; g_sigma u1]^T [x; v1]                 one GEMM, one extra row
//             g_b = sum of g_y rows
//
// so the normalization adds no weight-sized tensor and no DRAM pass over W to a training
// step. Each further iteration (n_iters > 1) is one more pass over the (L2/L3-hot) W;
// n_iters = 0 (eval): sigma = u0^T (W v0), in the same sweep or pass. u0 and v0 are
// renormalized before use, as the fused op does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "dense.h"
#include "skinny.h"

namespace lipkern {
namespace cpu {
namespace {

using at::Tensor;

// rows x cols above which the hot passes split rows over the threads
constexpr int64_t kParallelNumel = 1 << 16;

// rows of x up to which float32 layers take the one-sweep kernel (skinny.h); above, MKL's
// GEMM then a pass (measured: bench/NOTES.md)
constexpr int64_t kSkinnyMaxRows = 32;

// Whether an (out, in) weight of this dtype times B rows of x takes the one-sweep kernel
// (skinny.h): float32, at most kSkinnyMaxRows rows, a non-empty W, AVX-512 at run time, and
// not LIPKERN_SN_LINEAR_SKINNY=0 (tests compare the two paths).
bool use_skinny(at::ScalarType dtype, int64_t B, int64_t out, int64_t in) {
  if (dtype != at::kFloat || B > kSkinnyMaxRows || in == 0 || out == 0 || !skinny_supported())
    return false;
  const char* v = std::getenv("LIPKERN_SN_LINEAR_SKINNY");
  return v == nullptr || v[0] != '0';
}

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
  TORCH_CHECK(w.size(0) > 0 && w.size(1) > 0, "lipkern::sn_linear: weight is empty (",
              w.sizes(), "): no spectral norm to divide by");
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

// The forward's first pass over W (rows out, cols in): yk = W v and, when xn, xn = W^T yk;
// on the skinny path (float32 only) it also writes z = x W^T (x: B rows). Returns ||yk||^2.
template <typename T>
T first_pass(bool /*skinny*/, int64_t out, int64_t in, const T* W, const T* /*x*/,
             int64_t /*B*/, T* /*z*/, const T* v, T* yk, T* xn, bool par) {
  return dense_pass(out, in, W, v, yk, xn, par);
}

template <>
float first_pass<float>(bool skinny, int64_t out, int64_t in, const float* W, const float* x,
                        int64_t B, float* z, const float* v, float* yk, float* xn, bool par) {
  return skinny ? skinny_pass(out, in, W, x, B, z, v, yk, xn, par)
                : dense_pass(out, in, W, v, yk, xn, par);
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
  // float32 at small batch (AVX-512): the layer's matmul and the first power iteration in
  // one sweep over W (skinny.h). Otherwise the layer's own GEMM, the call F.linear makes
  // (x W^T; MKL packs W, which leaves it in cache for the pass below).
  const bool skinny = use_skinny(w.scalar_type(), B, out, in);
  Tensor za = skinny ? at::empty({B, out}, opt) : at::mm(x.view({B, in}), w.t());
  if (skinny) poison_all({&za});
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lipkern_sn_linear_forward", [&] {
    using T = scalar_t;
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
    auto first = [&](bool with_xn) {
      return first_pass<T>(skinny, out, in, W, xap, B, za.data_ptr<T>(), vp, yk.data(),
                           with_xn ? xn.data() : nullptr, par);
    };
    T s;
    if (n_iters == 0) {  // eval: sigma = u0^T W v0, one pass over the (hot) W
      normalize_into(u0.data_ptr<T>(), up, out, eps);
      first(false);
      s = dot(up, yk.data(), out);
    } else {
      // image norms floored at eps * min(1, max|W|) (N1 of reference.py): torch's eps for
      // any weight with an entry >= 1, and no collapse of a layer whose sigma is below eps
      ImageFloor<T> f{W, out * in, eps};
      T t = 0;
      for (int64_t k = 0; k < n_iters; ++k) {
        // y = W v and xn = W^T y in one pass; u = y / ||y||, W^T u = xn / ||y||
        const double ss = k == 0 ? double(first(true))
                                 : dense_pass(out, in, W, vp, yk.data(), xn.data(), par);
        if (one_pass_ok(ss)) {
          const T ms = f.at(T(std::sqrt(ss)));
          scale_into(yk.data(), up, out, T(1) / ms);
          t = T(std::sqrt(sumsq(xn.data(), in)) / double(ms));
          scale_into(xn.data(), vp, in, T(1) / (ms * f.at(t)));
        } else {
          // ||W v||^2 outside [2^-60, 2^60] (sigma below ~1e-9 or above ~1e9): the one-pass
          // W^T (W v) and its float sums (of size sigma^2) may have under- or overflowed, so
          // the half-steps run separately, each normalized (N2, N3 of reference.py)
          const T ms = f.at(T(std::sqrt(sumsq(yk.data(), out))));
          scale_into(yk.data(), up, out, T(1) / ms);
          adjoint_rows(out, in, W, up, xn.data());
          t = T(std::sqrt(sumsq(xn.data(), in)));
          scale_into(xn.data(), vp, in, T(1) / f.at(t));
        }
      }
      s = t * (t / f.at(t));  // = u^T W v, without the square that could overflow
    }
    *sigma.data_ptr<T>() = s;
    copy_into(xap + B * in, vp, in);  // x_aug row B: v_new (the backward's rank-one row)
    const T* zp = za.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    div_rows(yp, zp, bp, s, B, out);  // y = z / sigma + b
  });
  return {y, za, xa, sigma, u_new, v_new};
}

// (grad_x (B, in), grad_weight (out, in), grad_bias (out,)); empty where output_mask is false
std::tuple<Tensor, Tensor, Tensor> sn_linear_backward_cpu(
    const Tensor& gy_in, const Tensor& xa, const Tensor& w_in, const Tensor& za,
    const Tensor& sigma, const Tensor& u_new, std::array<bool, 3> mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor w = w_in.contiguous();
  const int64_t out = w.size(0), B = xa.size(0) - 1;
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
    div_rows(a, g, static_cast<const T*>(nullptr), s, B, out);  // g_z = g_y / sigma
    const T acc = dot_wide(a, z, B * out);                      // <g_z, z>
    scale_into(u_new.contiguous().data_ptr<T>(), a + B * out, out, -acc / s);  // g_sigma u
    if (mask[2]) {
      T* gbp = gb.data_ptr<T>();
      std::fill(gbp, gbp + out, T(0));
      for (int64_t r = 0; r < B; ++r) add_into(gbp, g + r * out, out);
    }
  });
  Tensor gx = mask[0] ? at::mm(ga.as_strided({B, out}, {out, 1}), w) : at::empty({0}, opt);
  Tensor gw = mask[1] ? at::mm(ga.t(), xa) : at::empty({0}, opt);
  return {gx, gw, gb};
}

// ---------------------------------------------------------------- autograd
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// create_graph=True (gradient penalties): the same gradients as sn_linear_backward, written
// as differentiable ATen ops on the saved x, weight and bias, so autograd can differentiate
// them again. DESIGN's second-order rule: u_new and v_new are constants, so
// sigma(W) = u^T W v is linear in W -- its value the forward's sigma, its gradient u v^T.
variable_list differentiable_backward(const Tensor& gy, const variable_list& saved,
                                      const std::array<bool, 3>& mask) {
  const Tensor &xa = saved[0], &w = saved[1], &sigma = saved[3], &un = saved[4],
               &x = saved[6];
  const int64_t out = w.size(0), in = w.size(1), B = xa.size(0) - 1;
  const Tensor d = at::outer(un, xa.select(0, B));  // dsigma/dW = u v^T (constants)
  const Tensor s = sigma + ((w - w.detach()) * d).sum();
  const Tensor x2 = x.reshape({B, in}), gz = gy.reshape({B, out}) / s;
  const Tensor g_sigma = -(gz * at::mm(x2, w.t())).sum() / s;
  variable_list res(7);
  if (mask[0]) res[0] = at::mm(gz, w).view(x.sizes());
  if (mask[1]) res[1] = at::mm(gz.t(), x2) + g_sigma * d;
  if (mask[2]) res[2] = gy.reshape({B, out}).sum(0);
  return res;
}

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
    // b (or an undefined tensor) only says whether there is a bias: needs_input_grad counts
    // the inputs that are tensors, so without one index 2 is u, not the bias
    // x itself too (no copy): the second-order backward differentiates through it
    ctx->save_for_backward({xa, w, za, sigma, un, b.has_value() ? *b : Tensor(), x});
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
                                   saved[5].defined() && ctx->needs_input_grad(2)};
    if (at::GradMode::is_enabled()) return differentiable_backward(gy, saved, mask);
    auto [gx, gw, gb] = op.call(gy, saved[0], saved[1], saved[2], saved[3], saved[4], mask);
    if (mask[0]) {  // x's shape: grad_y's leading dimensions, then in
      std::vector<int64_t> x_sizes(gy.sizes().begin(), gy.sizes().end());
      x_sizes.back() = saved[1].size(1);
      out[0] = gx.view(x_sizes);
    }
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

// ---------------------------------------------------------------- lipkern::linear
// y = x W^T + b on the matmul sn_linear runs -- the skinny sweep (without v) where it
// applies, else F.linear's at::addmm -- and no normalization: the benchmark's unnormalized
// model on lipkern's matmul, so that the normalization's cost is measured at equal matmuls.
Tensor linear_cpu(const Tensor& x_in, const Tensor& w_in, const std::optional<Tensor>& b_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(w_in.dim() == 2, "lipkern::linear: weight must be 2-D (out, in)");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == w_in.size(1), "lipkern::linear: x must end in ",
              w_in.size(1), " features, got shape ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type(), "lipkern::linear: x must be ",
              w_in.scalar_type());
  TORCH_CHECK(!b_in.has_value() || (b_in->dim() == 1 && b_in->size(0) == w_in.size(0) &&
                                    b_in->scalar_type() == w_in.scalar_type()),
              "lipkern::linear: bias must be (", w_in.size(0), ",) ", w_in.scalar_type());
  const Tensor w = w_in.contiguous(), x = x_in.contiguous();
  const int64_t out = w.size(0), in = w.size(1), B = in ? x.numel() / in : 0;
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;
  if (!use_skinny(w.scalar_type(), B, out, in)) {
    const Tensor x2 = x.view({B, in});
    return (b_in.has_value() ? at::addmm(*b_in, x2, w.t()) : at::mm(x2, w.t())).view(y_shape);
  }
  Tensor y = at::empty(y_shape, w.options());
  poison_all({&y});
  float* yp = y.data_ptr<float>();
  skinny_pass(out, in, w.data_ptr<float>(), x.data_ptr<float>(), B, yp, nullptr, nullptr,
              nullptr, out * in >= kParallelNumel);
  if (b_in.has_value()) {
    const Tensor b = b_in->contiguous();
    const float* bp = b.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r) add_into(yp + r * out, bp, out);
  }
  return y;
}

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                               const std::optional<Tensor>& b) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lipkern::linear", "")
                         .typed<decltype(linear_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the CPU (or fake) kernel
    Tensor y = op.call(x, w, b);
    ctx->save_for_backward({x, w, b.has_value() ? *b : Tensor()});  // b: see SnLinearFunction
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(3);
    if (!grads[0].defined()) return out;
    auto saved = ctx->get_saved_variables();
    const Tensor& w = saved[1];
    const int64_t o = w.size(0), in = w.size(1);
    const Tensor g = grads[0].reshape({-1, o});
    if (ctx->needs_input_grad(0)) out[0] = at::mm(g, w).view(saved[0].sizes());
    if (ctx->needs_input_grad(1)) out[1] = at::mm(g.t(), saved[0].reshape({-1, in}));
    if (saved[2].defined() && ctx->needs_input_grad(2)) out[2] = g.sum(0);
    return out;
  }
};

Tensor linear_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  return LinearFunction::apply(x, w, b)[0];
}

}  // namespace
}  // namespace cpu
}  // namespace lipkern

TORCH_LIBRARY_IMPL(lipkern, CPU, m) {
  m.impl("sn_linear", &lipkern::cpu::sn_linear_cpu);
  m.impl("sn_linear_forward", &lipkern::cpu::sn_linear_forward_cpu);
  m.impl("sn_linear_backward", &lipkern::cpu::sn_linear_backward_cpu);
  m.impl("linear", &lipkern::cpu::linear_cpu);
}

TORCH_LIBRARY_IMPL(lipkern, Autograd, m) {
  m.impl("sn_linear", &lipkern::cpu::sn_linear_autograd);
  m.impl("linear", &lipkern::cpu::linear_autograd);
}

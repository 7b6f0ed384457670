// Torch binding of the CUDA kernels (csrc/cuda/power_iter.cu): compiled only when torch has
// CUDA (setup.py). Allocates outputs, builds the device tables, launches on the current
// stream and checks every launch; the kernels themselves see only raw pointers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <vector>

#include "../layout.h"

namespace lipkern {
namespace cuda {

cudaError_t launch_forward_f32(const int64_t*, const void* const*, int64_t, const float*,
                               const float*, float*, float*, float*, float*, float*, float*,
                               unsigned int*, int64_t, double, double, cudaStream_t);
cudaError_t launch_forward_f64(const int64_t*, const void* const*, int64_t, const double*,
                               const double*, double*, double*, double*, double*, double*,
                               double*, unsigned int*, int64_t, double, double, cudaStream_t);
cudaError_t launch_backward_f32(const int64_t*, int64_t, int64_t, const float*, const float*,
                                const float*, const float*, const float*, const float*, float*,
                                cudaStream_t);
cudaError_t launch_backward_f64(const int64_t*, int64_t, int64_t, const double*,
                                const double*, const double*, const double*, const double*,
                                const double*, double*, cudaStream_t);

namespace {

at::Tensor device_table(at::IntArrayRef values, const at::Device& device) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(device, /*non_blocking=*/true);
}

// One ticket per device; every launch leaves it at 0 (see the kernel).
at::Tensor ticket(const at::Device& device) {
  static std::mutex mu;
  static std::map<int, at::Tensor> tickets;
  std::lock_guard<std::mutex> lock(mu);
  auto it = tickets.find(device.index());
  if (it == tickets.end())
    it = tickets.emplace(device.index(),
                         at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device)))
             .first;
  return it->second;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> power_iter_cuda(
    at::TensorList weights, const at::Tensor& x0_in, const std::optional<at::Tensor>& u0_in,
    at::IntArrayRef meta, int64_t n_iters, double eps, double tol) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto geoms = parse_meta(meta.data(), meta.size());
  TORCH_CHECK(!weights.empty() && weights.size() == geoms.size(),
              "lipkern: weights and meta disagree on the number of layers");
  TORCH_CHECK(n_iters >= 0, "lipkern: n_iters must be >= 0");
  const at::Device device = x0_in.device();
  c10::cuda::CUDAGuard guard(device);
  const auto cdtype = weights[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> ws;
  std::vector<int64_t> ptrs;
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].device() == device, "lipkern: weights[", i, "] is not on ", device);
    TORCH_CHECK(weights[i].numel() == geoms[i].w_numel(), "lipkern: weights[", i,
                "] does not match meta");
    ws.push_back(weights[i].to(cdtype).contiguous());
    ptrs.push_back(reinterpret_cast<int64_t>(ws.back().data_ptr()));
  }
  const at::Tensor x0 = x0_in.to(cdtype).contiguous();
  int64_t total_x = 0, total_y = 0;
  for (const auto& g : geoms) {
    total_x += g.x_numel();
    total_y += g.y_numel();
  }
  TORCH_CHECK(x0.dim() == 1 && x0.numel() == total_x, "lipkern: x0 must be 1-D of ", total_x,
              " elements");
  const bool sn = u0_in.has_value();
  TORCH_CHECK(!sn || tol < 0, "lipkern: tol is not supported with u0 (variant spectral_norm)");
  const at::Tensor u0 = sn ? u0_in->to(cdtype).contiguous() : at::Tensor();
  TORCH_CHECK(!sn || (u0.dim() == 1 && u0.numel() == total_y && u0.device() == device),
              "lipkern: u0 must be 1-D of ", total_y, " elements on ", device);
  auto opt = x0.options();
  at::Tensor x = at::empty({x0.numel()}, opt), xn = at::empty({x0.numel()}, opt);
  at::Tensor u = at::empty({total_y}, opt), sig = at::empty({int64_t(geoms.size())}, opt);
  at::Tensor lip = at::empty({}, opt), loglip = at::empty({}, opt);
  at::Tensor meta_d = device_table(meta, device), ptr_d = device_table(ptrs, device);
  at::Tensor tk = ticket(device);
  auto stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  const auto* mp = meta_d.data_ptr<int64_t>();
  const auto* wp = reinterpret_cast<const void* const*>(ptr_d.data_ptr<int64_t>());
  auto* tp = reinterpret_cast<unsigned int*>(tk.data_ptr<int>());
  const int64_t L = geoms.size();
  if (cdtype == at::kFloat) {
    C10_CUDA_CHECK(launch_forward_f32(mp, wp, L, x0.data_ptr<float>(),
                                      sn ? u0.data_ptr<float>() : nullptr, x.data_ptr<float>(),
                                      u.data_ptr<float>(), xn.data_ptr<float>(),
                                      sig.data_ptr<float>(), lip.data_ptr<float>(),
                                      loglip.data_ptr<float>(), tp, n_iters, eps, tol, stream));
  } else {
    C10_CUDA_CHECK(launch_forward_f64(mp, wp, L, x0.data_ptr<double>(),
                                      sn ? u0.data_ptr<double>() : nullptr,
                                      x.data_ptr<double>(),
                                      u.data_ptr<double>(), xn.data_ptr<double>(),
                                      sig.data_ptr<double>(), lip.data_ptr<double>(),
                                      loglip.data_ptr<double>(), tp, n_iters, eps, tol,
                                      stream));
  }
  return {sig, lip, loglip, x, u};
}

at::Tensor power_iter_backward_cuda(const at::Tensor& x_in, const at::Tensor& u_in,
                                    const at::Tensor& sig_in,
                                    const std::optional<at::Tensor>& grad_sigmas,
                                    const std::optional<at::Tensor>& grad_lip,
                                    const std::optional<at::Tensor>& grad_log,
                                    at::IntArrayRef meta, at::ScalarType wdtype) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto geoms = parse_meta(meta.data(), meta.size());
  const at::Device device = x_in.device();
  c10::cuda::CUDAGuard guard(device);
  const auto cdtype = x_in.scalar_type();
  TORCH_CHECK(cdtype == at::kFloat || cdtype == at::kDouble, "lipkern: x must be fp32/fp64");
  const at::Tensor x = x_in.contiguous(), u = u_in.to(cdtype).contiguous(),
                   sig = sig_in.to(cdtype).contiguous();
  auto opt_in = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(cdtype).contiguous() : at::Tensor();
  };
  const at::Tensor gs = opt_in(grad_sigmas), gl = opt_in(grad_lip), glog = opt_in(grad_log);
  int64_t total_w = 0, max_w = 0;
  for (const auto& g : geoms) {
    total_w += g.w_numel();
    max_w = std::max(max_w, g.w_numel());
  }
  at::Tensor grad = at::empty({total_w}, x.options());
  at::Tensor meta_d = device_table(meta, device);
  auto stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t L = geoms.size();
  if (cdtype == at::kFloat) {
    auto p = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
    C10_CUDA_CHECK(launch_backward_f32(meta_d.data_ptr<int64_t>(), L, max_w, x.data_ptr<float>(),
                                       u.data_ptr<float>(), sig.data_ptr<float>(), p(gs), p(gl),
                                       p(glog), grad.data_ptr<float>(), stream));
  } else {
    auto p = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<double>() : nullptr; };
    C10_CUDA_CHECK(launch_backward_f64(meta_d.data_ptr<int64_t>(), L, max_w,
                                       x.data_ptr<double>(), u.data_ptr<double>(),
                                       sig.data_ptr<double>(), p(gs), p(gl), p(glog),
                                       grad.data_ptr<double>(), stream));
  }
  return wdtype == cdtype ? grad : grad.to(wdtype);
}

}  // namespace cuda
}  // namespace lipkern

TORCH_LIBRARY_IMPL(lipkern, CUDA, m) {
  m.impl("power_iter_ext", &lipkern::cuda::power_iter_cuda);
  m.impl("power_iter_ext_backward", &lipkern::cuda::power_iter_backward_cuda);
}

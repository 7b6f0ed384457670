// Schemas of the compiled ops, declared once; CPU and CUDA implementations register per
// dispatch key in their own files, fake kernels and autograd from Python
// (python/lipkern/ops/power_iter.py). A fragment: the Python custom ops share the namespace.
// u0 given selects torch's spectral_norm update (python/lipkern/reference.py, "variant").
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipkern, m) {
  m.def(
      "power_iter_ext(Tensor[] weights, Tensor x0, Tensor? u0, int[] meta, int n_iters, "
      "float eps, float tol) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "power_iter_ext_backward(Tensor x, Tensor u, Tensor sigmas, Tensor? grad_sigmas, "
      "Tensor? grad_lipschitz, Tensor? grad_log_lipschitz, int[] meta, "
      "ScalarType weight_dtype) -> Tensor");
  // One spectrally normalized Linear layer whose power iteration rides in its own matmul
  // (csrc/cpu/sn_linear.cpp; python/lipkern/ops/sn_linear.py). Differentiable in x, weight
  // and bias (a C++ autograd kernel); sigma, u_new and v_new are not differentiable.
  m.def(
      "sn_linear(Tensor x, Tensor weight, Tensor? bias, Tensor u, Tensor v, int n_iters, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // its two halves: the forward also returns what the backward reads (z = x W^T,
  // x_aug = [x; v_new]); the backward returns empty tensors for the gradients not asked for
  m.def(
      "sn_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor u, Tensor v, "
      "int n_iters, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sn_linear_backward(Tensor grad_y, Tensor x_aug, Tensor weight, Tensor z, "
      "Tensor sigma, Tensor u_new, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // y = x W^T + b on sn_linear's matmul without the normalization (same file): the
  // equal-matmul baseline of bench/bench_spectral_norm.py. Differentiable in x, weight, bias.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

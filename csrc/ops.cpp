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
}

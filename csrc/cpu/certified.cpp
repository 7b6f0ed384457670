// The certificate step of lipkern.certified_sigma on the CPU (python/lipkern/certified/):
// per frequency f, with B_f (n x m, complex64) the smaller-side factor of H_f = B_f B_f^H
// (or H_f itself), one pass that
//   1. forms the lower triangle of S = mu I - B B^H by blocked GEMM, block columns of
//      kBlock: (n/kBlock)(n/kBlock + 1)/2 of the (n/kBlock)^2 block products, 56% of the
//      full product's flops at n = 512 (BLAS has herk, but torch's MKL does not export it);
//   2. factors S in place (LAPACK potrf, called directly: torch's batched cholesky_ex copies
//      and transposes every matrix, measured 79 vs 32 ms for 13 matrices of 512, 1 thread);
//   3. bounds the Perron roots || |L| ||_2^2 and || |B| ||_2^2 from above (Collatz-Wielandt
//      with a few power steps), the two a-posteriori error terms of the
//      certificate (python/lipkern/certified/certify.py has the argument).
// Frequencies run in parallel (at::parallel_for); inside one, BLAS runs single-threaded
// (MKL inside an OpenMP region), one frequency holds < 2 MB at n = m = 512.
//
// Memory layout: tensors are row-major; LAPACK/BLAS read column-major, i.e. the transpose.
// For the row-major B (n x m) the column-major view is Bc = B^T (m x n) and
// Bc^H Bc = conj(B B^H) = (B B^H)^T: potrf factors conj(S), which has the same spectrum,
// the same success or failure and the same |L|. For a given H: likewise conj(H).
//
// BLAS/LAPACK symbols are looked up at run time (dlsym: torch's libtorch_cpu exports
// cgemm_/cpotrf_ when it is built with MKL or OpenBLAS); without them the op raises and
// python/lipkern/certified/ takes torch.linalg.cholesky_ex.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <tuple>
#include <vector>

namespace lipkern {
namespace cpu {
namespace {

using cf = std::complex<float>;
using gemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                        const cf*, const cf*, const int*, const cf*, const int*, const cf*,
                        cf*, const int*);
using potrf_t = void (*)(const char*, const int*, cf*, const int*, int*);

constexpr int kBlock = 64;      // block-column width of the lower-triangle GEMM
constexpr int kPerronIters = 3;  // power steps before the Collatz-Wielandt ratio

struct Lapack {
  gemm_t gemm = nullptr;
  potrf_t potrf = nullptr;
};

const Lapack& lapack() {
  static Lapack l = [] {
    Lapack r;
    r.gemm = reinterpret_cast<gemm_t>(dlsym(RTLD_DEFAULT, "cgemm_"));
    r.potrf = reinterpret_cast<potrf_t>(dlsym(RTLD_DEFAULT, "cpotrf_"));
    return r;
  }();
  return l;
}

// Upper bound of lambda_max(M^T M) for a nonnegative column-major M (rows x cols), given
// as floats. Collatz-Wielandt: max_i (M^T M x)_i / x_i for any x > 0, x from power steps
// (floored at 1e-6 of its max to stay positive). Float sums of nonnegative terms of length
// <= rows: <= rows u relative each, twice, and the division: the result is multiplied by
// (1 + (2 rows + 4) u) here (the caller adds (1 + 8 u) for the float moduli).
float dot_from(const float* a, const float* b, int lo, int hi) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // 8 lanes: vectorizes
  int i = lo;
  for (; i + 8 <= hi; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (; i < hi; ++i) s += a[i] * b[i];
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

double perron_upper(const float* m, int rows, int cols, bool lower_only) {
  std::vector<float> x(cols, 1.f), t(rows), y(cols);
  auto apply = [&]() {
    std::fill(t.begin(), t.end(), 0.f);
    for (int j = 0; j < cols; ++j) {
      const float* col = m + static_cast<int64_t>(j) * rows;
      const float xj = x[j];
      for (int i = lower_only ? j : 0; i < rows; ++i) t[i] += col[i] * xj;
    }
    for (int j = 0; j < cols; ++j)
      y[j] = dot_from(m + static_cast<int64_t>(j) * rows, t.data(), lower_only ? j : 0, rows);
  };
  for (int it = 0; it < kPerronIters; ++it) {
    apply();
    float mx = 0.f;
    for (float v : y) mx = std::max(mx, v);
    if (!(mx > 0.f)) return 0.0;  // M = 0
    for (int j = 0; j < cols; ++j) x[j] = std::max(y[j] / mx, 1e-6f);
  }
  apply();
  double r = 0.0;
  for (int j = 0; j < cols; ++j) r = std::max(r, static_cast<double>(y[j]) / x[j]);
  const double u = 5.9604644775390625e-08;  // 2^-24
  return r * (1.0 + (2.0 * rows + 4.0) * u);
}

// |z| as sqrt(re^2 + im^2) in float: <= 2.5 u relative (std::abs calls hypotf, ~5x
// slower here; the scaled entries are O(1), no overflow), inside the caller's (1 + 8 u)
inline float modulus(cf z) { return std::sqrt(z.real() * z.real() + z.imag() * z.imag()); }

// One frequency: S = mu I - B B^H (or mu I - conj(H)) into s (n x n, column-major lower),
// its Perron bound of |B| into *pb (not for a given H), potrf, and the Perron bound of |L|
// into *pl where it completed. bf: B row-major (n x m) = column-major Bc (m x n), or H.
int certify_one(const Lapack& lp, const cf* bf, int n, int m, bool is_gram, float muf,
                std::vector<cf>& s, std::vector<float>& absm, double* pl, double* pb) {
  s.assign(static_cast<size_t>(n) * n, cf(0.f, 0.f));
  if (is_gram) {  // S = mu I - conj(H), lower triangle (column-major)
    for (int j = 0; j < n; ++j)
      for (int i = j; i < n; ++i) {
        const int64_t k = i + static_cast<int64_t>(j) * n;
        s[k] = -bf[k];
      }
  } else {
    // lower blocks of -Bc^H Bc, Bc = the column-major (m x n) view of B
    const cf alpha(-1.f, 0.f), beta(1.f, 0.f);
    for (int j0 = 0; j0 < n; j0 += kBlock) {
      const int nb = std::min(kBlock, n - j0);
      const int rows = n - j0;
      lp.gemm("C", "N", &rows, &nb, &m, &alpha, bf + static_cast<int64_t>(j0) * m, &m,
              bf + static_cast<int64_t>(j0) * m, &m, &beta,
              s.data() + j0 + static_cast<int64_t>(j0) * n, &n);
    }
    absm.resize(static_cast<size_t>(n) * m);
    for (int64_t k = 0; k < static_cast<int64_t>(n) * m; ++k) absm[k] = modulus(bf[k]);
    *pb = perron_upper(absm.data(), m, n, false);
  }
  for (int j = 0; j < n; ++j) s[j + static_cast<int64_t>(j) * n] += cf(muf, 0.f);
  int inf = 0;
  lp.potrf("L", &n, s.data(), &n, &inf);
  if (inf == 0) {
    absm.resize(static_cast<size_t>(n) * n);
    for (int j = 0; j < n; ++j)
      for (int i = j; i < n; ++i) {
        const int64_t k = i + static_cast<int64_t>(j) * n;
        absm[k] = modulus(s[k]);
      }
    *pl = perron_upper(absm.data(), n, n, true);
  }
  return inf;
}

const Lapack& checked_lapack() {
  const Lapack& lp = lapack();
  TORCH_CHECK(lp.gemm && lp.potrf,
              "certify_frequencies: cgemm_/cpotrf_ not found in the loaded BLAS/LAPACK");
  return lp;
}

}  // namespace

// side: (F, n, m) complex64 rows B_f with H_f = B_f B_f^H (is_gram false), or (F, n, n)
// H_f itself (is_gram true; only its lower triangle read). mu: (F,) float32 trial values.
// Returns (info (F,) int32: 0 where the factorization completed, perron_l (F,) float64
// >= || |L_f| ||_2^2 (0 where it failed), perron_b (F,) float64 >= || |B_f| ||_2^2 (0 for
// is_gram)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> certify_frequencies_cpu(
    const at::Tensor& side_in, const at::Tensor& mu_in, bool is_gram) {
  TORCH_CHECK(side_in.scalar_type() == at::kComplexFloat && side_in.dim() == 3,
              "certify_frequencies: side must be (F, n, m) complex64, got ",
              side_in.scalar_type(), " of dim ", side_in.dim());
  TORCH_CHECK(mu_in.scalar_type() == at::kFloat && mu_in.dim() == 1 &&
                  mu_in.size(0) == side_in.size(0),
              "certify_frequencies: mu must be (F,) float32");
  const Lapack& lp = checked_lapack();
  const at::Tensor side = side_in.contiguous();
  const at::Tensor mu = mu_in.contiguous();
  const int64_t nf = side.size(0);
  const int n = static_cast<int>(side.size(1));
  const int m = static_cast<int>(side.size(2));
  TORCH_CHECK(!is_gram || n == m, "certify_frequencies: a Gram side must be square");
  auto info = at::zeros({nf}, side.options().dtype(at::kInt));
  auto pl = at::zeros({nf}, side.options().dtype(at::kDouble));
  auto pb = at::zeros({nf}, side.options().dtype(at::kDouble));
  const cf* sp = reinterpret_cast<const cf*>(side.data_ptr<c10::complex<float>>());
  const float* mup = mu.data_ptr<float>();
  int* infop = info.data_ptr<int>();
  double* plp = pl.data_ptr<double>();
  double* pbp = pb.data_ptr<double>();
  at::parallel_for(0, nf, 1, [&](int64_t b0, int64_t b1) {
    std::vector<cf> s;
    std::vector<float> absm;
    for (int64_t f = b0; f < b1; ++f)
      infop[f] = certify_one(lp, sp + f * static_cast<int64_t>(n) * m, n, m, is_gram, mup[f],
                             s, absm, plp + f, pbp + f);
  });
  return {info, pl, pb};
}

// The frequency path without its (G, F, co, ci) intermediate: each frequency's matrix
// A_f = sum_q T_q (cos + i sin)(angle_fq) is formed in the thread's buffer (float32 sums of
// Q terms in tap order, the error gram.py bounds), as B = A (left, n = co) or B = A^H
// (n = ci), then certified as above. taps: (G, Q, co, ci) float32 (tap-major); ph: (F, Q, 2) float32
// (cos, sin); ids: (K,) int64 indices g * F + f to do; mu: (K,) float32. Returns as
// certify_frequencies, per entry of ids.
std::tuple<at::Tensor, at::Tensor, at::Tensor> certify_taps_cpu(
    const at::Tensor& taps_in, const at::Tensor& ph_in, const at::Tensor& ids_in,
    const at::Tensor& mu_in, bool left) {
  TORCH_CHECK(taps_in.scalar_type() == at::kFloat && taps_in.dim() == 4,
              "certify_taps: taps must be (G, Q, co, ci) float32");
  TORCH_CHECK(ph_in.scalar_type() == at::kFloat && ph_in.dim() == 3 && ph_in.size(2) == 2 &&
                  ph_in.size(1) == taps_in.size(1),
              "certify_taps: ph must be (F, Q, 2) float32");
  TORCH_CHECK(ids_in.scalar_type() == at::kLong && ids_in.dim() == 1,
              "certify_taps: ids must be (K,) int64");
  TORCH_CHECK(mu_in.scalar_type() == at::kFloat && mu_in.dim() == 1 &&
                  mu_in.size(0) == ids_in.size(0),
              "certify_taps: mu must be (K,) float32");
  const Lapack& lp = checked_lapack();
  const at::Tensor taps = taps_in.contiguous(), ph = ph_in.contiguous();
  const at::Tensor ids = ids_in.contiguous(), mu = mu_in.contiguous();
  const int64_t gr = taps.size(0), nf = ph.size(0), nk = ids.size(0);
  const int nq = static_cast<int>(taps.size(1));
  const int co = static_cast<int>(taps.size(2)), ci = static_cast<int>(taps.size(3));
  const int n = left ? co : ci, m = left ? ci : co;
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t k = 0; k < nk; ++k)
    TORCH_CHECK(idp[k] >= 0 && idp[k] < gr * nf, "certify_taps: ids out of range");
  auto info = at::zeros({nk}, taps.options().dtype(at::kInt));
  auto pl = at::zeros({nk}, taps.options().dtype(at::kDouble));
  auto pb = at::zeros({nk}, taps.options().dtype(at::kDouble));
  const float* tp = taps.data_ptr<float>();
  const float* php = ph.data_ptr<float>();
  const float* mup = mu.data_ptr<float>();
  int* infop = info.data_ptr<int>();
  double* plp = pl.data_ptr<double>();
  double* pbp = pb.data_ptr<double>();
  at::parallel_for(0, nk, 1, [&](int64_t b0, int64_t b1) {
    const int64_t e_len = static_cast<int64_t>(co) * ci;
    std::vector<cf> s, bbuf(static_cast<size_t>(n) * m);
    std::vector<float> absm, re(e_len), im(e_len);
    for (int64_t k = b0; k < b1; ++k) {
      const int64_t g = idp[k] / nf, f = idp[k] % nf;
      const float* tg = tp + g * nq * e_len;
      const float* pf = php + f * nq * 2;
      std::fill(re.begin(), re.end(), 0.f);
      std::fill(im.begin(), im.end(), 0.f);
      for (int q = 0; q < nq; ++q) {  // tap-major: contiguous, vectorized
        const float* t = tg + q * e_len;
        const float c = pf[2 * q], sn = pf[2 * q + 1];
        for (int64_t e = 0; e < e_len; ++e) {
          re[e] += t[e] * c;
          im[e] += t[e] * sn;
        }
      }
      if (left) {
        for (int64_t e = 0; e < e_len; ++e) bbuf[e] = cf(re[e], im[e]);  // B = A
      } else {
        for (int o = 0; o < co; ++o)  // B = A^H: row c holds conj(A[:, c])
          for (int c = 0; c < ci; ++c) {
            const int64_t e = static_cast<int64_t>(o) * ci + c;
            bbuf[static_cast<int64_t>(c) * co + o] = cf(re[e], -im[e]);
          }
      }
      infop[k] = certify_one(lp, bbuf.data(), n, m, false, mup[k], s, absm, plp + k, pbp + k);
    }
  });
  return {info, pl, pb};
}

}  // namespace cpu
}  // namespace lipkern

TORCH_LIBRARY_FRAGMENT(lipkern, m) {
  m.def("certify_frequencies(Tensor side, Tensor mu, bool is_gram) -> (Tensor, Tensor, Tensor)");
  m.def("certify_taps(Tensor taps, Tensor ph, Tensor ids, Tensor mu, bool left) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lipkern, CPU, m) {
  m.impl("certify_frequencies", &lipkern::cpu::certify_frequencies_cpu);
  m.impl("certify_taps", &lipkern::cpu::certify_taps_cpu);
}

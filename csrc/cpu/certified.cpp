// The certificate step of lipkern.certified_sigma on the CPU (python/lipkern/certified/):
// per frequency f, with B_f (n x m, complex64) the smaller-side factor of H_f = B_f B_f^H
// (or H_f itself), one pass that
//   1. forms the lower triangle of S = mu I - B B^H by blocked GEMM, block columns of
//      kBlock: (n/kBlock)(n/kBlock + 1)/2 of the (n/kBlock)^2 block products, 56% of the
//      full product's flops at n = 512 (BLAS has herk, but torch's MKL does not export it);
//   2. factors S in place (cholesky_lower for n <= kOwnCholesky, else LAPACK potrf, called
//      directly: torch's batched cholesky_ex copies
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
#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <set>
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

// The element-wise loops (moduli, Perron steps, forming A_f, the small Cholesky) compiled
// for the x86-64 levels v4 (AVX-512) and v3 (AVX2 + FMA) and the baseline, chosen at load
// time by the CPU's features (GCC's ifunc; the build itself targets the baseline). Not
// "arch=skylake-avx512" / "arch=haswell": those dispatch on the CPU model, and a VM that
// reports a generic "Intel Xeon Processor" got the baseline (measured here: the small
// Cholesky 41 us against 11 us at n = 64). Loop indices are 64-bit: Python's -fwrapv makes
// 32-bit index arithmetic wrap, which stops the vectorizer (3x on the same loop).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define LIPKERN_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LIPKERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LIPKERN_CLONES
#endif

constexpr int kBlock = 64;      // block-column width of the lower-triangle GEMM
constexpr int kPerronIters = 3;   // power steps before the Collatz-Wielandt ratio
constexpr int kFormCols = 64;     // columns of A_f summed at once in form_blocks
constexpr int kOwnCholesky = 128; // cholesky_lower up to this n, LAPACK potrf above

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

LIPKERN_CLONES double perron_upper(const float* m, int rows, int cols, bool lower_only) {
  std::vector<float> x(cols, 1.f), t(rows), y(cols);
  auto apply = [&]() {
    std::fill(t.begin(), t.end(), 0.f);
    for (int64_t j = 0; j < cols; ++j) {
      const float* col = m + static_cast<int64_t>(j) * rows;
      const float xj = x[j];
      for (int64_t i = lower_only ? j : 0; i < rows; ++i) t[i] += col[i] * xj;
    }
    for (int64_t j = 0; j < cols; ++j)
      y[j] = dot_from(m + static_cast<int64_t>(j) * rows, t.data(), lower_only ? j : 0, rows);
  };
  for (int it = 0; it < kPerronIters; ++it) {
    apply();
    float mx = 0.f;
    for (float v : y) mx = std::max(mx, v);
    if (!(mx > 0.f)) return 0.0;  // M = 0
    for (int64_t j = 0; j < cols; ++j) x[j] = std::max(y[j] / mx, 1e-6f);
  }
  apply();
  double r = 0.0;
  for (int64_t j = 0; j < cols; ++j) r = std::max(r, static_cast<double>(y[j]) / x[j]);
  const double u = 5.9604644775390625e-08;  // 2^-24
  return r * (1.0 + (2.0 * rows + 4.0) * u);
}

// |z| as sqrt(re^2 + im^2) in float: <= 2.5 u relative (std::abs calls hypotf, ~5x
// slower here; the scaled entries are O(1), no overflow), inside the caller's (1 + 8 u)
static inline float modulus(cf z) { return std::sqrt(z.real() * z.real() + z.imag() * z.imag()); }

// || |B| ||^2 >= Perron bound for B (n x m row-major complex)
LIPKERN_CLONES double perron_of_side(const cf* bbuf, int n, int m, std::vector<float>& absm) {
  absm.resize(static_cast<size_t>(n) * m);
  for (int64_t k = 0; k < static_cast<int64_t>(n) * m; ++k) absm[k] = modulus(bbuf[k]);
  return perron_upper(absm.data(), m, n, false);
}

// || |L| ||^2 >= Perron bound for the lower triangle of the factored s (n x n column-major)
LIPKERN_CLONES double perron_of_lower(const std::vector<cf>& s, int n, std::vector<float>& absm) {
  absm.resize(static_cast<size_t>(n) * n);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = j; i < n; ++i) {
      const int64_t k = i + static_cast<int64_t>(j) * n;
      absm[k] = modulus(s[k]);
    }
  return perron_upper(absm.data(), n, n, true);
}

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
    *pb = perron_of_side(bf, n, m, absm);
  }
  for (int j = 0; j < n; ++j) s[j + static_cast<int64_t>(j) * n] += cf(muf, 0.f);
  int inf = 0;
  lp.potrf("L", &n, s.data(), &n, &inf);
  if (inf == 0) *pl = perron_of_lower(s, n, absm);
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

// ---------------------------------------------------------------- the whole layer in one call
// certify_layer: every frequency of one layer (python/lipkern/certified/certify.py,
// certify_cpp): the estimate, the Gram matrices and the certificate without a round trip.
//   1. for the frequencies in `top` (largest traces): form B_f, its Gram (lower blocks,
//      kept), the Perron bound of |B_f| and a Lanczos estimate of lambda_max;
//   2. mu = (largest estimate) (1 + margin), one trial for every frequency (in parallel,
//      the formed ones first, guided chunks): the Gram (kept from 1 or formed here), the
//      Cholesky factorization of mu I - H_f and the bound of |L| (Frobenius where it costs
//      <= 1/256 of mu; for n <= ~360 first at a trial lowered by the Frobenius term, which
//      certifies no more than mu and skips the Perron steps; else Perron);
//   3. the frequencies that failed (their estimate was low), in rounds: each estimated
//      further (retry_steps of Lanczos), then all factored at one trial (the largest of
//      their estimates x (1 + margin) and the last trial grown by the margin x 4 per round),
//      up to `rounds` trials. One trial per round for all: the bound does not depend on
//      which thread met which frequency first (it did when each retry raised a shared trial).
// Only the trial values, the factorizations' success and the Perron bounds are certified
// quantities; the estimates only choose the trials (a low estimate costs a round, never a
// wrong bound).

namespace {

// The Gram blocks of conj(H) = Bc^H Bc (column-major n x n): block columns of kBlock, each
// from its diagonal down (the diagonal blocks whole, both triangles).
void gram_blocks(const Lapack& lp, const cf* bf, int n, int m, cf* g, bool accumulate = false) {
  const cf one(1.f, 0.f), beta(accumulate ? 1.f : 0.f, 0.f);
  if (m == 0) {
    if (!accumulate) std::fill(g, g + static_cast<int64_t>(n) * n, beta);
    return;
  }
  for (int j0 = 0; j0 < n; j0 += kBlock) {
    const int nb = std::min(kBlock, n - j0);
    const int rows = n - j0;
    lp.gemm("C", "N", &rows, &nb, &m, &one, bf + static_cast<int64_t>(j0) * m, &m,
            bf + static_cast<int64_t>(j0) * m, &m, &beta, g + j0 + static_cast<int64_t>(j0) * n,
            &n);
  }
}

// g += h_1 + ... + h_k (h_c conjugated where conj[c]) over the region gram_blocks writes,
// column by column (a column of g stays in L1 across the k sources), each element's sum in
// the order c = 1..k: the same values as k passes adding one h_c at a time
LIPKERN_CLONES void add_cached(const cf* const* hs, const char* conj, int k, int n, cf* g) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c0 = static_cast<int64_t>(j) * n + (j / kBlock) * kBlock;
    float* b = reinterpret_cast<float*>(g + c0);
    const int64_t len = n - (j / kBlock) * kBlock;
    for (int64_t c = 0; c < k; ++c) {
      const float* a = reinterpret_cast<const float*>(hs[c] + c0);
      const float sgn = conj[c] ? -1.f : 1.f;
      for (int64_t i = 0; i < len; ++i) {
        b[2 * i] += a[2 * i];
        b[2 * i + 1] += sgn * a[2 * i + 1];
      }
    }
  }
}

// body(t) once per thread of at::parallel_for, each taking chunks [b, b + chunk) of [0, n)
// from a shared counter until none are left (dynamic scheduling: frequencies of one layer
// differ in cost, kept or formed, retried or not). body(next) returns the next chunk start.
// Per-thread buffers kept between calls: a 512-channel layer's buffers are ~30 MB, and
// fresh ones cost a page fault per 4 KiB (measured ~1.8 us each here: ~10 ms of a ~120 ms
// layer). Buffers past kKeepBytes are freed after each use (a large dense matrix).
constexpr size_t kKeepBytes = size_t(64) << 20;
// the Grams of frequencies whose first trial failed, kept for the retries up to this many
// bytes per call (a first trial far too low fails most frequencies: past this, those are
// formed again in the retry rounds instead of holding an (F, n, n) array)
constexpr int64_t kFailedKeepBytes = int64_t(256) << 20;

struct Scratch {
  std::vector<std::vector<cf>> bufs;
  std::vector<float> absm;
  std::vector<cf> tmp, own, s;
  std::vector<cf> kept, cgram;  // the calling thread's: read by every thread of one call

  template <class V>
  static void trim_one(V& v) {
    if (v.capacity() * sizeof(typename V::value_type) > kKeepBytes) V().swap(v);
  }
  void trim_work() {  // after each parallel body
    for (auto& b : bufs) trim_one(b);
    trim_one(absm), trim_one(tmp), trim_one(own), trim_one(s);
  }
  void trim_shared() { trim_one(kept), trim_one(cgram); }  // after the call
};

Scratch& scratch() {
  static thread_local Scratch sc;
  return sc;
}

template <class Body>
void dynamic_chunks(int64_t n, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next(0);
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) body(next);
    scratch().trim_work();
  });
}

// c_m of python/lipkern/certified/gram.py: |fl(x^H y) - x^H y| <= c_m |x|^T |y| (complex,
// length m, float32)
double inner_constant(int m) {
  const double c = 4.0 * (m + 4) * 5.9604644775390625e-08;
  return c / (1.0 - c);
}

// The Frobenius bounds replace a Perron bound where they cost at most a fraction of the
// trial: || |L| ||_2^2 <= ||L||_F^2 <= n mu / (1 - c_n) (tr(L L^H) = tr(S + E), tr S <= n mu,
// tr E <= c_n ||L||_F^2), so c_n || |L| ||^2 <= c_n n mu / (1 - c_n): n <= 128 at 1/256;
// and || |B| ||_2^2 <= ||B||_F^2 = tr H <= tr fl(H) / (1 - c_m) (the diagonal's terms are
// >= 0). Measured on ResNet-18's 512 x 512 frequencies: c_m tr H ~1.6% of lambda against
// ~1.0% for the Perron bound of |B| (|B| is dominated by its mean, whose Perron root is
// ~0.64 ||B||_F^2): the Frobenius bound costs ~0.3% on sigma there and saves the Perron steps
// (~8% of those layers' time); |L| is not (~6% against 0.3%).
constexpr double kFrobeniusShareL = 1.0 / 256.0;
constexpr double kFrobeniusShareB = 1.0 / 32.0;

// || |L| ||_2^2 <= ||L||_F^2 <= tr S / (1 - c_n) for the factor L of S (L L^H = S + E,
// |E| <= c_n |L| |L|^H: tr E <= c_n ||L||_F^2), tr S summed in double from S's float
// diagonal (n terms: <= (n + 2) 2^-53 relative, inside the 1e-12 for n <= 4e3, and the
// factor below for any n)
double frobenius_lower(double tr_s, int n) {
  return std::max(tr_s, 0.0) * (1.0 + 1e-12 + (n + 2) * 1.1102230246251565e-16) /
         (1.0 - inner_constant(n));
}

// sum_i fl(H)_ii in double (trial_below's input, and trace_bound's before rounding up)
double trace_of(const cf* g, int n) {
  double t = 0.0;
  for (int i = 0; i < n; ++i) t += static_cast<double>(g[i + static_cast<int64_t>(i) * n].real());
  return t;
}

// The trial t' <= t whose Frobenius certificate t' + c_n tr(t' I - H) / (1 - c_n) equals t
// (tr H: trace_of): a frequency far enough below t passes at t' without the Perron steps of
// |L| and certifies no more than t itself would (a choice of trial: any t' is sound)
double trial_below(double t, double tr_h, int n) {
  const double c = inner_constant(n);
  return std::min(t, (t * (1.0 - c) + c * tr_h) / (1.0 - c + c * n));
}

// The next chunk [b, b + *cnt) of [0, n) from the shared counter: *cnt = remaining / (2
// threads), within [1, cap] (guided: large chunks first, single items at the end). Returns
// n when none is left.
int64_t grab_chunk(std::atomic<int64_t>& next, int64_t n, int64_t cap, int64_t* cnt) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  int64_t cur = next.load();
  while (cur < n) {
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(cap, (n - cur) / (2 * nth)));
    if (next.compare_exchange_weak(cur, cur + want)) {
      *cnt = want;
      return cur;
    }
  }
  return n;
}

// sum_i fl(H)_ii / (1 - kappa), rounded up: >= ||B||_F^2 (kappa: the Gram's constant,
// |fl(H) - H| <= kappa |B| |B|^T, whose diagonal is H's own)
double trace_bound(const cf* g, int n, double kappa) {
  return trace_of(g, n) * (1.0 + 1e-12) / (1.0 - kappa);
}

// y = G x for the Hermitian G stored as gram_blocks leaves it (x, y: n complex).
void herm_matvec(const Lapack& lp, const cf* g, int n, const cf* x, cf* y) {
  const cf one(1.f, 0.f), zero(0.f, 0.f);
  const int ione = 1;
  std::fill(y, y + n, zero);
  for (int j0 = 0; j0 < n; j0 += kBlock) {
    const int nb = std::min(kBlock, n - j0);
    const int rows = n - j0;
    const cf* col = g + j0 + static_cast<int64_t>(j0) * n;
    // y[j0:] += G[j0:, j0:j0+nb] x[j0:j0+nb]   (the diagonal block and the blocks below)
    lp.gemm("N", "N", &rows, &ione, &nb, &one, col, &n, x + j0, &nb, &one, y + j0, &rows);
    const int below = rows - nb;
    if (below > 0)  // y[j0:j0+nb] += G[j0+nb:, j0:j0+nb]^H x[j0+nb:]   (the blocks above)
      lp.gemm("C", "N", &nb, &ione, &below, &one, col + nb, &n, x + j0 + nb, &below, &one,
              y + j0, &nb);
  }
}

// Number of eigenvalues below x of the symmetric tridiagonal (alpha, beta) (Sturm count
// by the LDL^T recurrence).
int sturm_below(const std::vector<double>& al, const std::vector<double>& be, double x) {
  int cnt = 0;
  double d = 1.0;
  for (size_t i = 0; i < al.size(); ++i) {
    const double b2 = i ? be[i - 1] * be[i - 1] : 0.0;
    d = al[i] - x - (i ? b2 / d : 0.0);
    if (d == 0.0) d = -1e-300;
    if (d < 0.0) ++cnt;
  }
  return cnt;
}

// Largest eigenvalue of the symmetric tridiagonal (alpha k, beta k-1) by bisection, and its
// eigenvector by two steps of inverse iteration (tridiagonal LU with partial pivoting).
double tridiag_top(const std::vector<double>& al, const std::vector<double>& be,
                   std::vector<double>& vec) {
  const int k = static_cast<int>(al.size());
  double lo = al[0], hi = al[0];
  for (int i = 0; i < k; ++i) {  // Gershgorin
    const double r = (i ? std::fabs(be[i - 1]) : 0.0) + (i + 1 < k ? std::fabs(be[i]) : 0.0);
    lo = std::min(lo, al[i] - r);
    hi = std::max(hi, al[i] + r);
  }
  for (int it = 0; it < 200 && hi - lo > 1e-15 * std::max(std::fabs(hi), 1e-300); ++it) {
    const double mid = 0.5 * (lo + hi);
    if (sturm_below(al, be, mid) == k) hi = mid; else lo = mid;
  }
  const double theta = hi;
  vec.assign(k, 1.0);
  const double shift = theta + 1e-10 * std::max(std::fabs(theta), 1e-300);
  for (int pass = 0; pass < 2; ++pass) {
    // solve (T - shift I) y = vec: rows i carry (sub, d, sup, sup2) after pivoting
    std::vector<double> d(k), up(k, 0.0), up2(k, 0.0), sub(k, 0.0), rhs = vec;
    for (int i = 0; i < k; ++i) {
      d[i] = al[i] - shift;
      if (i + 1 < k) up[i] = be[i];
      if (i) sub[i] = be[i - 1];
    }
    for (int i = 0; i + 1 < k; ++i) {  // eliminate sub[i + 1]
      if (std::fabs(sub[i + 1]) > std::fabs(d[i])) {  // swap rows i and i + 1
        std::swap(d[i], sub[i + 1]);
        std::swap(up[i], d[i + 1]);
        std::swap(up2[i], up[i + 1]);
        std::swap(rhs[i], rhs[i + 1]);
      }
      if (d[i] == 0.0) d[i] = 1e-300;
      const double f = sub[i + 1] / d[i];
      d[i + 1] -= f * up[i];
      up[i + 1] -= f * up2[i];
      rhs[i + 1] -= f * rhs[i];
    }
    if (d[k - 1] == 0.0) d[k - 1] = 1e-300;
    for (int i = k - 1; i >= 0; --i) {
      double v = rhs[i];
      if (i + 1 < k) v -= up[i] * vec[i + 1];
      if (i + 2 < k) v -= up2[i] * vec[i + 2];
      vec[i] = v / d[i];
    }
    double nrm = 0.0;
    for (double v : vec) nrm += v * v;
    nrm = std::sqrt(nrm);
    if (!(nrm > 0.0) || !std::isfinite(nrm)) {
      vec.assign(k, 0.0);
      vec[0] = 1.0;
      break;
    }
    for (double& v : vec) v /= nrm;
  }
  return theta;
}

// Lanczos with full reorthogonalization on the Hermitian G (gram_blocks layout) from x0:
// the largest Ritz value (an estimate from below of lambda_max, in exact arithmetic) and
// its Ritz vector (unit, n complex) into z. steps >= 1.
double lanczos_top(const Lapack& lp, const cf* g, int n, const cf* x0, int steps, cf* z) {
  steps = std::max(1, std::min(steps, n));
  std::vector<cf> basis(static_cast<size_t>(steps + 1) * n), w(n), h(steps + 1);
  const cf one(1.f, 0.f), zero(0.f, 0.f), mone(-1.f, 0.f);
  const int ione = 1;
  double nrm = 0.0;
  for (int i = 0; i < n; ++i) nrm += std::norm(x0[i]);
  nrm = std::sqrt(nrm);
  if (!(nrm > 0.0)) {
    std::fill(z, z + n, zero);
    return 0.0;
  }
  for (int i = 0; i < n; ++i) basis[i] = x0[i] / static_cast<float>(nrm);
  std::vector<double> alpha, beta;
  int k = 0;
  for (; k < steps; ++k) {
    const cf* vk = basis.data() + static_cast<int64_t>(k) * n;
    herm_matvec(lp, g, n, vk, w.data());
    double a = 0.0;
    for (int i = 0; i < n; ++i) a += (std::conj(vk[i]) * w[i]).real();
    alpha.push_back(a);
    // w -= V (V^H w), twice (classical Gram-Schmidt with reorthogonalization)
    const int cols = k + 1;
    for (int pass = 0; pass < 2; ++pass) {
      lp.gemm("C", "N", &cols, &ione, &n, &one, basis.data(), &n, w.data(), &n, &zero,
              h.data(), &cols);
      lp.gemm("N", "N", &n, &ione, &cols, &mone, basis.data(), &n, h.data(), &cols, &one,
              w.data(), &n);
    }
    double b = 0.0;
    for (int i = 0; i < n; ++i) b += std::norm(w[i]);
    b = std::sqrt(b);
    if (k + 1 == steps || !(b > 1e-7 * std::max(std::fabs(a), 1e-30))) {
      ++k;
      break;
    }
    beta.push_back(b);
    cf* vn = basis.data() + static_cast<int64_t>(k + 1) * n;
    for (int i = 0; i < n; ++i) vn[i] = w[i] / static_cast<float>(b);
  }
  alpha.resize(k);
  beta.resize(k - 1);
  std::vector<double> y;
  const double theta = tridiag_top(alpha, beta, y);
  std::fill(z, z + n, zero);
  for (int j = 0; j < k; ++j) {
    const float yj = static_cast<float>(y[j]);
    const cf* vj = basis.data() + static_cast<int64_t>(j) * n;
    for (int i = 0; i < n; ++i) z[i] += vj[i] * yj;
  }
  return theta;
}

// The symbol's column blocks (python/lipkern/certified/symbol.py lays the polyphase phases
// out as contiguous blocks of ci columns): with H = A A^H (left), H_f = sum_p A_f^p A_f^p^H
// over the blocks, and a block whose taps share their row shift (or column shift) has a
// Gram independent of f_h (or f_w): the common phase factor cancels. Such blocks' Grams are
// formed once per distinct key (the frequency's coordinates on the axes the block depends
// on) and added (a 3x3 stride-2 conv: of 4 phase blocks, one depends on (f_h, f_w), two on
// one axis each, one on neither). With H = A^H A (right) the whole A is one block.
struct Block {
  int col0 = 0, ncols = 0;  // columns [col0, col0 + ncols) of ci'
  std::vector<int> taps;    // the taps q used in this block
  std::vector<int> key_of;  // per frequency: its key's index (cached blocks)
  std::vector<char> conj_of;  // per frequency: its Gram is the conjugate of its key's
  std::vector<int64_t> rep; // per key: a frequency having it
};

// Rows [o0, o1) of A_f^p for the blocks `blks` of group g at the frequencies fs (count nb),
// concatenated per row: out[j] is (co x m_f) row-major complex for frequency fs[j]. Float32
// sums of the block's taps in tap order (the error gram.py bounds: Q terms at most).
LIPKERN_CLONES void form_blocks(const float* tg, const float* php, int nq, int co, int cip,
                                const std::vector<const Block*>& blks, const int64_t* fs, int nb,
                                int m_f, std::vector<std::vector<cf>>& out) {
  const int64_t e_len = static_cast<int64_t>(co) * cip;
  for (int64_t o = 0; o < co; ++o) {
    for (int64_t j = 0; j < nb; ++j) {
      const float* pf = php + fs[j] * nq * 2;
      float* b = reinterpret_cast<float*>(out[j].data() + static_cast<int64_t>(o) * m_f);
      int off = 0;
      for (const Block* bl : blks) {
        // chunks of kFormCols columns summed in local arrays (registers / L1), each
        // entry's sum in tap order, stored interleaved (re, im)
        const int nc = bl->ncols;
        float* bo = b + 2 * off;
        for (int c0 = 0; c0 < nc; c0 += kFormCols) {
          const int w = std::min(kFormCols, nc - c0);
          float r[kFormCols], im[kFormCols];
          for (int64_t c = 0; c < kFormCols; ++c) r[c] = im[c] = 0.f;
          for (int q : bl->taps) {
            const float* __restrict t =
                tg + q * e_len + static_cast<int64_t>(o) * cip + bl->col0 + c0;
            const float cs = pf[2 * q], sn = pf[2 * q + 1];
            if (w == kFormCols) {
              for (int64_t c = 0; c < kFormCols; ++c) {
                r[c] += t[c] * cs;
                im[c] += t[c] * sn;
              }
            } else {
              for (int64_t c = 0; c < w; ++c) {
                r[c] += t[c] * cs;
                im[c] += t[c] * sn;
              }
            }
          }
          float* __restrict d = bo + 2 * c0;
          for (int64_t c = 0; c < w; ++c) {
            d[2 * c] = r[c];
            d[2 * c + 1] = im[c];
          }
        }
        off += nc;
      }
    }
  }
}

// B = A^H (ci' x co) from A (co x ci') row-major, in place into bt.
void conj_transpose(const std::vector<cf>& a, int co, int cip, std::vector<cf>& bt) {
  bt.resize(static_cast<size_t>(co) * cip);
  for (int o = 0; o < co; ++o)
    for (int c = 0; c < cip; ++c)
      bt[static_cast<int64_t>(c) * co + o] = std::conj(a[static_cast<int64_t>(o) * cip + c]);
}

// sum over (g, o, c) of (sum_q |T_q[g, o, c]|)^2, in double, raised to cover the float sums
// of Q terms (<= Q u relative each, squared): for gram.py's sigma_err.
LIPKERN_CLONES double tap_abs_sq(const float* tp, int64_t gr, int nq, int64_t e_len) {
  double acc = 0.0;
  std::vector<float> sum(1024);
  for (int64_t g = 0; g < gr; ++g)
    for (int64_t e0 = 0; e0 < e_len; e0 += 1024) {
      const int64_t len = std::min<int64_t>(1024, e_len - e0);
      for (int64_t e = 0; e < len; ++e) sum[e] = 0.f;
      for (int64_t q = 0; q < nq; ++q) {
        const float* t = tp + (g * nq + q) * e_len + e0;
        for (int64_t e = 0; e < len; ++e) sum[e] += std::fabs(t[e]);
      }
      double part = 0.0;
      for (int64_t e = 0; e < len; ++e) part += static_cast<double>(sum[e]) * sum[e];
      acc += part;
    }
  const double u = 5.9604644775390625e-08;
  return acc * (1.0 + (2.0 * nq + 4.0) * u);
}


// The Cholesky factorization of the Hermitian n x n matrix whose lower triangle (and the
// real part of its diagonal) a holds, column-major, interleaved (re, im), in place: as
// LAPACK potrf("L") reads and writes it (the upper triangle untouched; the diagonal's
// imaginary parts read as 0). Returns 0, or k + 1 where pivot k is not > 0 (NaN included).
// For n <= kOwnCholesky: MKL's cpotrf takes 18 / 124 us at n = 64 / 128 here, this 11 / 64
// (panels of 4 columns: each trailing entry loaded and stored once per panel). Every entry
// is the standard recurrence l_ij = (a_ij - sum_k l_ik conj(l_jk)) / l_jj in some order of
// its terms, so the backward error bound the certificate uses (|E| <= c_n |L| |L|^H, any
// ordering, Higham Thm 10.3) holds as for potrf.
LIPKERN_CLONES int cholesky_lower(float* __restrict a, int n_) {
  const int64_t n = n_;
  const int64_t ld = 2 * n;
  constexpr int64_t P = 4;
  for (int64_t k0 = 0; k0 < n; k0 += P) {
    const int64_t k1 = std::min(n, k0 + P);
    for (int64_t k = k0; k < k1; ++k) {
      float* ck = a + k * ld;
      const float d = ck[2 * k];
      if (!(d > 0.f)) return static_cast<int>(k + 1);
      const float l = std::sqrt(d);
      ck[2 * k] = l; ck[2 * k + 1] = 0.f;
      for (int64_t i = 2 * (k + 1); i < ld; ++i) ck[i] /= l;  // division: as the analysis
      for (int64_t j = k + 1; j < k1; ++j) {
        float* cj = a + j * ld;
        const float cr = ck[2 * j], ci = ck[2 * j + 1];
        for (int64_t i = j; i < n; ++i) {
          const float lr = ck[2 * i], li = ck[2 * i + 1];
          cj[2 * i] -= lr * cr + li * ci;
          cj[2 * i + 1] -= li * cr - lr * ci;
        }
      }
    }
    const int64_t np = k1 - k0;
    const float* c0 = a + k0 * ld;
    if (np == P) {
      const float* c1 = c0 + ld; const float* c2 = c1 + ld; const float* c3 = c2 + ld;
      for (int64_t j = k1; j < n; ++j) {
        float* __restrict cj = a + j * ld;
        const float r0 = c0[2*j], i0 = c0[2*j+1], r1 = c1[2*j], i1 = c1[2*j+1];
        const float r2 = c2[2*j], i2 = c2[2*j+1], r3 = c3[2*j], i3 = c3[2*j+1];
        for (int64_t i = j; i < n; ++i) {
          float re = cj[2*i], im = cj[2*i+1];
          re -= c0[2*i] * r0 + c0[2*i+1] * i0; im -= c0[2*i+1] * r0 - c0[2*i] * i0;
          re -= c1[2*i] * r1 + c1[2*i+1] * i1; im -= c1[2*i+1] * r1 - c1[2*i] * i1;
          re -= c2[2*i] * r2 + c2[2*i+1] * i2; im -= c2[2*i+1] * r2 - c2[2*i] * i2;
          re -= c3[2*i] * r3 + c3[2*i+1] * i3; im -= c3[2*i+1] * r3 - c3[2*i] * i3;
          cj[2*i] = re; cj[2*i+1] = im;
        }
      }
    }  // (a last panel of < 4 columns ends at n: no trailing columns)
  }
  return 0;
}

// Factor mu I - G (G in gram_blocks layout, lower part read) in s; the Perron bound of |L|
// into *pl where it completed. Returns potrf's info.
// perron: bound || |L| ||^2 by Collatz-Wielandt, else by the Frobenius bound (see
// kFrobeniusShareL).
LIPKERN_CLONES int factor_shifted(const Lapack& lp, const cf* g, int n, float muf,
                                  std::vector<cf>& s, std::vector<float>& absm, double* pl,
                                  bool perron) {
  s.resize(static_cast<size_t>(n) * n);
  double tr_s = 0.0;  // tr S of the matrix factored (its float diagonal, summed in double)
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c0 = static_cast<int64_t>(j) * n;
    for (int64_t i = j; i < n; ++i) s[c0 + i] = -g[c0 + i];
    s[c0 + j] += cf(muf, 0.f);
    tr_s += static_cast<double>(s[c0 + j].real());
  }
  int inf = 0;
  if (n <= kOwnCholesky)
    inf = cholesky_lower(reinterpret_cast<float*>(s.data()), n);
  else
    lp.potrf("L", &n, s.data(), &n, &inf);
  if (inf == 0 && !perron) {
    *pl = frobenius_lower(tr_s, n);
  } else if (inf == 0) {
    *pl = perron_of_lower(s, n, absm);
  }
  return inf;
}

}  // namespace

// taps (G, Q, co, ci') float32 tap-major, ph (F, Q, 2) float32 (cos, sin), freqs (F, 2)
// int64 (f_h, f_w), used (P, Qh, Qw) uint8 (tap q reaches phase block p; the P blocks of
// ci' / P columns), order (G * F,) int64 a permutation of the flat ids g * F + f (largest
// traces first: its first n_top are estimated first, and the factorizations run in this
// order), start (n,) complex64 (the Lanczos start vector). Returns, per flat id: info int32
// (0: the last trial's factorization completed), trial float32 (the value factored),
// perron_l float64 >= || |L| ||^2 (0 where it failed), perron_b float64 >= || |B| ||^2
// (blocks formed once: the sum of their bounds, >= by Weyl), estimate float64 (0 where none
// was made), vectors (G * F, n) complex64 (the Ritz vectors of H_f in the row-major
// convention, zero where none was made); sum_(g, o, c) (sum_q |T_q|)^2 >= its exact value
// (gram.py's sigma_err); and kappa, the constant of H_f's rounding error bound
// |fl(H_f) - H_f| <= kappa |B_f| |B_f|^T (c_m for one block; below).
//
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, double>
certify_layer_cpu(const at::Tensor& taps_in, const at::Tensor& ph_in,
                  const at::Tensor& freqs_in, int64_t mh, int64_t mw, const at::Tensor& used_in,
                  const at::Tensor& order_in, int64_t n_top, const at::Tensor& start_in,
                  bool left, double margin, int64_t est_steps, int64_t retry_steps,
                  int64_t rounds) {
  TORCH_CHECK(taps_in.scalar_type() == at::kFloat && taps_in.dim() == 4,
              "certify_layer: taps must be (G, Q, co, ci) float32");
  TORCH_CHECK(ph_in.scalar_type() == at::kFloat && ph_in.dim() == 3 && ph_in.size(2) == 2 &&
                  ph_in.size(1) == taps_in.size(1),
              "certify_layer: ph must be (F, Q, 2) float32");
  TORCH_CHECK(freqs_in.scalar_type() == at::kLong && freqs_in.dim() == 2 &&
                  freqs_in.size(0) == ph_in.size(0) && freqs_in.size(1) == 2,
              "certify_layer: freqs must be (F, 2) int64");
  TORCH_CHECK(used_in.scalar_type() == at::kByte && used_in.dim() == 3 &&
                  used_in.size(1) * used_in.size(2) == taps_in.size(1) &&
                  taps_in.size(3) % used_in.size(0) == 0,
              "certify_layer: used must be (P, Qh, Qw) uint8 with Qh Qw = Q and P | ci");
  TORCH_CHECK(order_in.scalar_type() == at::kLong && order_in.dim() == 1,
              "certify_layer: order must be (G * F,) int64");
  TORCH_CHECK(est_steps >= 1 && retry_steps >= 1 && rounds >= 1 && margin > 0,
              "certify_layer: est_steps, retry_steps, rounds >= 1 and margin > 0");
  const Lapack& lp = checked_lapack();
  const at::Tensor taps = taps_in.contiguous(), ph = ph_in.contiguous();
  const at::Tensor order = order_in.contiguous(), fq = freqs_in.contiguous();
  const at::Tensor used = used_in.contiguous();
  const int64_t gr = taps.size(0), nf = ph.size(0), nt = gr * nf;
  TORCH_CHECK(mh >= 1 && mw >= 1, "certify_layer: the grid must be >= 1 x 1");
  TORCH_CHECK(order.numel() == nt && n_top >= 1 && n_top <= nt,
              "certify_layer: order must hold the G * F flat ids and 1 <= n_top <= G * F");
  const int64_t nk = n_top;
  const int nq = static_cast<int>(taps.size(1));
  const int co = static_cast<int>(taps.size(2)), cip = static_cast<int>(taps.size(3));
  const int n = left ? co : cip;
  TORCH_CHECK(start_in.scalar_type() == at::kComplexFloat && start_in.numel() == n,
              "certify_layer: start must be (n,) complex64");
  const at::Tensor start = start_in.contiguous();
  const int64_t* topp = order.data_ptr<int64_t>();
  std::vector<int64_t> slot(nt, -2);  // flat id -> its kept Gram (the top ids), else -1
  for (int64_t k = 0; k < nt; ++k) {
    TORCH_CHECK(topp[k] >= 0 && topp[k] < nt && slot[topp[k]] == -2,
                "certify_layer: order must be a permutation of the flat ids");
    slot[topp[k]] = k < nk ? k : -1;
  }
  // the blocks: per phase (left), or one (right); cached where keys repeat
  const int np = static_cast<int>(used.size(0)), uqw = static_cast<int>(used.size(2));
  const uint8_t* up = used.data_ptr<uint8_t>();
  const int64_t* fp = fq.data_ptr<int64_t>();
  std::vector<Block> blocks;
  for (int p = 0; p < (left ? np : 1); ++p) {
    Block b;
    b.col0 = left ? p * (cip / np) : 0;
    b.ncols = left ? cip / np : cip;
    std::vector<int> hs, wsh;
    for (int q = 0; q < nq; ++q) {
      bool u = false;
      for (int pp = (left ? p : 0); pp < (left ? p + 1 : np); ++pp) u = u || up[pp * nq + q];
      if (!u) continue;
      b.taps.push_back(q);
      hs.push_back(q / uqw);
      wsh.push_back(q % uqw);
    }
    const bool dep_h = std::set<int>(hs.begin(), hs.end()).size() > 1;
    const bool dep_w = std::set<int>(wsh.begin(), wsh.end()).size() > 1;
    // a key and its conjugate (-f on the dependent axes) share one Gram: A^p at -f is the
    // conjugate of A^p at f up to unit factors (real taps)
    std::map<std::pair<int64_t, int64_t>, std::pair<int, bool>> keys;
    b.key_of.resize(nf);
    b.conj_of.resize(nf);
    for (int64_t f = 0; f < nf; ++f) {
      const auto key = std::make_pair(dep_h ? fp[2 * f] : -1, dep_w ? fp[2 * f + 1] : -1);
      auto it = keys.find(key);
      if (it == keys.end()) {
        const int idx = static_cast<int>(b.rep.size());
        b.rep.push_back(f);
        it = keys.emplace(key, std::make_pair(idx, false)).first;
        const auto ck = std::make_pair(dep_h ? (mh - fp[2 * f]) % mh : -1,
                                       dep_w ? (mw - fp[2 * f + 1]) % mw : -1);
        if (ck != key) keys.emplace(ck, std::make_pair(idx, true));
      }
      b.key_of[f] = it->second.first;
      b.conj_of[f] = it->second.second;
    }
    if (!b.taps.empty()) blocks.push_back(std::move(b));
  }
  std::vector<const Block*> per_f, cached;
  for (const Block& b : blocks)
    (static_cast<int64_t>(b.rep.size()) < nf ? cached : per_f).push_back(&b);
  // the per-frequency part: form_cols columns of A_f formed per row; B_f = those columns
  // (left: n x m_f, m_f = form_cols) or A_f^H (right: the one block, n = ci', m_f = co)
  int form_cols = 0;
  for (const Block* b : per_f) form_cols += b->ncols;
  const int m_f = left ? form_cols : (per_f.empty() ? 0 : co);

  // The Gram's rounding constant kappa, |fl(H_f) - H_f| <= kappa |B| |B|^T entrywise (B all
  // of A_f's columns): every block's product errs by <= c_(its columns) |A^p| |A^p|^T
  // (any summation order), and H_f = fl(B_f B_f^H) + the cached blocks, added one by one:
  // k = #cached additions of real and imaginary parts, <= sqrt(2) gamma_k sum |terms|. So
  // kappa = c + sqrt(2) gamma_k (1 + c), c the largest block's constant: a 3x3 stride-2
  // conv's four blocks of ci columns give ~c_ci, not c_(4 ci).
  int widest = m_f;
  for (const Block* b : cached) widest = std::max(widest, left ? b->ncols : co);
  const double gam = cached.size() * 5.9604644775390625e-08 /
                     (1.0 - cached.size() * 5.9604644775390625e-08);
  const double kappa = (inner_constant(std::max(widest, 1)) +
                        std::sqrt(2.0) * gam * (1.0 + inner_constant(std::max(widest, 1)))) *
                       (1.0 + 1e-9);
  auto fopt = taps.options();
  auto info = at::zeros({nt}, fopt.dtype(at::kInt));
  auto trial = at::zeros({nt}, fopt);
  auto pl = at::zeros({nt}, fopt.dtype(at::kDouble));
  auto pb = at::zeros({nt}, fopt.dtype(at::kDouble));
  auto est = at::zeros({nt}, fopt.dtype(at::kDouble));
  auto vecs = at::zeros({nt, n}, fopt.dtype(at::kComplexFloat));
  const float* tp = taps.data_ptr<float>();
  const float* php = ph.data_ptr<float>();
  const cf* x0 = reinterpret_cast<const cf*>(start.data_ptr<c10::complex<float>>());
  int* infop = info.data_ptr<int>();
  float* trp = trial.data_ptr<float>();
  double* plp = pl.data_ptr<double>();
  double* pbp = pb.data_ptr<double>();
  double* estp = est.data_ptr<double>();
  cf* vp = reinterpret_cast<cf*>(vecs.data_ptr<c10::complex<float>>());
  const int64_t e_len = static_cast<int64_t>(co) * cip;
  const int64_t nn = static_cast<int64_t>(n) * n;

  // 0. the cached blocks: one Gram and one Perron bound per (group, block, key)
  std::vector<int64_t> cbase(cached.size() + 1, 0);  // per cached block: its first slot / G
  for (size_t c = 0; c < cached.size(); ++c)
    cbase[c + 1] = cbase[c] + static_cast<int64_t>(cached[c]->rep.size());
  const int64_t ncache = gr * cbase.back();
  Scratch& own_sc = scratch();  // the calling thread's shared buffers
  std::vector<cf>& cgram = own_sc.cgram;
  cgram.resize(static_cast<size_t>(ncache) * nn);
  // the cached blocks' Perron bounds, made on the first request (bound_b; -1: not yet)
  std::vector<std::atomic<double>> cpb(ncache);
  for (auto& v : cpb) v.store(-1.0);
  auto form_cached = [&](int64_t sl, std::vector<std::vector<cf>>& buf,
                         std::vector<cf>& tmp) -> int {  // A^p (B^p) of slot sl into buf[0]
    const int64_t g = sl / cbase.back(), within = sl % cbase.back();
    size_t c = 0;
    while (cbase[c + 1] <= within) ++c;
    const Block* b = cached[c];
    const int64_t f = b->rep[within - cbase[c]];
    buf[0].resize(static_cast<size_t>(co) * b->ncols);
    form_blocks(tp + g * nq * e_len, php, nq, co, cip, {b}, &f, 1, b->ncols, buf);
    if (!left) {  // the one block, B = A^H
      conj_transpose(buf[0], co, cip, tmp);
      std::swap(buf[0], tmp);
    }
    return left ? b->ncols : co;
  };
  dynamic_chunks(ncache, [&](std::atomic<int64_t>& next) {
    Scratch& sc = scratch();
    if (sc.bufs.empty()) sc.bufs.resize(1);
    for (int64_t sl; (sl = next.fetch_add(1)) < ncache;) {
      const int inner = form_cached(sl, sc.bufs, sc.tmp);
      gram_blocks(lp, sc.bufs[0].data(), n, inner, cgram.data() + sl * nn);
    }
  });

  // H_f's blocks (lower region) into dest(j) for a batch of flat ids of one group, B_f left
  // in the thread's sc.bufs[j]
  const int64_t fb_max = std::max<int64_t>(
      1, std::min<int64_t>(16, (int64_t(8) << 20) / std::max<int64_t>(1, 8LL * n * m_f)));
  auto build = [&](const int64_t* ids, int cnt, Scratch& sc,
                   const std::function<cf*(int)>& dest) {
    auto& bufs = sc.bufs;
    const int64_t g = ids[0] / nf;
    std::vector<int64_t> fs(cnt);
    std::vector<const cf*> csrc;
    std::vector<char> cconj;
    for (int j = 0; j < cnt; ++j) fs[j] = ids[j] % nf;
    if (m_f > 0) {
      if (static_cast<int>(bufs.size()) < cnt) bufs.resize(cnt);
      for (int j = 0; j < cnt; ++j) bufs[j].resize(static_cast<size_t>(co) * form_cols);
      form_blocks(tp + g * nq * e_len, php, nq, co, cip, per_f, fs.data(), cnt, form_cols, bufs);
      if (!left) {
        for (int j = 0; j < cnt; ++j) {
          conj_transpose(bufs[j], co, cip, sc.tmp);
          std::swap(bufs[j], sc.tmp);
        }
      }
    }
    for (int j = 0; j < cnt; ++j) {
      cf* h = dest(j);
      // the per-frequency product first (beta 0), then the cached blocks added one by one
      // (the order kappa counts), in one pass over h
      gram_blocks(lp, m_f > 0 ? bufs[j].data() : nullptr, n, m_f, h);
      if (!cached.empty()) {
        csrc.resize(cached.size());
        cconj.resize(cached.size());
        for (size_t c = 0; c < cached.size(); ++c) {
          const int64_t sl = g * cbase.back() + cbase[c] + cached[c]->key_of[fs[j]];
          csrc[c] = cgram.data() + sl * nn;
          cconj[c] = cached[c]->conj_of[fs[j]];
        }
        add_cached(csrc.data(), cconj.data(), static_cast<int>(cached.size()), n, h);
      }
    }
  };
  // >= || |B_f| ||^2 for the flat id whose per-frequency part is in buf: the trace bound
  // where it costs <= kFrobeniusShareB of the trial t, else the smaller of it and the sum of
  // the Perron bounds of the cached blocks and of B_f
  const std::vector<cf> no_side;  // B_f where no per-frequency block is formed (m_f == 0)
  auto bound_b = [&](int64_t id, const cf* g, const std::vector<cf>& buf, double t,
                     std::vector<float>& absm) {
    const double trb = trace_bound(g, n, kappa);
    if (m_f == 0 || kappa * trb <= kFrobeniusShareB * t) return trb;
    double pbj = 0.0;
    std::vector<std::vector<cf>> cbuf(1);
    std::vector<cf> ctmp;
    for (size_t c = 0; c < cached.size(); ++c) {
      const int64_t sl = (id / nf) * cbase.back() + cbase[c] + cached[c]->key_of[id % nf];
      double v = cpb[sl].load();
      if (v < 0) {  // first request (two threads may both make it: the same value)
        const int inner = form_cached(sl, cbuf, ctmp);
        v = perron_of_side(cbuf[0].data(), n, inner, absm);
        cpb[sl].store(v);
      }
      pbj += v;
    }
    return std::min(trb, pbj + perron_of_side(buf.data(), n, m_f, absm));
  };
  auto batch_end = [&](int64_t pos, int64_t stop) {  // consecutive ids of one group
    int64_t e = pos + 1;  // (positions < nk are the kept ones; batches never mix the two)
    if (pos < nk) stop = std::min(stop, nk);
    while (e < stop && e - pos < fb_max && topp[e] / nf == topp[pos] / nf) ++e;
    return e;
  };
  auto estimate = [&](const cf* g, int64_t id, int steps) {
    // the Ritz vector of conj(H) (column-major view), stored conjugated: H's convention
    cf* z = vp + id * n;
    const double th = lanczos_top(lp, g, n, estp[id] > 0 ? z : x0, steps, z);
    for (int i = 0; i < n; ++i) z[i] = std::conj(z[i]);
    estp[id] = std::max(estp[id], th);
  };

  const bool perron_l = inner_constant(n) * n > kFrobeniusShareL;
  // 1. the top frequencies: Gram kept, estimate
  std::vector<cf>& kept = own_sc.kept;
  kept.resize(static_cast<size_t>(nk) * nn);
  const int64_t top_chunk = std::max<int64_t>(
      1, std::min<int64_t>(fb_max, nk / std::max<int64_t>(1, at::get_num_threads())));
  dynamic_chunks(nk, [&](std::atomic<int64_t>& next) {
    Scratch& sc = scratch();
    for (int64_t k0; (k0 = next.fetch_add(top_chunk)) < nk;) {
     const int64_t k1 = std::min(nk, k0 + top_chunk);
     for (int64_t k = k0; k < k1;) {
      const int64_t e = batch_end(k, k1);
      build(topp + k, static_cast<int>(e - k), sc,
            [&](int j) { return kept.data() + (k + j) * nn; });
      for (int64_t j = k; j < e; ++j) {
        const int64_t id = topp[j];
        estimate(kept.data() + j * nn, id, static_cast<int>(est_steps));
        // B_f is gone after this batch: its bound now, against the likely first trial
        pbp[id] = bound_b(id, kept.data() + j * nn, m_f > 0 ? sc.bufs[j - k] : no_side,
                          estp[id] * (1 + margin), sc.absm);
      }
      k = e;
     }
    }
  });
  double lam = 0.0;
  for (int64_t k = 0; k < nk; ++k) lam = std::max(lam, estp[topp[k]]);
  // the first trial of every frequency: the largest estimate, one value for all (the bound
  // is the largest certificate: a frequency's own lower trial would not lower it)
  const double mu0 = std::max(lam, 1e-30) * (1.0 + margin);
  auto round_up32 = [](double t) {  // the trial as the factorization sees it
    float tf = static_cast<float>(t);
    if (static_cast<double>(tf) < t) tf = std::nextafter(tf, INFINITY);
    return tf;
  };
  // frequencies whose first trial failed, with their Grams (the formed ones copied out of
  // the thread's buffer): retried in step 3
  std::mutex failed_mu;
  std::vector<std::pair<int64_t, std::vector<cf>>> failed;
  int64_t failed_bytes = 0;  // (under failed_mu)
  // the lowered trial (trial_below) where the Frobenius term of |L| is at most 1/32 of the
  // trial (n <= ~360) and Perron steps would be needed otherwise
  const bool lowered = perron_l && inner_constant(n) * n <= 1.0 / 32;
  // 2. every frequency: Gram, factorization at mu0
  dynamic_chunks(nt, [&](std::atomic<int64_t>& next) {
    Scratch& sc = scratch();
    auto& own = sc.own;
    // chunks in the rotated order r: the formed frequencies first (by trace), the kept ones
    // (factorization only, the cheapest) last; chunks shrink toward the end (guided) so the
    // threads finish together
    for (int64_t b0, cnt = 0; (b0 = grab_chunk(next, nt, fb_max, &cnt)) < nt;) {
     for (int64_t r0 = b0; r0 < b0 + cnt;) {
      const int64_t split = nt - nk;  // r < split: positions r + nk (formed), then 0..nk-1
      const int64_t r1 = r0 < split ? std::min(b0 + cnt, split) : b0 + cnt;
      const int64_t p0 = r0 < split ? r0 + nk : r0 - split;
      const int64_t b1 = p0 + (r1 - r0);
      for (int64_t pos = p0; pos < b1;) {
      int64_t e = pos + 1;
      if (pos >= nk) {  // not kept: form this batch's Grams
        e = batch_end(pos, b1);
        own.resize(static_cast<size_t>(e - pos) * nn);
        build(topp + pos, static_cast<int>(e - pos), sc,
              [&](int j) { return own.data() + j * nn; });
      }
      for (int64_t j = pos; j < e; ++j) {
        const int64_t id = topp[j];
        const cf* g = slot[id] >= 0 ? kept.data() + slot[id] * nn : own.data() + (j - pos) * nn;
        int inf = 1;
        // without an estimate near mu0: first the lowered trial t' (t' + c_n ||L||_F^2 ~
        // mu0, no Perron steps of |L|); where that fails, mu0 with the Perron bound
        if (lowered) {
          const double t_low = trial_below(mu0, trace_of(g, n), n);
          if (!(estp[id] * (1.0 + margin) >= t_low)) {
            trp[id] = round_up32(t_low);
            inf = factor_shifted(lp, g, n, trp[id], sc.s, sc.absm, plp + id, false);
          }
        }
        if (inf != 0) {
          trp[id] = round_up32(mu0);
          inf = factor_shifted(lp, g, n, trp[id], sc.s, sc.absm, plp + id, perron_l);
        }
        infop[id] = inf;
        if (slot[id] < 0)  // || |B| ||^2 while B_f is here (the kept ones: from step 1)
          pbp[id] = bound_b(id, g, m_f > 0 ? sc.bufs[j - pos] : no_side, mu0, sc.absm);
        if (inf != 0) {
          std::lock_guard<std::mutex> lock(failed_mu);
          // the Gram copied out while the copies stay within kFailedKeepBytes (else formed
          // again in step 3)
          const bool copy = slot[id] < 0 && failed_bytes + nn * 8 <= kFailedKeepBytes;
          if (copy) failed_bytes += nn * 8;
          failed.emplace_back(id, copy ? std::vector<cf>(g, g + nn) : std::vector<cf>());
        }
      }
      pos = e;
      }
      r0 = r1;
     }
    }
  });
  // 3. the failed ones (the estimate was low), in rounds: each estimated further (Lanczos
  // from its last vector), then all factored at one trial, the largest of their estimates x
  // (1 + margin) and the last trial x (1 + grow): the bound does not depend on the order in
  // which the threads met them
  std::sort(failed.begin(), failed.end(),
            [](const auto& x, const auto& y) { return x.first < y.first; });
  double t_last = mu0, grow = margin;
  for (int64_t r = 1; r < rounds && !failed.empty(); ++r) {
    const int64_t nfail = static_cast<int64_t>(failed.size());
    auto gram_of = [&](int64_t k, Scratch& sc) -> const cf* {
      const int64_t id = failed[k].first;
      if (slot[id] >= 0) return kept.data() + slot[id] * nn;
      if (!failed[k].second.empty()) return failed[k].second.data();
      sc.own.resize(static_cast<size_t>(nn));  // not kept past the budget: formed again
      build(&failed[k].first, 1, sc, [&](int) { return sc.own.data(); });
      return sc.own.data();
    };
    dynamic_chunks(nfail, [&](std::atomic<int64_t>& next) {
      Scratch& sc = scratch();
      for (int64_t k; (k = next.fetch_add(1)) < nfail;)
        estimate(gram_of(k, sc), failed[k].first, static_cast<int>(retry_steps));
    });
    double t = 0.0;  // per frequency: its estimate's trial if above the last, else the last grown
    for (const auto& f : failed) {
      const double fresh = estp[f.first] * (1.0 + margin);
      t = std::max(t, fresh > t_last ? fresh : t_last * (1.0 + grow));
    }
    const float tf = round_up32(t);
    std::vector<char> again(nfail, 0);
    dynamic_chunks(nfail, [&](std::atomic<int64_t>& next) {
      Scratch& sc = scratch();
      for (int64_t k; (k = next.fetch_add(1)) < nfail;) {
        const int64_t id = failed[k].first;
        trp[id] = tf;
        const int inf =
            factor_shifted(lp, gram_of(k, sc), n, tf, sc.s, sc.absm, plp + id, perron_l);
        infop[id] = inf;  // (its || |B| ||^2: from step 1 or 2, trial-independent)
        again[k] = inf != 0;
      }
    });
    std::vector<std::pair<int64_t, std::vector<cf>>> next_failed;
    for (int64_t k = 0; k < nfail; ++k)
      if (again[k]) next_failed.push_back(std::move(failed[k]));
    failed.swap(next_failed);
    t_last = t;
    grow *= 4.0;
  }
  const double tabs_sq = tap_abs_sq(tp, gr, nq, e_len);
  own_sc.trim_shared();
  return {info, trial, pl, pb, est, vecs, tabs_sq, kappa};
}

// The symbol's taps, tap-major, from the weight (python/lipkern/certified/symbol.py,
// tap_major32, is the same in ATen): w (co, ci, k) float32 or float64 contiguous, slots (k,)
// int64 distinct (slot = phase * Q + shift); out (G, Q, co / G, P * ci) float32 with
// out[g, s % Q, o, (s / Q) * ci + c] = round32(w[g * co / G + o, c, j] * scale) for
// s = slots[j], zero where no tap lands. scale: a power of two (exact in float64).
at::Tensor tap_major_cpu(const at::Tensor& w_in, const at::Tensor& slots_in, int64_t groups,
                         int64_t phases, int64_t nq, double scale,
                         const c10::optional<at::Tensor>& out_in) {
  TORCH_CHECK((w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kDouble) &&
                  w_in.dim() == 3,
              "tap_major: w must be (co, ci, k) float32 or float64");
  TORCH_CHECK(slots_in.scalar_type() == at::kLong && slots_in.dim() == 1 &&
                  slots_in.size(0) == w_in.size(2),
              "tap_major: slots must be (k,) int64");
  const at::Tensor w = w_in.contiguous(), slots = slots_in.contiguous();
  const int64_t co = w.size(0), ci = w.size(1), k = w.size(2);
  TORCH_CHECK(groups >= 1 && co % groups == 0 && phases >= 1 && nq >= 1,
              "tap_major: groups must divide co; phases, nq >= 1");
  const int64_t* sp = slots.data_ptr<int64_t>();
  std::vector<char> seen(phases * nq, 0);
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(sp[j] >= 0 && sp[j] < phases * nq && !seen[sp[j]],
                "tap_major: slots must be distinct and < phases * nq");
    seen[sp[j]] = 1;
  }
  const int64_t cog = co / groups, cip = phases * ci;
  const auto fopt = w.options().dtype(at::kFloat);
  at::Tensor out;
  if (out_in.has_value()) {  // a caller's workspace (no fresh pages: see Scratch)
    out = *out_in;
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() &&
                    out.sizes() == at::IntArrayRef({groups, nq, cog, cip}),
                "tap_major: out must be contiguous float32 (G, Q, co / G, P * ci)");
    if (k != phases * nq) out.zero_();
  } else {
    out = k == phases * nq ? at::empty({groups, nq, cog, cip}, fopt)
                           : at::zeros({groups, nq, cog, cip}, fopt);
  }
  float* op = out.data_ptr<float>();
  const bool dbl = w.scalar_type() == at::kDouble;
  const float* wf = dbl ? nullptr : w.data_ptr<float>();
  const double* wd = dbl ? w.data_ptr<double>() : nullptr;
  at::parallel_for(0, co, 8, [&](int64_t o0, int64_t o1) {
    std::vector<float*> dst(k);
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t g = o / cog, og = o % cog;
      for (int64_t j = 0; j < k; ++j)
        dst[j] = op + ((g * nq + sp[j] % nq) * cog + og) * cip + (sp[j] / nq) * ci;
      // w's row o read in order, k output rows written (float32 * 2^e: exact in float32
      // but below the normal range, where it rounds as the float64 product rounded to
      // float32 does)
      for (int64_t c = 0; c < ci; ++c)
        for (int64_t j = 0; j < k; ++j)
          dst[j][c] = dbl ? static_cast<float>(wd[(o * ci + c) * k + j] * scale)
                          : static_cast<float>(wf[(o * ci + c) * k + j] * scale);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace lipkern

TORCH_LIBRARY_FRAGMENT(lipkern, m) {
  m.def("certify_frequencies(Tensor side, Tensor mu, bool is_gram) -> (Tensor, Tensor, Tensor)");
  m.def("certify_layer(Tensor taps, Tensor ph, Tensor freqs, int mh, int mw, Tensor used, "
        "Tensor order, "
        "int n_top, Tensor start, bool left, "
        "float margin, int est_steps, int retry_steps, int rounds) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float, float)");
  m.def("tap_major(Tensor w, Tensor slots, int groups, int phases, int nq, float scale, "
        "Tensor? out=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lipkern, CPU, m) {
  m.impl("certify_frequencies", &lipkern::cpu::certify_frequencies_cpu);
  m.impl("certify_layer", &lipkern::cpu::certify_layer_cpu);
  m.impl("tap_major", &lipkern::cpu::tap_major_cpu);
}

// The layer table shared by every compiled kernel (plain C++: the .cu files include it too).
// Must match python/lipkern/layout.py: META_WIDTH ints per layer, fields in this order.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define LIPKERN_HD __host__ __device__
#else
#define LIPKERN_HD
#endif

namespace lipkern {

constexpr int64_t kMetaWidth = 20;
enum LayerKind : int64_t { kDense = 0, kConv = 1, kConvT = 2 };

// One layer as the conv-form map C: (cin, h, w) -> (cout, oh, ow), weight (cout, cin/groups,
// kh, kw); the operator is A = C (dense, conv) or A = C^T (kind kConvT).
struct Geom {
  int64_t kind, x_off, y_off, cin, h, w, cout, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, groups,
      circular, w_off;

  LIPKERN_HD int64_t in_numel() const { return cin * h * w; }
  LIPKERN_HD int64_t out_numel() const { return cout * oh * ow; }
  LIPKERN_HD int64_t x_numel() const { return kind == kConvT ? out_numel() : in_numel(); }
  LIPKERN_HD int64_t y_numel() const { return kind == kConvT ? in_numel() : out_numel(); }
  LIPKERN_HD int64_t cig() const { return cin / groups; }
  LIPKERN_HD int64_t cog() const { return cout / groups; }
  LIPKERN_HD int64_t red() const { return cig() * kh * kw; }  // a weight row: (cin/groups) * kh * kw
  LIPKERN_HD int64_t w_numel() const { return cout * red(); }
  // 2 * multiply-adds of one application of C (or C^T)
  LIPKERN_HD double flops() const { return 2.0 * double(w_numel()) * double(oh * ow); }
};

inline std::vector<Geom> parse_meta(const int64_t* meta, int64_t n) {
  if (n <= 0 || n % kMetaWidth != 0)
    throw std::invalid_argument("lipkern: meta must hold a positive multiple of " +
                                std::to_string(kMetaWidth) + " ints, got " + std::to_string(n));
  std::vector<Geom> out;
  int64_t tx = 0, ty = 0, tw = 0;  // the packed offsets are running sums (layout.py _build)
  for (int64_t i = 0; i < n; i += kMetaWidth) {
    const int64_t* r = meta + i;
    Geom g{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
           r[10], r[11], r[12], r[13], r[14], r[15], r[16], r[17], r[18], r[19]};
    if (g.kind < 0 || g.kind > 2 || g.groups < 1 || g.cin % g.groups || g.cout % g.groups ||
        g.h < 1 || g.w < 1 || g.oh < 1 || g.ow < 1 || g.kh < 1 || g.kw < 1 || g.sh < 1 ||
        g.sw < 1 || g.dh < 1 || g.dw < 1 || g.ph < 0 || g.pw < 0 ||
        (g.circular && (g.ph > g.h || g.pw > g.w)) || g.cin < 1 || g.cout < 1 ||
        (g.circular && g.kind != kConv) || (g.kind == kDense && g.in_numel() != g.cin))
      throw std::invalid_argument("lipkern: meta row " + std::to_string(i / kMetaWidth) +
                                  " is not a valid layer");
    // the output size every kernel indexes with must be the conv's own (else reads run past
    // the buffers): oh = (h + 2 ph - dh (kh - 1) - 1) / sh + 1, the same for ow
    const int64_t nh = g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1,
                  nw = g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1;
    if (nh < 0 || nw < 0 || g.oh != nh / g.sh + 1 || g.ow != nw / g.sw + 1 || g.x_off != tx ||
        g.y_off != ty || g.w_off != tw)
      throw std::invalid_argument("lipkern: meta row " + std::to_string(i / kMetaWidth) +
                                  " is not a valid layer (sizes or offsets inconsistent)");
    tx += g.x_numel();
    ty += g.y_numel();
    tw += g.w_numel();
    out.push_back(g);
  }
  return out;
}

}  // namespace lipkern

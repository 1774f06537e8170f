// The row math of the fused ULD loss on CPU (kdkernels/uld/rows.py, impl="cpp").
//
// kdkernels_uld::sorted_l1(x [C, W1], cx [C], y [C, W2], cy [C], out [C, W1], k) -> loss [C]
// kdkernels_uld::hybrid(x [C, Vs], cx, y [C, Vt], cy, s_matched [M], t_matched [M],
//                       s_free [Fs], t_free [Ft], out [C, Vs], mw, uw, beta, k, want_grad)
//   -> loss [C]: GOLD's hybrid on the merged rows (cx x, cy y): mw x the generalized JSD(beta)
//   of the matched columns (raw probabilities clamped at 1e-8) plus uw x the sorted L1 of the
//   free columns, gathered by index inside each row (no [C, M] or [C, F] buffer); out (with
//   want_grad) receives dloss/d(cx x) in every column (duplicated matched ids add).
//
// Per row i, over rows sorted in descending order (the narrower side zero-padded):
//   loss_i = sum_r |cx_i xs_r - cy_i ys_r|                         (k == 0: the full rows)
//   loss_i = sum_{r<K} |cx_i xs_r - cy_i ys_r| + |cx_i tail_x - cy_i tail_y|   (k > 0, top-k)
// and out[i, j] = dloss_i / d(cx_i x_ij) = sign(cx_i x_ij - cy_i ys_{r(j)}) with r(j) the rank
// of x_ij (ranks past the teacher's width compare with 0; top-k: entries outside the top K get
// sign(tail difference)). Rows are independent: at::parallel_for over rows, each thread with
// its own scratch. The values are probabilities (>= 0), whose IEEE bit patterns order like the
// values, so each row is sorted by an LSD radix sort of its 32-bit keys (three 11-bit digit
// passes, a pass skipped when all keys share its digit), carrying the column index: O(W) per
// row instead of O(W log W). No [C, W] buffer besides the inputs and `out`.
// Built by kdkernels/uld/_cpp.py (as a small library of its own, with the flags of
// kdkernels/backends/extension.py); x, y, cx, cy float32, contiguous.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kdk_uld {
namespace {

constexpr int kBits = 11;
constexpr uint32_t kBuckets = 1u << kBits;

inline uint32_t key_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  // non-negative floats: bit order = value order; -0.0 and the odd negative rounding of an
  // exp are mapped to 0 (they are 0 in value)
  return (u >> 31) ? 0u : u;
}

inline float value_of(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// Sort `a` (n entries, the sort key in the upper 32 bits, descending = ascending ~key) with
// `tmp` as the ping-pong buffer; the result is in `a`. Works on uint64 (key << 32 | index)
// and on uint32 keys alike (shift 0).
template <typename T, int kShift>
void radix_sort(T* a, T* tmp, int64_t n) {
  uint32_t hist[3][kBuckets];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = static_cast<uint32_t>(a[i] >> kShift);
    hist[0][k & (kBuckets - 1)]++;
    hist[1][(k >> kBits) & (kBuckets - 1)]++;
    hist[2][k >> (2 * kBits)]++;
  }
  T* src = a;
  T* dst = tmp;
  for (int pass = 0; pass < 3; ++pass) {
    uint32_t* h = hist[pass];
    const int shift = pass * kBits;
    // a digit shared by every key orders nothing: skip the pass
    bool trivial = false;
    for (uint32_t b = 0; b < kBuckets && !trivial; ++b) trivial = h[b] == static_cast<uint32_t>(n);
    if (trivial) continue;
    uint32_t sum = 0;
    for (uint32_t b = 0; b < kBuckets; ++b) {
      const uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t d = (static_cast<uint32_t>(src[i] >> kShift) >> shift) & (kBuckets - 1);
      dst[h[d]++] = src[i];
    }
    std::swap(src, dst);
  }
  if (src != a) std::memcpy(a, src, sizeof(T) * n);
}

inline float sign_of(float d) { return static_cast<float>((d > 0.0f) - (d < 0.0f)); }

// One row's sorted L1: x_j = xr[xcol[j]] (xcol null: j) for j < w1, y likewise; writes
// scale * sign into orow[xcol[j]] (orow null: no gradient). xs, xt: w1 scratch; ys, yt: w2.
double sorted_l1_row(const float* xr, const int64_t* xcol, int64_t w1, const float* yr,
                     const int64_t* ycol, int64_t w2, float a, float b, int64_t k, float* orow,
                     float scale, uint64_t* xs, uint64_t* xt, uint32_t* ys, uint32_t* yt) {
  const int64_t k1 = k > 0 ? std::min(k, w1) : w1;
  const int64_t k2 = k > 0 ? std::min(k, w2) : w2;
  const int64_t m = std::min(k1, k2);
  for (int64_t j = 0; j < w1; ++j)
    xs[j] = (static_cast<uint64_t>(~key_of(xr[xcol ? xcol[j] : j])) << 32) |
            static_cast<uint64_t>(j);
  for (int64_t j = 0; j < w2; ++j) ys[j] = ~key_of(yr[ycol ? ycol[j] : j]);
  radix_sort<uint64_t, 32>(xs, xt, w1);
  radix_sort<uint32_t, 0>(ys, yt, w2);
  auto put = [&](uint64_t key, float sgn) {
    if (!orow) return;
    const uint32_t j = static_cast<uint32_t>(key);
    orow[xcol ? xcol[j] : j] = scale * sgn;
  };
  double acc = 0.0;
  // ranks both sides have: the same fp32 products and difference as the torch backend
  for (int64_t r = 0; r < m; ++r) {
    const float p = a * value_of(~static_cast<uint32_t>(xs[r] >> 32));
    const float q = b * value_of(~ys[r]);
    const float d = p - q;
    acc += std::fabs(static_cast<double>(d));
    put(xs[r], sign_of(d));
  }
  for (int64_t r = m; r < k1; ++r) {  // the student's ranks past the teacher's: vs 0
    const float p = a * value_of(~static_cast<uint32_t>(xs[r] >> 32));
    acc += p;
    put(xs[r], sign_of(p));
  }
  for (int64_t r = m; r < k2; ++r) acc += b * value_of(~ys[r]);  // teacher vs zero padding
  if (k > 0) {
    // tails: the mass outside each side's top K, summed from the smallest up
    double tx = 0.0, ty = 0.0;
    for (int64_t r = w1 - 1; r >= k1; --r) tx += value_of(~static_cast<uint32_t>(xs[r] >> 32));
    for (int64_t r = w2 - 1; r >= k2; --r) ty += value_of(~ys[r]);
    const float dt = a * static_cast<float>(tx) - b * static_cast<float>(ty);
    acc += std::fabs(static_cast<double>(dt));
    const float st = sign_of(dt);
    for (int64_t r = k1; r < w1; ++r) put(xs[r], st);
  }
  return acc;
}

void sorted_l1_rows(const float* x, const float* cx, const float* y, const float* cy, float* out,
                    double* loss, int64_t rows, int64_t w1, int64_t w2, int64_t k) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> xs(w1), xt(w1);
    std::vector<uint32_t> ys(w2), yt(w2);
    for (int64_t i = begin; i < end; ++i)
      loss[i] = sorted_l1_row(x + i * w1, nullptr, w1, y + i * w2, nullptr, w2, cx[i], cy[i], k,
                              out + i * w1, 1.0f, xs.data(), xt.data(), ys.data(), yt.data());
  });
}

// GOLD's generalized JSD(beta) over gathered, clamped values s, t (n each, modified: s
// receives dloss/ds, 0 where s was below the clamp); the per-row sum in float64. torch's
// vectorized log (Sleef under AVX2/AVX-512), as the torch backend's torch.log. The branch is
// chosen on beta in double and the weights rounded from double, as the torch backend does: a
// beta that rounds to 0 or 1 in float (1e-50, 1 - 1e-12) is still the mixture, not a KL.
double gjsd_row(float* s, float* t, int64_t n, double beta, bool want_grad) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kW = Vec::size();
  constexpr float kClamp = 1e-8f;
  const Vec clamp(kClamp), wb(static_cast<float>(beta)), wa(static_cast<float>(1.0 - beta));
  const Vec one(1.0f), zero(0.0f);
  double acc = 0.0;
  auto step = [&](Vec vs, Vec vt, Vec& loss, Vec& grad) {
    const Vec keep = vs >= clamp;  // all-ones lanes where s is not clamped
    vs = at::vec::maximum(vs, clamp);
    vt = at::vec::maximum(vt, clamp);
    const Vec ls = vs.log(), lt = vt.log();
    if (beta == 0.0) {  // KL(t || s)
      loss = vt * (lt - ls);
      grad = zero - vt / vs;
    } else if (beta == 1.0) {  // KL(s || t)
      loss = vs * (ls - lt);
      grad = ls - lt + one;
    } else {
      const Vec lm = (wa * vs + wb * vt).log();
      loss = wb * vt * (lt - lm) + wa * vs * (ls - lm);
      grad = wa * (ls - lm);
    }
    grad = grad & keep;
  };
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    Vec loss, grad;
    step(Vec::loadu(s + j), Vec::loadu(t + j), loss, grad);
    float buf[kW];
    loss.store(buf);
    for (int64_t l = 0; l < kW; ++l) acc += buf[l];
    if (want_grad) grad.store(s + j);
  }
  if (j < n) {
    const int64_t r = n - j;
    Vec loss, grad;
    step(Vec::loadu(s + j, r), Vec::loadu(t + j, r), loss, grad);
    float buf[kW];
    loss.store(buf, r);
    for (int64_t l = 0; l < r; ++l) acc += buf[l];
    if (want_grad) grad.store(s + j, r);
  }
  return acc;
}

at::Tensor sorted_l1(const at::Tensor& x, const at::Tensor& cx, const at::Tensor& y,
                     const at::Tensor& cy, const at::Tensor& out, int64_t k) {
  const char* op = "kdkernels_uld::sorted_l1";
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && out.dim() == 2, op,
              ": x, y and out must be 2-D [C, W]");
  for (const at::Tensor* t : {&x, &cx, &y, &cy, &out}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                op, ": every tensor must be float32, contiguous, on CPU");
  }
  const int64_t rows = x.size(0), w1 = x.size(1), w2 = y.size(1);
  TORCH_CHECK(y.size(0) == rows && out.size(0) == rows && out.size(1) == w1, op,
              ": out must be [C, W1] like x, y [C, W2]");
  TORCH_CHECK(cx.numel() == rows && cy.numel() == rows, op, ": cx and cy must be [C]");
  TORCH_CHECK(k >= 0, op, ": k must be >= 0 (0: the full sort), got ", k);
  TORCH_CHECK(w1 < (int64_t{1} << 32) && w2 < (int64_t{1} << 32), op, ": rows too wide");
  auto loss = at::empty({rows}, x.options().dtype(at::kDouble));
  if (rows == 0) return loss.to(at::kFloat);
  sorted_l1_rows(x.data_ptr<float>(), cx.data_ptr<float>(), y.data_ptr<float>(),
                 cy.data_ptr<float>(), out.data_ptr<float>(), loss.data_ptr<double>(), rows, w1,
                 w2, k);
  return loss.to(at::kFloat);
}


at::Tensor hybrid(const at::Tensor& x, const at::Tensor& cx, const at::Tensor& y,
                  const at::Tensor& cy, const at::Tensor& s_matched, const at::Tensor& t_matched,
                  const at::Tensor& s_free, const at::Tensor& t_free, const at::Tensor& out,
                  double mw, double uw, double beta, int64_t k, bool want_grad) {
  const char* op = "kdkernels_uld::hybrid";
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && out.dim() == 2, op,
              ": x, y and out must be 2-D [C, V]");
  for (const at::Tensor* t : {&x, &cx, &y, &cy, &out}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                op, ": x, cx, y, cy and out must be float32, contiguous, on CPU");
  }
  for (const at::Tensor* t : {&s_matched, &t_matched, &s_free, &t_free}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() &&
                    t->device().is_cpu(),
                op, ": the column sets must be 1-D contiguous int64 on CPU");
  }
  const int64_t rows = x.size(0), vs = x.size(1), vt = y.size(1);
  const int64_t nm = s_matched.numel(), nsf = s_free.numel(), ntf = t_free.numel();
  TORCH_CHECK(y.size(0) == rows && out.size(0) == rows && out.size(1) == vs, op,
              ": out must be [C, Vs] like x, y [C, Vt]");
  TORCH_CHECK(cx.numel() == rows && cy.numel() == rows, op, ": cx and cy must be [C]");
  TORCH_CHECK(t_matched.numel() == nm, op, ": s_matched and t_matched must have one length");
  TORCH_CHECK(k >= 0, op, ": k must be >= 0 (0: the full sort), got ", k);
  TORCH_CHECK(vs < (int64_t{1} << 32) && vt < (int64_t{1} << 32), op, ": rows too wide");
  const int64_t* sm = s_matched.data_ptr<int64_t>();
  const int64_t* tm = t_matched.data_ptr<int64_t>();
  const int64_t* sf = s_free.data_ptr<int64_t>();
  const int64_t* tf = t_free.data_ptr<int64_t>();
  auto in_range = [](const int64_t* c, int64_t n, int64_t v) {
    for (int64_t j = 0; j < n; ++j)
      if (c[j] < 0 || c[j] >= v) return false;
    return true;
  };
  TORCH_CHECK(in_range(sm, nm, vs) && in_range(sf, nsf, vs), op,
              ": student columns out of range [0, ", vs, ")");
  TORCH_CHECK(in_range(tm, nm, vt) && in_range(tf, ntf, vt), op,
              ": teacher columns out of range [0, ", vt, ")");
  auto loss = at::empty({rows}, x.options().dtype(at::kDouble));
  const bool do_m = nm > 0 && mw != 0.0;
  const bool do_u = nsf > 0 && ntf > 0 && uw != 0.0;
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* cxp = cx.data_ptr<float>();
  const float* cyp = cy.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  double* lp = loss.data_ptr<double>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ps(do_m ? nm : 0), qs(do_m ? nm : 0);
    std::vector<uint64_t> xs(do_u ? nsf : 0), xt(do_u ? nsf : 0);
    std::vector<uint32_t> ys(do_u ? ntf : 0), yt(do_u ? ntf : 0);
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = xp + i * vs;
      const float* yr = yp + i * vt;
      float* orow = want_grad ? op_ + i * vs : nullptr;
      const float a = cxp[i], b = cyp[i];
      if (orow) std::fill(orow, orow + vs, 0.0f);
      double acc = 0.0;
      if (do_u)  // the free columns are no matched column's: plain stores
        acc += uw * sorted_l1_row(xr, sf, nsf, yr, tf, ntf, a, b, k, orow,
                                  static_cast<float>(uw), xs.data(), xt.data(), ys.data(),
                                  yt.data());
      if (do_m) {
        for (int64_t j = 0; j < nm; ++j) {
          ps[j] = a * xr[sm[j]];  // the torch backend's fp32 products
          qs[j] = b * yr[tm[j]];
        }
        acc += mw * gjsd_row(ps.data(), qs.data(), nm, beta, want_grad);
        if (orow) {
          const float w = static_cast<float>(mw);
          for (int64_t j = 0; j < nm; ++j) orow[sm[j]] += w * ps[j];
        }
      }
      lp[i] = acc;
    }
  });
  return loss.to(at::kFloat);
}

}  // namespace
}  // namespace kdk_uld

TORCH_LIBRARY(kdkernels_uld, m) {
  m.def("sorted_l1(Tensor x, Tensor cx, Tensor y, Tensor cy, Tensor(a!) out, int k) -> Tensor");
  m.def(
      "hybrid(Tensor x, Tensor cx, Tensor y, Tensor cy, Tensor s_matched, Tensor t_matched, "
      "Tensor s_free, Tensor t_free, Tensor(a!) out, float mw, float uw, float beta, int k, "
      "bool want_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels_uld, CPU, m) {
  m.impl("sorted_l1", &kdk_uld::sorted_l1);
  m.impl("hybrid", &kdk_uld::hybrid);
}

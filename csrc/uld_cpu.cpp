// The sorted L1 of the fused ULD loss on CPU (kdkernels/uld/rows.py, impl="cpp").
//
// kdkernels_uld::sorted_l1(x [C, W1], cx [C], y [C, W2], cy [C], out [C, W1], k) -> loss [C]
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
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

void sorted_l1_rows(const float* x, const float* cx, const float* y, const float* cy, float* out,
                    double* loss, int64_t rows, int64_t w1, int64_t w2, int64_t k) {
  const int64_t k1 = k > 0 ? std::min(k, w1) : w1;
  const int64_t k2 = k > 0 ? std::min(k, w2) : w2;
  const int64_t m = std::min(k1, k2);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> xs(w1), xt(w1);
    std::vector<uint32_t> ys(w2), yt(w2);
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = x + i * w1;
      const float* yr = y + i * w2;
      float* orow = out + i * w1;
      const float a = cx[i], b = cy[i];
      for (int64_t j = 0; j < w1; ++j)
        xs[j] = (static_cast<uint64_t>(~key_of(xr[j])) << 32) | static_cast<uint64_t>(j);
      for (int64_t j = 0; j < w2; ++j) ys[j] = ~key_of(yr[j]);
      radix_sort<uint64_t, 32>(xs.data(), xt.data(), w1);
      radix_sort<uint32_t, 0>(ys.data(), yt.data(), w2);
      double acc = 0.0;
      // ranks both sides have: the same fp32 products and difference as the torch backend
      for (int64_t r = 0; r < m; ++r) {
        const float p = a * value_of(~static_cast<uint32_t>(xs[r] >> 32));
        const float q = b * value_of(~ys[r]);
        const float d = p - q;
        acc += std::fabs(static_cast<double>(d));
        orow[static_cast<uint32_t>(xs[r])] = sign_of(d);
      }
      for (int64_t r = m; r < k1; ++r) {  // the student's ranks past the teacher's: vs 0
        const float p = a * value_of(~static_cast<uint32_t>(xs[r] >> 32));
        acc += p;
        orow[static_cast<uint32_t>(xs[r])] = sign_of(p);
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
        for (int64_t r = k1; r < w1; ++r) orow[static_cast<uint32_t>(xs[r])] = st;
      }
      loss[i] = acc;
    }
  });
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

}  // namespace
}  // namespace kdk_uld

TORCH_LIBRARY(kdkernels_uld, m) {
  m.def("sorted_l1(Tensor x, Tensor cx, Tensor y, Tensor cy, Tensor(a!) out, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels_uld, CPU, m) { m.impl("sorted_l1", &kdk_uld::sorted_l1); }

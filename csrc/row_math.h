// Row math of the row-op contract (kdkernels/backends/base.py), written once for the CPU
// (at::vec::Vectorized lanes) and CUDA (one float per thread) implementations.
//
// Every function is templated on a math policy M that supplies the value type M::V, its mask
// type M::Mask and the few primitives used here (exp, log1p, max, select, ...). NaN must
// propagate through M::max / M::min, as it does through torch.amax and torch.logaddexp.
// This header includes no torch header, so the CUDA file compiles it without ATen.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define KDK_HD __host__ __device__ __forceinline__
#else
#define KDK_HD inline
#endif

namespace kdk {

// Effective divergence (jsd with beta 0/1 already folded into forward/reverse KL).
enum Div : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewForwardKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
};

// Storage dtypes of the [C, V] tensors.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// How the log-mixture logm = log(wq * q + (1 - wq) * p) is formed.
enum MixMode : int { kMixGeneral = 0, kMixIsP = 1, kMixIsQ = 2 };

struct RowParams {
  int div;
  float inv_t;        // 1 / temperature
  float inv_scap;     // 1 / student softcap, 0 when there is none
  float scap;         // student softcap
  float inv_tcap;     // 1 / teacher softcap, 0 when there is none
  float tcap;         // teacher softcap
  bool has_ce;
  bool ce_separate;   // temperature != 1: the CE softmax needs its own exp and its own stats
  int mix_mode;       // exact mixtures at weight 0 or 1, never log(0) arithmetic
  float log_wq;       // log(wq)
  float log_wp;       // log1p(-wq)
  float soft_scale;   // (1 - beta) for jsd, -(1 - skew) for skew forward KL, else 1
  float skew;
};

// Pointers and strides of one call; rows and columns are elements, strides in elements.
struct RowArgs {
  const void* zs;
  const void* zt;
  void* out;
  int zs_dtype, zt_dtype, out_dtype;
  int64_t zs_stride, zt_stride, out_stride;
  int64_t rows, cols;
  const int64_t* labels;  // [rows]: column of the hard label in this block, or -1
  const float* norms;     // [rows, 4] (mix): m_a, log_s_a, m_b, log_s_b; lse = m + log_s
  const float* coef;      // [rows, 9] (grad): norms of a, b, z, then aux, kd_coef, ce_coef
  RowParams p;
};

constexpr int kStats = 9;
constexpr int kMix = 2;
constexpr int kNorms = 4;
constexpr int kCoef = 9;

// Scalar policy: the CUDA kernels and the CPU remainder loops.
struct ScalarMath {
  using V = float;
  using Mask = bool;
  KDK_HD static float set1(float x) { return x; }
  KDK_HD static float exp(float x) { return ::expf(x); }
  KDK_HD static float log1p(float x) { return ::log1pf(x); }
  KDK_HD static float tanh(float x) { return ::tanhf(x); }
  KDK_HD static float abs(float x) { return ::fabsf(x); }
  KDK_HD static float max(float a, float b) { return (a != a || a > b) ? a : b; }
  KDK_HD static float min(float a, float b) { return (a != a || a < b) ? a : b; }
  KDK_HD static bool gt(float a, float b) { return a > b; }
  KDK_HD static bool lt(float a, float b) { return a < b; }
  KDK_HD static bool eq(float a, float b) { return a == b; }
  KDK_HD static bool isnan(float a) { return a != a; }
  KDK_HD static float select(bool m, float a, float b) { return m ? a : b; }
};

// c * tanh(x / c) when a cap is set (inv_cap != 0), else x.
template <class M>
KDK_HD typename M::V softcap(typename M::V x, float cap, float inv_cap) {
  using V = typename M::V;
  if (inv_cap == 0.0f) return x;
  return M::tanh(x * V(inv_cap)) * V(cap);
}

// logaddexp(x, y), with -inf for two -infs (as torch.logaddexp) and NaN propagated.
template <class M>
KDK_HD typename M::V logaddexp(typename M::V x, typename M::V y) {
  using V = typename M::V;
  V hi = M::max(x, y);
  V lo = M::min(x, y);
  V r = hi + M::log1p(M::exp(lo - hi));
  return M::select(M::eq(hi, V(-INFINITY)), hi, r);
}

template <class M>
KDK_HD typename M::V log_mix(const RowParams& p, typename M::V logp, typename M::V logq) {
  using V = typename M::V;
  if (p.mix_mode == kMixIsP) return logp;
  if (p.mix_mode == kMixIsQ) return logq;
  return logaddexp<M>(logq + V(p.log_wq), logp + V(p.log_wp));
}

// w * (logx - logm), and 0 where w == 0 (an underflowed probability); NaN stays NaN.
template <class M>
KDK_HD typename M::V xlogy_diff(typename M::V w, typename M::V logx, typename M::V logm) {
  using V = typename M::V;
  return M::select(M::eq(w, V(0.0f)), V(0.0f), w * (logx - logm));
}

// sign(d) with NaN kept (torch.sign).
template <class M>
KDK_HD typename M::V sign(typename M::V d) {
  using V = typename M::V;
  V s = M::select(M::gt(d, V(0.0f)), V(1.0f), M::select(M::lt(d, V(0.0f)), V(-1.0f), V(0.0f)));
  return M::select(M::isnan(d), d, s);
}

// A log-normaliser split as lse = m + log_s: log-probs are formed as (x - m) - log_s, which
// keeps fp32 precision at large logits (m + log_s would round to ulp(|m|); base.py).
template <class M>
struct Norm {
  typename M::V m, log_s;
  KDK_HD typename M::V log_prob(typename M::V x) const { return (x - m) - log_s; }
};

// One element's contribution to the two mix sums (divergences.py); TVD's 0.5 is applied once
// per row by the caller.
template <class M>
KDK_HD void mix_terms(const RowParams& p, typename M::V a, typename M::V b, const Norm<M>& na,
                      const Norm<M>& nb, typename M::V& c0, typename M::V& c1) {
  using V = typename M::V;
  V logp = na.log_prob(a);
  V logq = nb.log_prob(b);
  V pr = M::exp(logp);
  V qr = M::exp(logq);
  if (p.div == kTVD) {
    V d = pr - qr;
    c0 = c0 + M::abs(d);
    c1 = c1 + pr * sign<M>(d);
    return;
  }
  V logm = log_mix<M>(p, logp, logq);
  if (p.div == kJSD) {
    c0 = c0 + xlogy_diff<M>(qr, logq, logm);
    c1 = c1 + xlogy_diff<M>(pr, logp, logm);
  } else if (p.div == kSkewForwardKL) {
    c0 = c0 + xlogy_diff<M>(qr, logq, logm);
    c1 = c1 + M::exp(logq + logp - logm);
  } else {  // kSkewReverseKL; skew p^2 / mix <= p: one exp of a non-positive argument
    c0 = c0 + xlogy_diff<M>(pr, logp, logm);
    if (p.skew != 0.0f) c1 = c1 + M::exp(V(p.log_wp) + logp + logp - logm);
  }
}

// Per-row gradient coefficients, broadcast once per row.
template <class M>
struct GradRow {
  Norm<M> na, nb, nz;
  typename M::V aux, kd, ce;
  bool ce_reuses_p;  // softmax(z) == p exactly (T == 1 and the z norms equal the a norms)
};

// Broadcast row `k` of coef ([9]: norms of a, b, z, aux, kd_coef, ce_coef).
template <class M>
KDK_HD GradRow<M> grad_row(const RowParams& p, const float* k) {
  using V = typename M::V;
  GradRow<M> r{{V(k[0]), V(k[1])}, {V(k[2]), V(k[3])}, {V(k[4]), V(k[5])},
               V(k[6]), V(k[7]), V(k[8]), false};
  r.ce_reuses_p = p.has_ce && !p.ce_separate && k[4] == k[0] && k[5] == k[1];
  return r;
}

// Rows with kd_coef == ce_coef == 0 get exact zeros (ignored tokens may hold garbage).
KDK_HD bool dead_row(const float* k) { return k[7] == 0.0f && k[8] == 0.0f; }

// dL/dz at one element (base.py): kd * G + ce * (softmax(z) - onehot), times the student
// softcap derivative. z is the capped, untempered student logit, a = z / T, b the teacher's
// tempered logit; `onehot_ce` is ce at the label column and 0 elsewhere.
template <class M>
KDK_HD typename M::V grad_elem(const RowParams& p, const GradRow<M>& r, typename M::V z,
                               typename M::V a, typename M::V b, typename M::V onehot_ce) {
  using V = typename M::V;
  V logp = r.na.log_prob(a);
  V pr = M::exp(logp);
  V g;
  if (p.div == kForwardKL) {
    g = pr - M::exp(r.nb.log_prob(b));
  } else {
    V logq = r.nb.log_prob(b);
    if (p.div == kReverseKL) {
      g = pr * (logp - logq - r.aux);
    } else if (p.div == kTVD) {
      g = pr * (V(0.5f) * sign<M>(pr - M::exp(logq)) - r.aux);
    } else {
      V logm = log_mix<M>(p, logp, logq);
      // p * q / mix and p * p / mix are formed as exp(log p + log q - logm): bounded by q / wq
      // and p / (1 - wq), where q / mix alone overflows when mix underflows (e.g. skew 0).
      if (p.div == kJSD) {
        g = V(p.soft_scale) * pr * (logp - logm - r.aux);
      } else if (p.div == kSkewForwardKL) {
        g = V(p.soft_scale) * (M::exp(logp + logq - logm) - pr * r.aux);
      } else {  // kSkewReverseKL; at skew 0 the p * p / mix term is exactly absent
        g = pr * (logp - logm - r.aux);
        // skew p^2 / mix as one exp (<= p): p^2 / mix alone reaches p / skew (1e23 at skew
        // 1e-23), beyond the range of the fast vector exp.
        if (p.skew != 0.0f) g = g - M::exp(V(p.log_wp) + logp + logp - logm);
      }
    }
  }
  V dz = r.kd * g;
  if (p.has_ce) {
    V sz = r.ce_reuses_p ? pr : M::exp(r.nz.log_prob(z));
    dz = dz + (r.ce * sz - onehot_ce);
  }
  if (p.inv_scap != 0.0f) {
    V u = z * V(p.inv_scap);
    dz = dz * (V(1.0f) - u * u);
  }
  return dz;
}

// Online-softmax accumulator of one distribution: max m, s = sum e^(x-m), w = sum e^(x-m) y.
// A block that saw only -inf keeps m = -inf, s = w = 0 (the empty-sum convention of
// row_stats.merge_partials); NaN anywhere makes m or s NaN.
struct MaxSum {
  float m, s, w;
};

// Merge two accumulators (row_stats.merge_partials, pairwise).
KDK_HD MaxSum merge_max_sum(MaxSum x, MaxSum y) {
  float m = ScalarMath::max(x.m, y.m);
  if (m == -INFINITY) return MaxSum{m, 0.0f, 0.0f};
  float fx = ::expf(x.m - m);
  float fy = ::expf(y.m - m);
  return MaxSum{m, x.s * fx + y.s * fy, x.w * fx + y.w * fy};
}

// Merge stats partials [n, 9] into one [9] row (vocab-split blocks of one row).
KDK_HD void merge_stats(const float* parts, int n, int stride, float* out) {
  MaxSum a{parts[0], parts[1], parts[2]};
  MaxSum b{parts[3], parts[4], parts[5]};
  MaxSum z{parts[6], parts[7], 0.0f};
  float label = parts[8];
  for (int i = 1; i < n; ++i) {
    const float* q = parts + static_cast<int64_t>(i) * stride;
    a = merge_max_sum(a, MaxSum{q[0], q[1], q[2]});
    b = merge_max_sum(b, MaxSum{q[3], q[4], q[5]});
    z = merge_max_sum(z, MaxSum{q[6], q[7], 0.0f});
    label += q[8];
  }
  out[0] = a.m; out[1] = a.s; out[2] = a.w;
  out[3] = b.m; out[4] = b.s; out[5] = b.w;
  out[6] = z.m; out[7] = z.s; out[8] = label;
}

}  // namespace kdk

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

// Divergence codes: kdkernels/divergences.py TABLE (jsd with beta 0/1 already folded into
// forward/reverse KL by RowSpec); tests/test_layouts.py checks the mirror.
enum Div : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewForwardKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
  kAlpha = 6,
  kDivs = 7,
};

// Column layouts of kdkernels/layouts.py, spelled k + prefix + CamelCase column, the last
// entry the count (tests/test_layouts.py parses these enums against the Python tables).
enum Stat : int {
  kStatMA = 0,
  kStatSA = 1,
  kStatWA = 2,
  kStatMB = 3,
  kStatSB = 4,
  kStatWB = 5,
  kStatMZ = 6,
  kStatSZ = 7,
  kStatZLabel = 8,
  kStatEA = 9,
  kStats = 10,
};

enum MixSum : int { kMixSumC0 = 0, kMixSumC1 = 1, kMixSums = 2 };

enum NormCol : int {
  kNormColMA = 0,
  kNormColLogSA = 1,
  kNormColMB = 2,
  kNormColLogSB = 3,
  kNormCols = 4,
};

enum Coef : int {
  kCoefMA = 0,
  kCoefLogSA = 1,
  kCoefMB = 2,
  kCoefLogSB = 3,
  kCoefMZ = 4,
  kCoefLogSZ = 5,
  kCoefAux = 6,
  kCoefKd = 7,
  kCoefCe = 8,
  kCoefs = 9,
};

// Row constants of one call (RowSpec.consts), computed once in Python for every backend.
enum Const : int {
  kConstInvT = 0,
  kConstTempered = 1,
  kConstCapS = 2,
  kConstCapT = 3,
  kConstWQ = 4,
  kConstLogWQ = 5,
  kConstLogWP = 6,
  kConstKDiv = 7,
  kConstMixKind = 8,
  kConstStatsWeight = 9,
  kConstScaleS = 10,
  kConstScaleT = 11,
  kConstWantEntropy = 12,
  kConsts = 13,
};

// Student-only row ops of the sparse (top-k) teacher losses (layouts.SSTATS, SCOEF).
enum SStat : int {
  kSStatMA = 0,
  kSStatSA = 1,
  kSStatMZ = 2,
  kSStatSZ = 3,
  kSStatEA = 4,
  kSStats = 5,
};
enum SCoef : int {
  kSCoefMA = 0,
  kSCoefLogSA = 1,
  kSCoefMZ = 2,
  kSCoefLogSZ = 3,
  kSCoefKd = 4,
  kSCoefCe = 5,
  kSCoefs = 6,
};

// Which terms the log-mixture logm = log(w_q q + (1 - w_q) p) has: exact at weights 0 and 1.
enum MixKind : int { kMixKindBoth = 0, kMixKindOnlyQ = 1, kMixKindOnlyP = 2, kMixKinds = 3 };

// Which weighted sum the stats pass keeps: w_a (student) or w_b (teacher).
enum Weight : int { kWeightNone = 0, kWeightStudent = 1, kWeightTeacher = 2, kWeights = 3 };

// Divergences with a mix pass (divergences.py needs_mix): a switch, so that the answer never
// depends on the order of the codes.
KDK_HD bool has_mix_terms(int div) {
  switch (div) {
    case kJSD:
    case kSkewForwardKL:
    case kSkewReverseKL:
    case kTVD:
    case kAlpha:
      return true;
    default:
      return false;
  }
}

// Storage dtypes of the [C, V] tensors.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// RowSpec.consts unpacked (register.cpp validates them), plus the reciprocals of the caps.
struct RowParams {
  int div;
  float inv_t;        // 1 / temperature
  float inv_scap;     // 1 / student softcap, 0 when there is none
  float scap;         // student softcap
  float inv_tcap;     // 1 / teacher softcap, 0 when there is none
  float tcap;         // teacher softcap
  bool has_ce;
  bool ce_separate;   // has_ce and T != 1: the CE softmax needs its own exp and its own stats
  bool want_e;        // the stats passes sum e_a (the entropy); else they skip it, e_a = 0
  int mix_kind;       // MixKind
  int stats_weight;   // Weight
  float w_q;          // weight of q in the mixture (alpha for kAlpha)
  float log_wq;       // log(w_q), 0 when w_q == 0
  float log_wp;       // log(1 - w_q), 0 when w_q == 1
  float k_div;        // constant factor of the divergence's gradient G (backends/base.py)
  float scale_s;      // student logit scale: z = softcap(scale_s * raw), 1 for none
  float scale_t;      // teacher logit scale, the same before the teacher's softcap
};

// Pointers and strides of one call; rows and columns are elements, strides in elements.
struct RowArgs {
  const void* zs;
  const void* zt;  // null for the student-only ops
  void* out;
  int zs_dtype, zt_dtype, out_dtype;
  int64_t zs_stride, zt_stride, out_stride;
  int64_t rows, cols;
  const int64_t* labels;  // [rows]: column of the hard label in this block, or -1
  const float* norms;     // [rows, kNormCols] (mix); lse = m + log_s
  const float* coef;      // [rows, kCoefs] (grad) or [rows, kSCoefs] (student_grad)
  RowParams p;
};

// Scalar policy: the CUDA kernels and the CPU remainder loops.
struct ScalarMath {
  using V = float;
  using Mask = bool;
  KDK_HD static float set1(float x) { return x; }
  KDK_HD static float exp(float x) { return ::expf(x); }
  KDK_HD static float log1p(float x) { return ::log1pf(x); }
  KDK_HD static float expm1(float x) { return ::expm1f(x); }
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
  if (p.mix_kind == kMixKindOnlyP) return logp;
  if (p.mix_kind == kMixKindOnlyQ) return logq;
  return logaddexp<M>(logq + V(p.log_wq), logp + V(p.log_wp));
}

// log w = log(q^w_q p^(1 - w_q)) = logp + w_q (logq - logp) for the alpha divergence; logp
// itself where logq == logp (w == p exactly, so c0 is exactly 0 at q == p) or logp == -inf
// (w = 0: -inf + inf would be NaN). NaN stays NaN.
template <class M>
KDK_HD typename M::V alpha_log_w(const RowParams& p, typename M::V logp, typename M::V logq) {
  using V = typename M::V;
  V lw = M::select(M::eq(logq, logp), logp, logp + V(p.w_q) * (logq - logp));
  return M::select(M::eq(logp, V(-INFINITY)), logp, lw);
}

// w - p of the alpha divergence without cancellation: p expm1(alpha (logq - logp)) where that
// exponent is below 1 in magnitude (exactly 0 at q == p), else exp(log w) - p, which neither
// cancels there nor overflows where p underflows (expm1 of a large exponent would).
template <class M>
KDK_HD typename M::V alpha_w_minus_p(const RowParams& p, typename M::V pr, typename M::V logp,
                                     typename M::V logq) {
  using V = typename M::V;
  V ad = V(p.w_q) * (logq - logp);
  V far = M::exp(alpha_log_w<M>(p, logp, logq)) - pr;
  return M::select(M::lt(M::abs(ad), V(1.0f)), pr * M::expm1(ad), far);
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
// per row by the caller. Only for has_mix_terms(p.div).
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
  if (p.div == kAlpha) {
    // p + w_q (q - p) - w >= 0 term by term (weighted AM-GM), exactly 0 where q == p.
    V w = M::exp(alpha_log_w<M>(p, logp, logq));
    c0 = c0 + ((pr + V(p.w_q) * (qr - pr)) - w);
    c1 = c1 + w;
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
    if (p.mix_kind != kMixKindOnlyQ) c1 = c1 + M::exp(V(p.log_wp) + logp + logp - logm);
  }
}

// Per-row gradient coefficients, broadcast once per row.
template <class M>
struct GradRow {
  Norm<M> na, nb, nz;
  typename M::V aux, kd, ce;
  bool ce_reuses_p;  // softmax(z) == p exactly (T == 1 and the z norms equal the a norms)
};

// Broadcast row `k` of coef ([kCoefs]).
template <class M>
KDK_HD GradRow<M> grad_row(const RowParams& p, const float* k) {
  using V = typename M::V;
  GradRow<M> r{{V(k[kCoefMA]), V(k[kCoefLogSA])},
               {V(k[kCoefMB]), V(k[kCoefLogSB])},
               {V(k[kCoefMZ]), V(k[kCoefLogSZ])},
               V(k[kCoefAux]),
               V(k[kCoefKd]),
               V(k[kCoefCe]),
               false};
  r.ce_reuses_p = p.has_ce && !p.ce_separate && k[kCoefMZ] == k[kCoefMA] &&
                  k[kCoefLogSZ] == k[kCoefLogSA];
  return r;
}

// Rows with kd == ce == 0 get exact zeros (ignored tokens may hold garbage).
KDK_HD bool dead_row(const float* k) { return k[kCoefKd] == 0.0f && k[kCoefCe] == 0.0f; }

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
    } else if (p.div == kAlpha) {
      // aux = c0 = 1 - sum w (exact 0 at q == p): G = k_div (w - p + p c0) = k_div (w - p sum w)
      g = V(p.k_div) * (alpha_w_minus_p<M>(p, pr, logp, logq) + pr * r.aux);
    } else {
      V logm = log_mix<M>(p, logp, logq);
      // p * q / mix and p * p / mix are formed as exp(log p + log q - logm): bounded by q / wq
      // and p / (1 - wq), where q / mix alone overflows when mix underflows (e.g. skew 0).
      if (p.div == kJSD) {
        g = V(p.k_div) * pr * (logp - logm - r.aux);
      } else if (p.div == kSkewForwardKL) {
        g = V(p.k_div) * (M::exp(logp + logq - logm) - pr * r.aux);
      } else {  // kSkewReverseKL; at skew 0 (only_q) the p * p / mix term is exactly absent
        g = pr * (logp - logm - r.aux);
        // skew p^2 / mix as one exp (<= p): p^2 / mix alone reaches p / skew (1e23 at skew
        // 1e-23), beyond the range of the fast vector exp.
        if (p.mix_kind != kMixKindOnlyQ) g = g - M::exp(V(p.log_wp) + logp + logp - logm);
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

// Online-softmax accumulator of one distribution: max m, s = sum e^(x-m), w = sum e^(x-m) y,
// e = sum e^(x-m) (x-m) (the entropy of softmax(x) is log s - e / s). A block that saw only
// -inf keeps m = -inf, s = w = e = 0 (the empty-sum convention of row_stats.merge_partials);
// NaN anywhere makes m or s NaN.
struct MaxSum {
  float m, s, w, e;
};

// e * d for e = exp(d): one term of e above, 0 where d = -inf (e = 0; -inf * 0 would be NaN).
// The max maps only -inf, and NaN passes through M::max.
template <class M>
KDK_HD typename M::V xexp_term(typename M::V e, typename M::V d) {
  using V = typename M::V;
  return e * M::max(d, V(-3.402823466e38f));
}

// e of an accumulator rescaled to a larger max `m`: e^(x.m-m) (e + (x.m - m) s), 0 if empty.
KDK_HD float rescaled_e(const MaxSum& x, float m, float f) {
  return x.m == -INFINITY ? 0.0f : f * (x.e + (x.m - m) * x.s);
}

// Merge two accumulators (row_stats.merge_partials, pairwise).
KDK_HD MaxSum merge_max_sum(MaxSum x, MaxSum y) {
  float m = ScalarMath::max(x.m, y.m);
  if (m == -INFINITY) return MaxSum{m, 0.0f, 0.0f, 0.0f};
  float fx = ::expf(x.m - m);
  float fy = ::expf(y.m - m);
  return MaxSum{m, x.s * fx + y.s * fy, x.w * fx + y.w * fy,
                rescaled_e(x, m, fx) + rescaled_e(y, m, fy)};
}

// A stats row [kStats] from the three accumulators and the label sum (e of a only).
KDK_HD void put_stats(float* out, MaxSum a, MaxSum b, MaxSum z, float label) {
  out[kStatMA] = a.m;
  out[kStatSA] = a.s;
  out[kStatWA] = a.w;
  out[kStatMB] = b.m;
  out[kStatSB] = b.s;
  out[kStatWB] = b.w;
  out[kStatMZ] = z.m;
  out[kStatSZ] = z.s;
  out[kStatZLabel] = label;
  out[kStatEA] = a.e;
}

// Merge stats partials [n, kStats] into one [kStats] row (vocab-split blocks of one row).
// Without want_e the partials' e_a is 0, which the rescale would not keep at 0: it stays 0.
KDK_HD void merge_stats(const float* parts, int n, int stride, bool want_e, float* out) {
  MaxSum a{parts[kStatMA], parts[kStatSA], parts[kStatWA], parts[kStatEA]};
  MaxSum b{parts[kStatMB], parts[kStatSB], parts[kStatWB], 0.0f};
  MaxSum z{parts[kStatMZ], parts[kStatSZ], 0.0f, 0.0f};
  float label = parts[kStatZLabel];
  for (int i = 1; i < n; ++i) {
    const float* q = parts + static_cast<int64_t>(i) * stride;
    a = merge_max_sum(a, MaxSum{q[kStatMA], q[kStatSA], q[kStatWA], q[kStatEA]});
    b = merge_max_sum(b, MaxSum{q[kStatMB], q[kStatSB], q[kStatWB], 0.0f});
    z = merge_max_sum(z, MaxSum{q[kStatMZ], q[kStatSZ], 0.0f, 0.0f});
    label += q[kStatZLabel];
  }
  if (!want_e) a.e = 0.0f;
  put_stats(out, a, b, z, label);
}


// ---- Student-only row ops (backends/base.py "Student-only row ops") ----

// The capped student logit of the student ops: c * tanh(x / c), but a masked column (raw
// -inf) stays -inf (the softcap alone would make it -c).
template <class M>
KDK_HD typename M::V masked_softcap(typename M::V x, float cap, float inv_cap) {
  using V = typename M::V;
  if (inv_cap == 0.0f) return x;
  return M::select(M::eq(x, V(-INFINITY)), x, softcap<M>(x, cap, inv_cap));
}

// Per-row coefficients of student_grad ([kSCoefs]), broadcast once per row. A term whose
// coefficient is 0 is skipped (its normaliser may be infinite: no exp of it is evaluated).
template <class M>
struct StudentRow {
  Norm<M> na, nz;
  typename M::V kd, ce;
  bool use_kd, use_ce;
};

template <class M>
KDK_HD StudentRow<M> student_row(const RowParams& p, const float* k) {
  using V = typename M::V;
  StudentRow<M> r{{V(k[kSCoefMA]), V(k[kSCoefLogSA])},
                  {V(k[kSCoefMZ]), V(k[kSCoefLogSZ])},
                  V(k[kSCoefKd]),
                  V(k[kSCoefCe]),
                  k[kSCoefKd] != 0.0f,
                  p.has_ce && k[kSCoefCe] != 0.0f};
  return r;
}

// A row whose every term is skipped: exact zeros (ignored tokens may hold garbage).
template <class M>
KDK_HD bool student_dead(const StudentRow<M>& r) { return !r.use_kd && !r.use_ce; }

// dL/dz at one element: kd * exp((a - m_a) - log_s_a) + [ce_separate] ce * softmax(z)
// - onehot_ce, times the softcap derivative; 0 at a masked column. z is masked_softcap of
// the raw logit (-inf exactly where masked), a = z / T; `onehot_ce` is ce at the label column
// and 0 elsewhere.
template <class M>
KDK_HD typename M::V student_grad_elem(const RowParams& p, const StudentRow<M>& r,
                                       typename M::V z, typename M::V a,
                                       typename M::V onehot_ce) {
  using V = typename M::V;
  V dz = V(0.0f);
  if (r.use_kd) dz = r.kd * M::exp(r.na.log_prob(a));
  if (r.use_ce) {
    if (p.ce_separate) dz = dz + r.ce * M::exp(r.nz.log_prob(z));
    dz = dz - onehot_ce;
  }
  if (p.inv_scap != 0.0f) {
    V u = z * V(p.inv_scap);
    dz = dz * (V(1.0f) - u * u);
  }
  // Masked: exp gave 0, but the derivative (-inf squared) or a row with no unmasked column
  // (-inf - -inf) may have made it NaN.
  return M::select(M::eq(z, V(-INFINITY)), V(0.0f), dz);
}

// A student stats row [kSStats] from the accumulators of a and z.
KDK_HD void put_student_stats(float* out, MaxSum a, MaxSum z) {
  out[kSStatMA] = a.m;
  out[kSStatSA] = a.s;
  out[kSStatMZ] = z.m;
  out[kSStatSZ] = z.s;
  out[kSStatEA] = a.e;
}

// Merge student stats partials [n, kSStats] (rows of `stride` floats) into one [kSStats] row.
KDK_HD void merge_student_stats(const float* parts, int n, int stride, bool want_e,
                                float* out) {
  MaxSum a{parts[kSStatMA], parts[kSStatSA], 0.0f, parts[kSStatEA]};
  MaxSum z{parts[kSStatMZ], parts[kSStatSZ], 0.0f, 0.0f};
  for (int i = 1; i < n; ++i) {
    const float* q = parts + static_cast<int64_t>(i) * stride;
    a = merge_max_sum(a, MaxSum{q[kSStatMA], q[kSStatSA], 0.0f, q[kSStatEA]});
    z = merge_max_sum(z, MaxSum{q[kSStatMZ], q[kSStatSZ], 0.0f, 0.0f});
  }
  if (!want_e) a.e = 0.0f;
  put_student_stats(out, a, z);
}

}  // namespace kdk

// CPU row ops: OpenMP over (row, vocab block) work items, at::vec::Vectorized inside a row.
//
// A row block is walked in tiles of kTile columns: each tile is converted to fp32 once
// (softcap and temperature applied) into L1-resident buffers, then the math of row_math.h
// runs over the buffers in vector lanes, with the scalar policy for the remainder. Stats are
// online at tile granularity (one rescale per tile whose max grows), so every pass reads each
// logit once from memory and calls exp once per distribution per element.
// Compiled with the host's torch CPU capability (AVX2 / AVX512 flags from kdkernels/_build.py);
// this file includes no ATen tensor header, only at::vec.
#include "rows_cpu.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <vector>

namespace kdk {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kW = Vec::size();
constexpr int64_t kTile = 1024;

// Vector policy for row_math.h.
struct VecMath {
  using V = Vec;
  using Mask = Vec;
  // torch's fast exp (ULP 20, ~1e-6 relative) with NaN passed through (exp_u20 clamps NaN).
  static V exp(V x) { return V::blendv(x.exp_u20(), x, x.isnan()); }
  static V log1p(V x) { return x.log1p(); }
  static V expm1(V x) { return x.expm1(); }
  static V tanh(V x) { return x.tanh(); }
  static V abs(V x) { return x.abs(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static Mask gt(V a, V b) { return a > b; }
  static Mask lt(V a, V b) { return a < b; }
  static Mask eq(V a, V b) { return a == b; }
  static Mask isnan(V a) { return a.isnan(); }
  static V select(Mask m, V a, V b) { return V::blendv(b, a, m); }
};

// Scalar policy for row remainders: exp/log1p/tanh go through lane 0 of the vector functions,
// so an element's value does not depend on whether it sits in a full vector or the remainder
// (results stay invariant to vocabulary order up to summation order).
inline float lane0(Vec v) {
  float x;
  v.store(&x, 1);
  return x;
}

struct LaneMath : ScalarMath {
  static float exp(float x) { return lane0(VecMath::exp(Vec(x))); }
  static float log1p(float x) { return lane0(Vec(x).log1p()); }
  static float expm1(float x) { return lane0(Vec(x).expm1()); }
  static float tanh(float x) { return lane0(Vec(x).tanh()); }
};

// Conversions are written as plain integer loops (the compiler vectorises them) and F16C
// intrinsics, not at::vec::convert_to_float/convert_from_float: some torch builds (2.11 with
// AVX512, seen on an H200 machine) declare those templates without exporting them.
inline float bf16_bits_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16_bits(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Load n logits of `dtype` starting at p into fp32 dst.
void load_f32(const void* p, int dtype, int64_t n, float* dst) {
  int64_t i = 0;
  if (dtype == kF32) {
    std::memcpy(dst, p, n * sizeof(float));
  } else if (dtype == kBF16) {
    auto src = static_cast<const uint16_t*>(p);
    for (; i < n; ++i) dst[i] = bf16_bits_to_f32(src[i]);
  } else {
    auto src = static_cast<const c10::Half*>(p);
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// Store n fp32 values into `dtype` (round to nearest even, as Tensor.copy_).
void store_from_f32(const float* src, int dtype, int64_t n, void* p) {
  int64_t i = 0;
  if (dtype == kF32) {
    std::memmove(p, src, n * sizeof(float));
  } else if (dtype == kBF16) {
    auto dst = static_cast<uint16_t*>(p);
    for (; i < n; ++i) dst[i] = f32_to_bf16_bits(src[i]);
  } else {
    auto dst = static_cast<c10::Half*>(p);
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) {
      __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
  }
}

void zero_store(int dtype, int64_t n, void* p) {
  std::memset(p, 0, n * (dtype == kF32 ? 4 : 2));
}

inline int64_t elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

inline const void* at_col(const void* base, int dtype, int64_t stride, int64_t row, int64_t col) {
  return static_cast<const char*>(base) + (row * stride + col) * elem_size(dtype);
}

// One tile of the three views of a row: z (capped student), a = z / T, b (teacher / T).
struct Tile {
  alignas(64) float z[kTile];
  alignas(64) float a[kTile];
  alignas(64) float b[kTile];
  alignas(64) float d[kTile];
};

// Fill t.z, t.a, t.b with columns [c0, c0 + n) of `row`; z is only kept when `need_z`.
void load_tile(const RowArgs& g, int64_t row, int64_t c0, int64_t n, bool need_z, Tile& t) {
  const RowParams& p = g.p;
  float* zbuf = need_z ? t.z : t.a;
  load_f32(at_col(g.zs, g.zs_dtype, g.zs_stride, row, c0), g.zs_dtype, n, zbuf);
  load_f32(at_col(g.zt, g.zt_dtype, g.zt_stride, row, c0), g.zt_dtype, n, t.b);
  // The logit scales multiply the raw logits before the softcaps (a multiply by 1 is exact).
  const Vec it(p.inv_t), ss(p.scale_s), st(p.scale_t);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    Vec z = softcap<VecMath>(Vec::loadu(zbuf + i) * ss, p.scap, p.inv_scap);
    if (need_z) z.store(t.z + i);
    (z * it).store(t.a + i);
    (softcap<VecMath>(Vec::loadu(t.b + i) * st, p.tcap, p.inv_tcap) * it).store(t.b + i);
  }
  for (; i < n; ++i) {
    float z = softcap<LaneMath>(zbuf[i] * p.scale_s, p.scap, p.inv_scap);
    if (need_z) t.z[i] = z;
    t.a[i] = z * p.inv_t;
    t.b[i] = softcap<LaneMath>(t.b[i] * p.scale_t, p.tcap, p.inv_tcap) * p.inv_t;
  }
}

float tile_max(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
  if (n >= kW) {
    Vec vm(-INFINITY);
    for (; i + kW <= n; i += kW) vm = at::vec::maximum(vm, Vec::loadu(x + i));
    alignas(64) float lanes[kW];
    vm.store(lanes);
    for (int l = 0; l < kW; ++l) m = ScalarMath::max(m, lanes[l]);
  }
  for (; i < n; ++i) m = ScalarMath::max(m, x[i]);
  return m;
}

float hsum(Vec v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float s = 0.0f;
  for (int l = 0; l < kW; ++l) s += lanes[l];
  return s;
}

// Running online-softmax state of one distribution inside one row block (MaxSum per lane).
struct Online {
  float m = -INFINITY;
  Vec s = Vec(0.0f), w = Vec(0.0f), e = Vec(0.0f);
  float s_tail = 0.0f, w_tail = 0.0f, e_tail = 0.0f;

  // Raise the max to cover a tile whose max is tm; false if every value so far is -inf.
  // kEnt: e is kept (else it stays 0 and is not rescaled).
  template <bool kEnt = true>
  bool raise(float tm) {
    float m_new = ScalarMath::max(m, tm);
    if (!(m_new == m)) {
      if (m != -INFINITY) {
        const float f = LaneMath::exp(m - m_new), d = m - m_new;
        if constexpr (kEnt) {
          e = at::vec::fmadd(s, Vec(d), e) * Vec(f);  // e^(m-m') (e + (m - m') s), before s
          e_tail = (e_tail + d * s_tail) * f;
        }
        s = s * Vec(f);
        w = w * Vec(f);
        s_tail *= f;
        w_tail *= f;
      }
      m = m_new;
    }
    return m != -INFINITY;
  }
  MaxSum result() const {
    return MaxSum{m, hsum(s) + s_tail, hsum(w) + w_tail, hsum(e) + e_tail};
  }
};

// Partial stats [kStats] of columns [c0, c1) of `row`; e_a (the entropy) only with kEnt, a
// template parameter so that the skipped path has no per-element work (p.want_e picks it).
template <bool kEnt>
void stats_block(const RowArgs& g, int64_t row, int64_t c0, int64_t c1, Tile& t, float* out) {
  const RowParams& p = g.p;
  const bool rev = p.stats_weight == kWeightStudent, fwd = p.stats_weight == kWeightTeacher;
  const bool cez = p.ce_separate;
  Online A, B, Z;
  for (int64_t col = c0; col < c1; col += kTile) {
    const int64_t n = std::min(kTile, c1 - col);
    load_tile(g, row, col, n, cez, t);
    const bool la = A.raise<kEnt>(tile_max(t.a, n));
    const bool lb = B.raise(tile_max(t.b, n));
    const bool lz = cez && Z.raise(tile_max(t.z, n));
    const Vec ma(A.m), mb(B.m), mz(Z.m);
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      Vec a = Vec::loadu(t.a + i), b = Vec::loadu(t.b + i);
      if (la) {
        const Vec d = a - ma;
        const Vec e = VecMath::exp(d);
        A.s = A.s + e;
        if constexpr (kEnt) A.e = A.e + xexp_term<VecMath>(e, d);
        if (rev) A.w = at::vec::fmadd(e, a - b, A.w);
      }
      if (lb) {
        Vec e = VecMath::exp(b - mb);
        B.s = B.s + e;
        if (fwd) B.w = at::vec::fmadd(e, b - a, B.w);
      }
      if (lz) Z.s = Z.s + VecMath::exp(Vec::loadu(t.z + i) - mz);
    }
    for (; i < n; ++i) {
      float a = t.a[i], b = t.b[i];
      if (la) {
        const float d = a - A.m, e = LaneMath::exp(d);
        A.s_tail += e;
        if constexpr (kEnt) A.e_tail += xexp_term<LaneMath>(e, d);
        if (rev) A.w_tail += e * (a - b);
      }
      if (lb) {
        float e = LaneMath::exp(b - B.m);
        B.s_tail += e;
        if (fwd) B.w_tail += e * (b - a);
      }
      if (lz) Z.s_tail += LaneMath::exp(t.z[i] - Z.m);
    }
  }
  MaxSum ra = A.result(), rb = B.result(), rz = cez ? Z.result() : ra;
  if (!rev) ra.w = 0.0f;
  if (!fwd) rb.w = 0.0f;
  float label_z = 0.0f;
  const int64_t label = p.has_ce && g.labels ? g.labels[row] : -1;
  if (label >= c0 && label < c1) {
    float z;
    load_f32(at_col(g.zs, g.zs_dtype, g.zs_stride, row, label), g.zs_dtype, 1, &z);
    label_z = softcap<LaneMath>(z * p.scale_s, p.scap, p.inv_scap);
  }
  put_stats(out, ra, rb, rz, label_z);
}

void mix_block(const RowArgs& g, int64_t row, int64_t c0, int64_t c1, Tile& t, float* out) {
  const RowParams& p = g.p;
  const float* nr = g.norms + row * kNormCols;
  const Norm<VecMath> va{Vec(nr[kNormColMA]), Vec(nr[kNormColLogSA])};
  const Norm<VecMath> vb{Vec(nr[kNormColMB]), Vec(nr[kNormColLogSB])};
  const Norm<LaneMath> sa{nr[kNormColMA], nr[kNormColLogSA]};
  const Norm<LaneMath> sb{nr[kNormColMB], nr[kNormColLogSB]};
  Vec c0v(0.0f), c1v(0.0f);
  float c0s = 0.0f, c1s = 0.0f;
  for (int64_t col = c0; col < c1; col += kTile) {
    const int64_t n = std::min(kTile, c1 - col);
    load_tile(g, row, col, n, false, t);
    int64_t i = 0;
    for (; i + kW <= n; i += kW)
      mix_terms<VecMath>(p, Vec::loadu(t.a + i), Vec::loadu(t.b + i), va, vb, c0v, c1v);
    for (; i < n; ++i) mix_terms<LaneMath>(p, t.a[i], t.b[i], sa, sb, c0s, c1s);
  }
  const float half = p.div == kTVD ? 0.5f : 1.0f;
  out[kMixSumC0] = half * (hsum(c0v) + c0s);
  out[kMixSumC1] = half * (hsum(c1v) + c1s);
}

void grad_block(const RowArgs& g, int64_t row, int64_t c0, int64_t c1, Tile& t) {
  const RowParams& p = g.p;
  const float* k = g.coef + row * kCoefs;
  void* out_row = static_cast<char*>(g.out) + row * g.out_stride * elem_size(g.out_dtype);
  if (dead_row(k)) {
    zero_store(g.out_dtype, c1 - c0, static_cast<char*>(out_row) + c0 * elem_size(g.out_dtype));
    return;
  }
  const GradRow<VecMath> rv = grad_row<VecMath>(p, k);
  const GradRow<LaneMath> rs = grad_row<LaneMath>(p, k);
  const int64_t label = p.has_ce && g.labels ? g.labels[row] : -1;
  const bool need_z = p.has_ce || p.inv_scap != 0.0f;
  for (int64_t col = c0; col < c1; col += kTile) {
    const int64_t n = std::min(kTile, c1 - col);
    load_tile(g, row, col, n, need_z, t);
    const float* z = need_z ? t.z : t.a;
    int64_t i = 0;
    const Vec zero(0.0f);
    for (; i + kW <= n; i += kW) {
      grad_elem<VecMath>(p, rv, Vec::loadu(z + i), Vec::loadu(t.a + i), Vec::loadu(t.b + i), zero)
          .store(t.d + i);
    }
    for (; i < n; ++i) t.d[i] = grad_elem<LaneMath>(p, rs, z[i], t.a[i], t.b[i], 0.0f);
    if (label >= col && label < col + n) {
      const int64_t j = label - col;
      t.d[j] = grad_elem<LaneMath>(p, rs, z[j], t.a[j], t.b[j], rs.ce);
    }
    store_from_f32(t.d, g.out_dtype, n,
                   static_cast<char*>(out_row) + col * elem_size(g.out_dtype));
  }
}

// Student-only ops: fill t.a = z / T (and t.z = z when `need_z`) with columns [c0, c0 + n) of
// the student row alone, z = masked_softcap(raw) (a masked column stays -inf in both).
void load_student_tile(const RowArgs& g, int64_t row, int64_t c0, int64_t n, bool need_z,
                       Tile& t) {
  const RowParams& p = g.p;
  float* zbuf = need_z ? t.z : t.a;
  load_f32(at_col(g.zs, g.zs_dtype, g.zs_stride, row, c0), g.zs_dtype, n, zbuf);
  if (!need_z && p.inv_scap == 0.0f && p.inv_t == 1.0f && p.scale_s == 1.0f) return;  // raw
  const Vec it(p.inv_t), ss(p.scale_s);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {  // -inf * scale stays -inf: masked columns stay masked
    Vec z = masked_softcap<VecMath>(Vec::loadu(zbuf + i) * ss, p.scap, p.inv_scap);
    if (need_z) z.store(t.z + i);
    (z * it).store(t.a + i);
  }
  for (; i < n; ++i) {
    float z = masked_softcap<LaneMath>(zbuf[i] * p.scale_s, p.scap, p.inv_scap);
    if (need_z) t.z[i] = z;
    t.a[i] = z * p.inv_t;
  }
}

// Partial student stats [kSStats] of columns [c0, c1) of `row`: online at tile granularity,
// one read of the logits, one exp per distribution per element; e_a only with kEnt.
template <bool kEnt>
void student_stats_block(const RowArgs& g, int64_t row, int64_t c0, int64_t c1, Tile& t,
                         float* out) {
  const bool cez = g.p.ce_separate;
  Online A, Z;
  for (int64_t col = c0; col < c1; col += kTile) {
    const int64_t n = std::min(kTile, c1 - col);
    load_student_tile(g, row, col, n, cez, t);
    const bool la = A.raise<kEnt>(tile_max(t.a, n));
    const bool lz = cez && Z.raise(tile_max(t.z, n));
    const Vec ma(A.m), mz(Z.m);
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      if (la) {
        const Vec d = Vec::loadu(t.a + i) - ma;
        const Vec e = VecMath::exp(d);
        A.s = A.s + e;
        if constexpr (kEnt) A.e = A.e + xexp_term<VecMath>(e, d);  // masked: d = -inf, 0
      }
      if (lz) Z.s = Z.s + VecMath::exp(Vec::loadu(t.z + i) - mz);
    }
    for (; i < n; ++i) {
      if (la) {
        const float d = t.a[i] - A.m, e = LaneMath::exp(d);
        A.s_tail += e;
        if constexpr (kEnt) A.e_tail += xexp_term<LaneMath>(e, d);
      }
      if (lz) Z.s_tail += LaneMath::exp(t.z[i] - Z.m);
    }
  }
  const MaxSum ra = A.result();
  put_student_stats(out, ra, cez ? Z.result() : ra);
}

void student_grad_block(const RowArgs& g, int64_t row, int64_t c0, int64_t c1, Tile& t) {
  const RowParams& p = g.p;
  const float* k = g.coef + row * kSCoefs;
  void* out_row = static_cast<char*>(g.out) + row * g.out_stride * elem_size(g.out_dtype);
  const StudentRow<VecMath> rv = student_row<VecMath>(p, k);
  const StudentRow<LaneMath> rs = student_row<LaneMath>(p, k);
  if (student_dead(rs)) {
    zero_store(g.out_dtype, c1 - c0, static_cast<char*>(out_row) + c0 * elem_size(g.out_dtype));
    return;
  }
  const int64_t label = rs.use_ce && g.labels ? g.labels[row] : -1;
  // z itself is only read for the CE softmax and the softcap derivative; otherwise z stands
  // in as a, which is -inf exactly where z is.
  const bool need_z = p.ce_separate || p.inv_scap != 0.0f;
  const Vec zero(0.0f);
  for (int64_t col = c0; col < c1; col += kTile) {
    const int64_t n = std::min(kTile, c1 - col);
    load_student_tile(g, row, col, n, need_z, t);
    const float* z = need_z ? t.z : t.a;
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      student_grad_elem<VecMath>(p, rv, Vec::loadu(z + i), Vec::loadu(t.a + i), zero)
          .store(t.d + i);
    }
    for (; i < n; ++i) t.d[i] = student_grad_elem<LaneMath>(p, rs, z[i], t.a[i], 0.0f);
    if (label >= col && label < col + n) {
      const int64_t j = label - col;
      t.d[j] = student_grad_elem<LaneMath>(p, rs, z[j], t.a[j], rs.ce);
    }
    store_from_f32(t.d, g.out_dtype, n,
                   static_cast<char*>(out_row) + col * elem_size(g.out_dtype));
  }
}

// Blocks per row: one when rows keep every thread busy, else enough vocab blocks (of at least
// 4096 columns) to give each thread several work items.
int64_t blocks_per_row(int64_t rows, int64_t cols, int threads) {
  if (rows >= 4 * threads) return 1;
  int64_t want = (4 * threads + rows - 1) / rows;
  return std::max<int64_t>(1, std::min<int64_t>(want, cols / 4096));
}

// Run fn(row, c0, c1, item, tile) over every (row, vocab block) item.
template <class F>
void for_blocks(int64_t rows, int64_t cols, int threads, int64_t nb, F fn) {
  const int64_t items = rows * nb;
  const int64_t step = ((cols + nb - 1) / nb + 63) / 64 * 64;  // 64-column aligned blocks
#pragma omp parallel num_threads(threads)
  {
    Tile* t = new Tile;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t row = it / nb, blk = it % nb;
      const int64_t c0 = std::min(cols, blk * step), c1 = std::min(cols, c0 + step);
      fn(row, c0, c1, it, *t);
    }
    delete t;
  }
}

}  // namespace

void cpu_row_stats(const RowArgs& g, float* out, int threads) {
  const int64_t nb = blocks_per_row(g.rows, g.cols, threads);
  const auto stats_block = g.p.want_e ? &kdk::stats_block<true> : &kdk::stats_block<false>;
  if (nb == 1) {
    for_blocks(g.rows, g.cols, threads, 1, [&](int64_t r, int64_t c0, int64_t c1, int64_t,
                                                Tile& t) { stats_block(g, r, c0, c1, t,
                                                                       out + r * kStats); });
    return;
  }
  std::vector<float> parts(g.rows * nb * kStats);
  for_blocks(g.rows, g.cols, threads, nb, [&](int64_t r, int64_t c0, int64_t c1, int64_t it,
                                              Tile& t) {
    if (c0 < c1) {
      stats_block(g, r, c0, c1, t, parts.data() + it * kStats);
    } else {  // an empty block: the empty-sum partial
      float* q = parts.data() + it * kStats;
      const MaxSum empty{-INFINITY, 0.0f, 0.0f, 0.0f};
      put_stats(q, empty, empty, empty, 0.0f);
    }
  });
  for (int64_t r = 0; r < g.rows; ++r)
    merge_stats(parts.data() + r * nb * kStats, static_cast<int>(nb), kStats, g.p.want_e,
                out + r * kStats);
}

void cpu_row_mix(const RowArgs& g, float* out, int threads) {
  const int64_t nb = blocks_per_row(g.rows, g.cols, threads);
  std::vector<float> parts(g.rows * nb * kMixSums, 0.0f);
  for_blocks(g.rows, g.cols, threads, nb, [&](int64_t r, int64_t c0, int64_t c1, int64_t it,
                                              Tile& t) {
    if (c0 < c1) mix_block(g, r, c0, c1, t, parts.data() + it * kMixSums);
  });
  for (int64_t r = 0; r < g.rows; ++r) {
    for (int c = 0; c < kMixSums; ++c) {
      float s = 0.0f;
      for (int64_t b = 0; b < nb; ++b) s += parts[(r * nb + b) * kMixSums + c];
      out[r * kMixSums + c] = s;
    }
  }
}

void cpu_row_grad(const RowArgs& g, int threads) {
  const int64_t nb = blocks_per_row(g.rows, g.cols, threads);
  for_blocks(g.rows, g.cols, threads, nb, [&](int64_t r, int64_t c0, int64_t c1, int64_t,
                                              Tile& t) {
    if (c0 < c1) grad_block(g, r, c0, c1, t);
  });
}

void cpu_student_stats(const RowArgs& g, float* out, int threads) {
  const int64_t nb = blocks_per_row(g.rows, g.cols, threads);
  const auto student_stats_block =
      g.p.want_e ? &kdk::student_stats_block<true> : &kdk::student_stats_block<false>;
  if (nb == 1) {
    for_blocks(g.rows, g.cols, threads, 1, [&](int64_t r, int64_t c0, int64_t c1, int64_t,
                                                Tile& t) {
      student_stats_block(g, r, c0, c1, t, out + r * kSStats);
    });
    return;
  }
  std::vector<float> parts(g.rows * nb * kSStats);
  for_blocks(g.rows, g.cols, threads, nb, [&](int64_t r, int64_t c0, int64_t c1, int64_t it,
                                              Tile& t) {
    float* q = parts.data() + it * kSStats;
    if (c0 < c1) {
      student_stats_block(g, r, c0, c1, t, q);
    } else {  // an empty block: the empty-sum partial
      const MaxSum empty{-INFINITY, 0.0f, 0.0f, 0.0f};
      put_student_stats(q, empty, empty);
    }
  });
  for (int64_t r = 0; r < g.rows; ++r)
    merge_student_stats(parts.data() + r * nb * kSStats, static_cast<int>(nb), kSStats,
                        g.p.want_e, out + r * kSStats);
}

void cpu_student_grad(const RowArgs& g, int threads) {
  const int64_t nb = blocks_per_row(g.rows, g.cols, threads);
  for_blocks(g.rows, g.cols, threads, nb, [&](int64_t r, int64_t c0, int64_t c1, int64_t,
                                              Tile& t) {
    if (c0 < c1) student_grad_block(g, r, c0, c1, t);
  });
}

}  // namespace kdk

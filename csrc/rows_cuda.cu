// CUDA row ops: one thread block per (row, vocab block); a row is split into several blocks
// only when there are too few rows to fill the GPU (partials merged by a second tiny kernel).
// Each thread walks 8-column chunks with 16-byte loads (two for fp32) when the row pointers
// allow it, else plain coalesced element loads; all math in fp32 through row_math.h.
// No torch header here (the file compiles with nvcc alone, fast): every entry point returns
// the cudaError_t of its launches and register.cpp raises it with C10_CUDA_CHECK.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "rows_cuda.h"

namespace kdk {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 8;

__device__ __forceinline__ int64_t elem_bytes(int dtype) { return dtype == kF32 ? 4 : 2; }

__device__ __forceinline__ float load1(const void* row, int dtype, int64_t col) {
  if (dtype == kF32) return static_cast<const float*>(row)[col];
  if (dtype == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(row)[col]);
  return __half2float(static_cast<const __half*>(row)[col]);
}

__device__ __forceinline__ void store1(void* row, int dtype, int64_t col, float v) {
  if (dtype == kF32) {
    static_cast<float*>(row)[col] = v;
  } else if (dtype == kBF16) {
    static_cast<__nv_bfloat16*>(row)[col] = __float2bfloat16_rn(v);
  } else {
    static_cast<__half*>(row)[col] = __float2half_rn(v);
  }
}

// 8 consecutive values at a 16-byte aligned address.
__device__ __forceinline__ void load8(const void* p, int dtype, float v[kChunk]) {
  if (dtype == kF32) {
    const float4 x = static_cast<const float4*>(p)[0], y = static_cast<const float4*>(p)[1];
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
    v[4] = y.x; v[5] = y.y; v[6] = y.z; v[7] = y.w;
    return;
  }
  const uint4 raw = *static_cast<const uint4*>(p);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (dtype == kBF16) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
      float2 f = __half22float2(h);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
}

__device__ __forceinline__ void store8(void* p, int dtype, const float v[kChunk]) {
  if (dtype == kF32) {
    static_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    static_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    return;
  }
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (dtype == kBF16) {
      __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t*>(&h);
    } else {
      __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t*>(&h);
    }
  }
  *static_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ const char* row_ptr(const void* base, int dtype, int64_t stride,
                                               int64_t row) {
  return static_cast<const char*>(base) + row * stride * elem_bytes(dtype);
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// The block's row and column range [c0, c1); columns split in multiples of kChunk.
struct Span {
  int64_t row, blk, c0, c1;
};

__device__ __forceinline__ Span block_span(const RowArgs& g, int nb) {
  Span s;
  s.row = blockIdx.x / nb;
  s.blk = blockIdx.x % nb;
  const int64_t step = ((g.cols + nb - 1) / nb + kChunk - 1) / kChunk * kChunk;
  s.c0 = min(g.cols, s.blk * step);
  s.c1 = min(g.cols, s.c0 + step);
  return s;
}

// Visit columns [c0, c1) of the block's row: fn(col, z_raw, t_raw) per element, in 8-column
// chunks (fn8) when every pointer is 16-byte aligned.
template <class F1, class F8>
__device__ __forceinline__ void walk(const RowArgs& g, const Span& s, bool out_aligned, F1 fn1,
                                     F8 fn8) {
  const char* zs = row_ptr(g.zs, g.zs_dtype, g.zs_stride, s.row);
  const char* zt = row_ptr(g.zt, g.zt_dtype, g.zt_stride, s.row);
  int64_t col = s.c0;
  const bool vec = out_aligned && aligned16(zs + s.c0 * elem_bytes(g.zs_dtype)) &&
                   aligned16(zt + s.c0 * elem_bytes(g.zt_dtype));
  if (vec) {
    const int64_t nchunks = (s.c1 - s.c0) / kChunk;
    for (int64_t k = threadIdx.x; k < nchunks; k += blockDim.x) {
      const int64_t c = s.c0 + k * kChunk;
      float zv[kChunk], tv[kChunk];
      load8(zs + c * elem_bytes(g.zs_dtype), g.zs_dtype, zv);
      load8(zt + c * elem_bytes(g.zt_dtype), g.zt_dtype, tv);
      fn8(c, zv, tv);
    }
    col = s.c0 + nchunks * kChunk;
  }
  for (int64_t c = col + threadIdx.x; c < s.c1; c += blockDim.x)
    fn1(c, load1(zs, g.zs_dtype, c), load1(zt, g.zt_dtype, c));
}

// Online max/sum per thread: raise the max to cover x, false while everything is -inf.
// kEnt: e is kept (else it stays 0 and is not rescaled).
template <bool kEnt = true>
__device__ __forceinline__ bool raise(MaxSum& acc, float x) {
  const float m_new = ScalarMath::max(acc.m, x);
  if (!(m_new == acc.m)) {
    if (acc.m != -INFINITY) {
      const float f = __expf(acc.m - m_new);
      if (kEnt) acc.e = f * (acc.e + (acc.m - m_new) * acc.s);  // before s is rescaled
      acc.s *= f;
      acc.w *= f;
    }
    acc.m = m_new;
  }
  return acc.m != -INFINITY;
}

__device__ __forceinline__ MaxSum shfl_max_sum(MaxSum x, int offset) {
  return MaxSum{__shfl_xor_sync(0xffffffffu, x.m, offset),
                __shfl_xor_sync(0xffffffffu, x.s, offset),
                __shfl_xor_sync(0xffffffffu, x.w, offset),
                __shfl_xor_sync(0xffffffffu, x.e, offset)};
}

// Reduce `n` MaxSums and one plain sum across the block; thread 0 gets the result.
template <int N>
__device__ void block_reduce(MaxSum (&acc)[N], float& plain) {
  __shared__ MaxSum sh[N][kThreads / 32];
  __shared__ float shp[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = merge_max_sum(acc[i], shfl_max_sum(acc[i], off));
    plain += __shfl_xor_sync(0xffffffffu, plain, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) sh[i][warp] = acc[i];
    shp[warp] = plain;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) {
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = merge_max_sum(acc[i], sh[i][w]);
      plain += shp[w];
    }
  }
}

__device__ __forceinline__ void tempered(const RowParams& p, float zr, float tr, float& z,
                                         float& a, float& b) {
  z = softcap<ScalarMath>(zr * p.scale_s, p.scap, p.inv_scap);
  a = z * p.inv_t;
  b = softcap<ScalarMath>(tr * p.scale_t, p.tcap, p.inv_tcap) * p.inv_t;
}

// kEnt: sum e_a (the entropy); a template parameter so that the skipped path (p.want_e
// false) has no per-element work for it.
template <bool kEnt>
__global__ void __launch_bounds__(kThreads) stats_kernel(RowArgs g, float* out, float* work,
                                                         int nb) {
  const Span s = block_span(g, nb);
  const RowParams& p = g.p;
  const bool rev = p.stats_weight == kWeightStudent, fwd = p.stats_weight == kWeightTeacher;
  const bool cez = p.ce_separate;
  MaxSum acc[3] = {{-INFINITY, 0.f, 0.f, 0.f}, {-INFINITY, 0.f, 0.f, 0.f},
                   {-INFINITY, 0.f, 0.f, 0.f}};
  auto add = [&](const float* zv, const float* av, const float* bv, int n) {
    float ma = -INFINITY, mb = -INFINITY, mz = -INFINITY;
    for (int i = 0; i < n; ++i) {
      ma = ScalarMath::max(ma, av[i]);
      mb = ScalarMath::max(mb, bv[i]);
      if (cez) mz = ScalarMath::max(mz, zv[i]);
    }
    const bool la = raise<kEnt>(acc[0], ma), lb = raise(acc[1], mb);
    const bool lz = cez && raise(acc[2], mz);
    for (int i = 0; i < n; ++i) {
      if (la) {
        const float d = av[i] - acc[0].m, e = __expf(d);
        acc[0].s += e;
        if (kEnt) acc[0].e += xexp_term<ScalarMath>(e, d);
        if (rev) acc[0].w += e * (av[i] - bv[i]);
      }
      if (lb) {
        const float e = __expf(bv[i] - acc[1].m);
        acc[1].s += e;
        if (fwd) acc[1].w += e * (bv[i] - av[i]);
      }
      if (lz) acc[2].s += __expf(zv[i] - acc[2].m);
    }
  };
  walk(
      g, s, true,
      [&](int64_t, float zr, float tr) {
        float z, a, b;
        tempered(p, zr, tr, z, a, b);
        add(&z, &a, &b, 1);
      },
      [&](int64_t, const float* zr, const float* tr) {
        float z[kChunk], a[kChunk], b[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) tempered(p, zr[i], tr[i], z[i], a[i], b[i]);
        add(z, a, b, kChunk);
      });
  float label_z = 0.0f;
  block_reduce<3>(acc, label_z);
  if (threadIdx.x != 0) return;
  if (!kEnt) acc[0].e = 0.0f;  // the reduction's rescale moved the zeros
  const int64_t label = p.has_ce && g.labels ? g.labels[s.row] : -1;
  if (label >= s.c0 && label < s.c1) {
    const float zr = load1(row_ptr(g.zs, g.zs_dtype, g.zs_stride, s.row), g.zs_dtype, label);
    label_z = softcap<ScalarMath>(zr * p.scale_s, p.scap, p.inv_scap);
  }
  const MaxSum z = cez ? acc[2] : acc[0];
  if (!rev) acc[0].w = 0.0f;
  if (!fwd) acc[1].w = 0.0f;
  put_stats(nb == 1 ? out + s.row * kStats : work + blockIdx.x * kStats, acc[0], acc[1], z,
            label_z);
}

__global__ void merge_stats_kernel(const float* work, float* out, int64_t rows, int nb,
                                   bool want_e) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r < rows) merge_stats(work + r * nb * kStats, nb, kStats, want_e, out + r * kStats);
}

__global__ void __launch_bounds__(kThreads) mix_kernel(RowArgs g, float* out, float* work,
                                                       int nb) {
  const Span s = block_span(g, nb);
  const RowParams& p = g.p;
  const float* nr = g.norms + s.row * kNormCols;
  const Norm<ScalarMath> na{nr[kNormColMA], nr[kNormColLogSA]};
  const Norm<ScalarMath> nbn{nr[kNormColMB], nr[kNormColLogSB]};
  float c0 = 0.0f, c1 = 0.0f;
  auto add = [&](float zr, float tr) {
    float z, a, b;
    tempered(p, zr, tr, z, a, b);
    mix_terms<ScalarMath>(p, a, b, na, nbn, c0, c1);
  };
  walk(
      g, s, true, [&](int64_t, float zr, float tr) { add(zr, tr); },
      [&](int64_t, const float* zr, const float* tr) {
#pragma unroll
        for (int i = 0; i < kChunk; ++i) add(zr[i], tr[i]);
      });
  // c0 rides in the w slot of a MaxSum with m = 0 and s = 0, whose merge is a plain sum.
  MaxSum none[1] = {{0.0f, 0.0f, c0, 0.0f}};
  block_reduce<1>(none, c1);
  if (threadIdx.x != 0) return;
  const float half = p.div == kTVD ? 0.5f : 1.0f;
  float* o = nb == 1 ? out + s.row * kMixSums : work + blockIdx.x * kMixSums;
  o[kMixSumC0] = half * none[0].w;
  o[kMixSumC1] = half * c1;
}

__global__ void merge_mix_kernel(const float* work, float* out, int64_t rows, int nb) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  for (int c = 0; c < kMixSums; ++c) {
    float sum = 0.0f;
    for (int b = 0; b < nb; ++b) sum += work[(r * nb + b) * kMixSums + c];
    out[r * kMixSums + c] = sum;
  }
}

__global__ void __launch_bounds__(kThreads) grad_kernel(RowArgs g, int nb) {
  const Span s = block_span(g, nb);
  const RowParams& p = g.p;
  const float* k = g.coef + s.row * kCoefs;
  char* out = static_cast<char*>(g.out) + s.row * g.out_stride * elem_bytes(g.out_dtype);
  const bool dead = dead_row(k);  // ignored row: exact zeros, whatever its logits hold
  const GradRow<ScalarMath> r = grad_row<ScalarMath>(p, k);
  const int64_t label = p.has_ce && g.labels ? g.labels[s.row] : -1;
  auto one = [&](int64_t col, float zr, float tr) {
    if (dead) return 0.0f;
    float z, a, b;
    tempered(p, zr, tr, z, a, b);
    return grad_elem<ScalarMath>(p, r, z, a, b, col == label ? r.ce : 0.0f);
  };
  walk(
      g, s, aligned16(out + s.c0 * elem_bytes(g.out_dtype)),
      [&](int64_t col, float zr, float tr) { store1(out, g.out_dtype, col, one(col, zr, tr)); },
      [&](int64_t col, const float* zr, const float* tr) {
        float d[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) d[i] = one(col + i, zr[i], tr[i]);
        store8(out + col * elem_bytes(g.out_dtype), g.out_dtype, d);
      });
}

// Student-only ops: visit columns [c0, c1) of the block's student row, fn1(col, z_raw) per
// element or fn8(col, z_raw[8]) per 8-column chunk when the pointers are 16-byte aligned.
template <class F1, class F8>
__device__ __forceinline__ void walk_student(const RowArgs& g, const Span& s, bool out_aligned,
                                             F1 fn1, F8 fn8) {
  const char* zs = row_ptr(g.zs, g.zs_dtype, g.zs_stride, s.row);
  int64_t col = s.c0;
  if (out_aligned && aligned16(zs + s.c0 * elem_bytes(g.zs_dtype))) {
    const int64_t nchunks = (s.c1 - s.c0) / kChunk;
    for (int64_t k = threadIdx.x; k < nchunks; k += blockDim.x) {
      const int64_t c = s.c0 + k * kChunk;
      float zv[kChunk];
      load8(zs + c * elem_bytes(g.zs_dtype), g.zs_dtype, zv);
      fn8(c, zv);
    }
    col = s.c0 + nchunks * kChunk;
  }
  for (int64_t c = col + threadIdx.x; c < s.c1; c += blockDim.x)
    fn1(c, load1(zs, g.zs_dtype, c));
}

template <bool kEnt>
__global__ void __launch_bounds__(kThreads) student_stats_kernel(RowArgs g, float* out,
                                                                 float* work, int nb) {
  const Span s = block_span(g, nb);
  const RowParams& p = g.p;
  const bool cez = p.ce_separate;
  MaxSum acc[2] = {{-INFINITY, 0.f, 0.f, 0.f}, {-INFINITY, 0.f, 0.f, 0.f}};
  auto add = [&](const float* zr, int n) {
    float z[kChunk], a[kChunk];
    float ma = -INFINITY, mz = -INFINITY;
    for (int i = 0; i < n; ++i) {
      z[i] = masked_softcap<ScalarMath>(zr[i] * p.scale_s, p.scap, p.inv_scap);
      a[i] = z[i] * p.inv_t;
      ma = ScalarMath::max(ma, a[i]);
      if (cez) mz = ScalarMath::max(mz, z[i]);
    }
    const bool la = raise<kEnt>(acc[0], ma), lz = cez && raise(acc[1], mz);
    for (int i = 0; i < n; ++i) {
      if (la) {
        const float d = a[i] - acc[0].m, e = __expf(d);
        acc[0].s += e;
        if (kEnt) acc[0].e += xexp_term<ScalarMath>(e, d);  // masked: d = -inf, term 0
      }
      if (lz) acc[1].s += __expf(z[i] - acc[1].m);
    }
  };
  walk_student(
      g, s, true, [&](int64_t, float zr) { add(&zr, 1); },
      [&](int64_t, const float* zr) { add(zr, kChunk); });
  float none = 0.0f;
  block_reduce<2>(acc, none);
  if (threadIdx.x != 0) return;
  if (!kEnt) acc[0].e = 0.0f;  // the reduction's rescale moved the zeros
  put_student_stats(nb == 1 ? out + s.row * kSStats : work + blockIdx.x * kSStats, acc[0],
                    cez ? acc[1] : acc[0]);
}

__global__ void merge_student_stats_kernel(const float* work, float* out, int64_t rows,
                                           int nb, bool want_e) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r < rows)
    merge_student_stats(work + r * nb * kSStats, nb, kSStats, want_e, out + r * kSStats);
}

__global__ void __launch_bounds__(kThreads) student_grad_kernel(RowArgs g, int nb) {
  const Span s = block_span(g, nb);
  const RowParams& p = g.p;
  const StudentRow<ScalarMath> r = student_row<ScalarMath>(p, g.coef + s.row * kSCoefs);
  char* out = static_cast<char*>(g.out) + s.row * g.out_stride * elem_bytes(g.out_dtype);
  const bool dead = student_dead(r);  // exact zeros, whatever the logits hold
  const int64_t label = r.use_ce && g.labels ? g.labels[s.row] : -1;
  auto one = [&](int64_t col, float zr) {
    if (dead) return 0.0f;
    const float z = masked_softcap<ScalarMath>(zr * p.scale_s, p.scap, p.inv_scap);
    return student_grad_elem<ScalarMath>(p, r, z, z * p.inv_t, col == label ? r.ce : 0.0f);
  };
  walk_student(
      g, s, aligned16(out + s.c0 * elem_bytes(g.out_dtype)),
      [&](int64_t col, float zr) { store1(out, g.out_dtype, col, one(col, zr)); },
      [&](int64_t col, const float* zr) {
        float d[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) d[i] = one(col + i, zr[i]);
        store8(out + col * elem_bytes(g.out_dtype), g.out_dtype, d);
      });
}

int64_t grid_of(const RowArgs& g, int nb) { return g.rows * nb; }

// gridDim.x is at most 2^31 - 1; a larger grid would be silently truncated by dim3.
bool grid_fits(const RowArgs& g, int nb) { return grid_of(g, nb) <= 0x7fffffff; }

// The merge kernels: one thread per row.
constexpr int kMergeThreads = 256;
int64_t merge_grid(const RowArgs& g) { return (g.rows + kMergeThreads - 1) / kMergeThreads; }

}  // namespace

cudaError_t cuda_blocks_per_row(int64_t rows, int64_t cols, int device, int* nb) {
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: keep it from being blamed on the next launch
    return err;
  }
  if (rows >= 2 * sms) {
    *nb = 1;
  } else {
    const int64_t want = (4 * sms + rows - 1) / rows;
    const int64_t most = cols / (kThreads * kChunk * 2);
    *nb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, most)));
  }
  return cudaSuccess;
}

// Each launch is followed by cudaGetLastError: a bad grid or a missing kernel image for this
// GPU would otherwise surface at some later, unrelated CUDA call.
cudaError_t cuda_row_stats(const RowArgs& g, float* out, float* work, int nb,
                           cudaStream_t stream) {
  if (!grid_fits(g, nb)) return cudaErrorInvalidConfiguration;
  // One launch site (each launch is followed by its checked cudaGetLastError).
  const auto kernel = g.p.want_e ? stats_kernel<true> : stats_kernel<false>;
  kernel<<<grid_of(g, nb), kThreads, 0, stream>>>(g, out, work, nb);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess || nb == 1) return err;
  merge_stats_kernel<<<merge_grid(g), kMergeThreads, 0, stream>>>(work, out, g.rows, nb,
                                                                  g.p.want_e);
  return cudaGetLastError();
}

cudaError_t cuda_row_mix(const RowArgs& g, float* out, float* work, int nb,
                         cudaStream_t stream) {
  if (!grid_fits(g, nb)) return cudaErrorInvalidConfiguration;
  mix_kernel<<<grid_of(g, nb), kThreads, 0, stream>>>(g, out, work, nb);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess || nb == 1) return err;
  merge_mix_kernel<<<merge_grid(g), kMergeThreads, 0, stream>>>(work, out, g.rows, nb);
  return cudaGetLastError();
}

cudaError_t cuda_row_grad(const RowArgs& g, int nb, cudaStream_t stream) {
  if (!grid_fits(g, nb)) return cudaErrorInvalidConfiguration;
  grad_kernel<<<grid_of(g, nb), kThreads, 0, stream>>>(g, nb);
  return cudaGetLastError();
}

cudaError_t cuda_student_stats(const RowArgs& g, float* out, float* work, int nb,
                               cudaStream_t stream) {
  if (!grid_fits(g, nb)) return cudaErrorInvalidConfiguration;
  const auto kernel = g.p.want_e ? student_stats_kernel<true> : student_stats_kernel<false>;
  kernel<<<grid_of(g, nb), kThreads, 0, stream>>>(g, out, work, nb);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess || nb == 1) return err;
  merge_student_stats_kernel<<<merge_grid(g), kMergeThreads, 0, stream>>>(work, out, g.rows,
                                                                          nb, g.p.want_e);
  return cudaGetLastError();
}

cudaError_t cuda_student_grad(const RowArgs& g, int nb, cudaStream_t stream) {
  if (!grid_fits(g, nb)) return cudaErrorInvalidConfiguration;
  student_grad_kernel<<<grid_of(g, nb), kThreads, 0, stream>>>(g, nb);
  return cudaGetLastError();
}

}  // namespace kdk

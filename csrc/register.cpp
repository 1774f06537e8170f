// torch.library registration of the row ops: schemas once, argument checks, device impls.
//
// Compiled twice by kdkernels/_build.py: into the CPU extension (schemas + CPU impls) and,
// with KDKERNELS_CUDA_BUILD defined, into the CUDA extension (CUDA impls only; that library
// needs the CPU one loaded first, since it holds the schemas). Fake impls are in Python
// (kdkernels/_ops.py) so the ops trace under torch.compile.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "row_math.h"
#ifdef KDKERNELS_CUDA_BUILD
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "rows_cuda.h"
#else
#include "rows_cpu.h"
#endif

namespace kdk {
namespace {

using at::Tensor;

// The row constants arrive as RowSpec.consts (kdkernels/layouts.py CONSTS), computed once
// in Python for every backend: here they are only checked and unpacked.
RowParams make_params(const std::string& op, int64_t div, at::ArrayRef<double> consts,
                      bool has_ce) {
  TORCH_CHECK(div >= 0 && div < kDivs, op, ": div must be a divergence code in [0, ", kDivs,
              ") (kdkernels.divergences.TABLE), got ", div);
  TORCH_CHECK(static_cast<int64_t>(consts.size()) == kConsts, op, ": consts must be a list of ",
              kConsts, " floats in kdkernels.layouts.CONSTS order (RowSpec.consts), got ",
              consts.size());
  for (size_t i = 0; i < consts.size(); ++i)
    TORCH_CHECK(std::isfinite(consts[i]), op, ": consts[", i, "] must be finite, got ",
                consts[i]);
  const double inv_t = consts[kConstInvT], tempered = consts[kConstTempered];
  const double cap_s = consts[kConstCapS], cap_t = consts[kConstCapT];
  const double w_q = consts[kConstWQ];
  const double mix_kind = consts[kConstMixKind], weight = consts[kConstStatsWeight];
  const double want_e = consts[kConstWantEntropy];
  const float inv_t32 = static_cast<float>(inv_t);  // the kernels' value: fp32 math
  TORCH_CHECK(inv_t32 > 0 && std::isfinite(inv_t32), op, ": consts[inv_t] (1 / temperature) "
              "must be > 0 and finite in float32, got ", inv_t);
  TORCH_CHECK(tempered == 0 || tempered == 1, op, ": consts[tempered] must be 0 or 1, got ",
              tempered);
  TORCH_CHECK(cap_s >= 0 && cap_t >= 0, op, ": consts[cap_s] and consts[cap_t] must be >= 0 "
              "(0 = no softcap), got ", cap_s, " and ", cap_t);
  TORCH_CHECK(w_q >= 0 && w_q <= 1, op, ": consts[w_q] must be in [0, 1], got ", w_q);
  TORCH_CHECK(mix_kind == std::floor(mix_kind) && mix_kind >= 0 && mix_kind < int{kMixKinds},
              op, ": consts[mix_kind] must be a MIX_KINDS index in [0, ", kMixKinds, "), got ",
              mix_kind);
  TORCH_CHECK(weight == std::floor(weight) && weight >= 0 && weight < int{kWeights}, op,
              ": consts[stats_weight] must be a STATS_WEIGHTS index in [0, ", kWeights,
              "), got ", weight);
  TORCH_CHECK(want_e == 0 || want_e == 1, op, ": consts[want_entropy] must be 0 or 1, got ",
              want_e);
  const float scale_s = static_cast<float>(consts[kConstScaleS]);
  const float scale_t = static_cast<float>(consts[kConstScaleT]);
  TORCH_CHECK(scale_s > 0 && std::isfinite(scale_s) && scale_t > 0 && std::isfinite(scale_t),
              op, ": consts[scale_s] and consts[scale_t] (logit scales) must be > 0 and finite "
              "in float32, got ", consts[kConstScaleS], " and ", consts[kConstScaleT]);
  RowParams p{};
  p.div = static_cast<int>(div);
  p.scale_s = scale_s;
  p.scale_t = scale_t;
  p.inv_t = inv_t32;
  if (cap_s > 0) {
    p.scap = static_cast<float>(cap_s);
    p.inv_scap = 1.0f / p.scap;
  }
  if (cap_t > 0) {
    p.tcap = static_cast<float>(cap_t);
    p.inv_tcap = 1.0f / p.tcap;
  }
  p.has_ce = has_ce;
  p.ce_separate = has_ce && tempered != 0;
  p.want_e = want_e != 0;
  p.mix_kind = static_cast<int>(mix_kind);
  p.stats_weight = static_cast<int>(weight);
  p.w_q = static_cast<float>(w_q);
  p.log_wq = static_cast<float>(consts[kConstLogWQ]);
  p.log_wp = static_cast<float>(consts[kConstLogWP]);
  p.k_div = static_cast<float>(consts[kConstKDiv]);
  return p;
}

int dtype_code(const std::string& op, const char* arg, const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float32, bfloat16 or float16, got ",
                  x.scalar_type());
  }
}

// A [rows, cols] logits view: 2-D, unit column stride, row stride >= cols.
void check_logits(const std::string& op, const char* arg, const Tensor& x, int64_t rows,
                  int64_t cols, const Tensor& like) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && x.size(1) == cols, op, ": ", arg,
              " must have shape [", rows, ", ", cols, "] (as zs), got ", x.sizes());
  TORCH_CHECK(x.device() == like.device(), op, ": ", arg, " is on ", x.device(),
              " but zs is on ", like.device());
  TORCH_CHECK(cols <= 1 || x.stride(1) == 1, op, ": ", arg,
              " must have unit column stride, got strides ", x.strides());
  TORCH_CHECK(rows <= 1 || x.stride(0) >= cols, op, ": ", arg,
              " must have row stride >= its width ", cols, ", got strides ", x.strides());
}

void check_rows(const std::string& op, const char* arg, const Tensor& x, int64_t rows,
                int64_t width, at::ScalarType dtype, const Tensor& like) {
  const bool shape_ok = width == 0 ? (x.dim() == 1 && x.size(0) == rows)
                                   : (x.dim() == 2 && x.size(0) == rows && x.size(1) == width);
  TORCH_CHECK(shape_ok, op, ": ", arg, " must have shape [", rows,
              width == 0 ? "" : (", " + std::to_string(width)).c_str(), "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", arg, " must be ", dtype, ", got ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": ", arg, " must be contiguous");
  TORCH_CHECK(x.device() == like.device(), op, ": ", arg, " is on ", x.device(),
              " but zs is on ", like.device());
}

// zt null: a student-only op (g.zt stays null).
RowArgs make_args(const std::string& op, const Tensor& zs, const Tensor* zt,
                  const Tensor* labels, const RowParams& p) {
  TORCH_CHECK(zs.dim() == 2, op, ": zs must be a 2-D [C, V] tensor, got shape ", zs.sizes());
  const int64_t rows = zs.size(0), cols = zs.size(1);
  check_logits(op, "zs", zs, rows, cols, zs);
  RowArgs g{};
  g.zs = zs.data_ptr();
  g.zs_dtype = dtype_code(op, "zs", zs);
  g.zs_stride = zs.stride(0);
  if (zt) {
    check_logits(op, "zt", *zt, rows, cols, zs);
    g.zt = zt->data_ptr();
    g.zt_dtype = dtype_code(op, "zt", *zt);
    g.zt_stride = zt->stride(0);
  }
  g.rows = rows;
  g.cols = cols;
  g.p = p;
  if (labels) {
    check_rows(op, "labels", *labels, rows, 0, at::kLong, zs);
    g.labels = labels->data_ptr<int64_t>();
#ifndef KDKERNELS_CUDA_BUILD  // CUDA kernels skip labels outside [0, V) instead (no sync)
    for (int64_t r = 0; r < rows; ++r)
      TORCH_CHECK(g.labels[r] >= -1 && g.labels[r] < cols, op, ": labels must hold -1 or a "
                  "column in [0, ", cols, "), got ", g.labels[r], " at row ", r);
#endif
  }
  return g;
}

#ifdef KDKERNELS_CUDA_BUILD
int blocks(const std::string& op, const RowArgs& g, const Tensor& zs) {
  int nb = 1;
  const cudaError_t err = cuda_blocks_per_row(g.rows, g.cols, zs.get_device(), &nb);
  TORCH_CHECK(err == cudaSuccess, op, ": cannot read the SM count of CUDA device ",
              zs.get_device(), ": ", cudaGetErrorString(err));
  return nb;
}

Tensor workspace(const RowArgs& g, int nb, const Tensor& zs) {
  return at::empty({nb > 1 ? g.rows * nb * kStats : 0}, zs.options().dtype(at::kFloat));
}
#endif

Tensor row_stats(const Tensor& zs, const Tensor& zt, const Tensor& labels, int64_t div,
                 at::ArrayRef<double> consts, bool has_ce) {
  const std::string op = "kdkernels::row_stats";
  RowArgs g = make_args(op, zs, &zt, &labels, make_params(op, div, consts, has_ce));
  Tensor out = at::empty({g.rows, kStats}, zs.options().dtype(at::kFloat));
  if (g.rows == 0) return out;
#ifdef KDKERNELS_CUDA_BUILD
  c10::cuda::CUDAGuard guard(zs.device());
  const int nb = blocks(op, g, zs);
  Tensor work = workspace(g, nb, zs);
  C10_CUDA_CHECK(cuda_row_stats(g, out.data_ptr<float>(), work.data_ptr<float>(), nb,
                                c10::cuda::getCurrentCUDAStream()));
#else
  cpu_row_stats(g, out.data_ptr<float>(), at::get_num_threads());
#endif
  return out;
}

Tensor row_mix(const Tensor& zs, const Tensor& zt, const Tensor& norms, int64_t div,
               at::ArrayRef<double> consts) {
  const std::string op = "kdkernels::row_mix";
  RowParams p = make_params(op, div, consts, false);
  TORCH_CHECK(has_mix_terms(p.div), op, ": divergence code ", div, " has no mix pass (only "
              "the divergences with needs_mix in kdkernels.divergences.TABLE have one)");
  RowArgs g = make_args(op, zs, &zt, nullptr, p);
  check_rows(op, "norms", norms, g.rows, kNormCols, at::kFloat, zs);
  g.norms = norms.data_ptr<float>();
  Tensor out = at::empty({g.rows, kMixSums}, zs.options().dtype(at::kFloat));
  if (g.rows == 0) return out;
#ifdef KDKERNELS_CUDA_BUILD
  c10::cuda::CUDAGuard guard(zs.device());
  const int nb = blocks(op, g, zs);
  Tensor work = workspace(g, nb, zs);
  C10_CUDA_CHECK(cuda_row_mix(g, out.data_ptr<float>(), work.data_ptr<float>(), nb,
                              c10::cuda::getCurrentCUDAStream()));
#else
  cpu_row_mix(g, out.data_ptr<float>(), at::get_num_threads());
#endif
  return out;
}

// The gradient ops' coefficients [rows, n_coef] and their output dL/dz (the logits' shape).
void bind_grad(const std::string& op, RowArgs& g, const Tensor& zs, const Tensor& coef,
               int64_t n_coef, const Tensor& out) {
  check_rows(op, "coef", coef, g.rows, n_coef, at::kFloat, zs);
  check_logits(op, "out", out, g.rows, g.cols, zs);
  g.coef = coef.data_ptr<float>();
  g.out = out.data_ptr();
  g.out_dtype = dtype_code(op, "out", out);
  g.out_stride = out.stride(0);
}

void row_grad_(const Tensor& zs, const Tensor& zt, const Tensor& labels, const Tensor& coef,
               int64_t div, at::ArrayRef<double> consts, bool has_ce, const Tensor& out) {
  const std::string op = "kdkernels::row_grad_";
  RowArgs g = make_args(op, zs, &zt, &labels, make_params(op, div, consts, has_ce));
  bind_grad(op, g, zs, coef, kCoefs, out);
  if (g.rows == 0 || g.cols == 0) return;
#ifdef KDKERNELS_CUDA_BUILD
  c10::cuda::CUDAGuard guard(zs.device());
  C10_CUDA_CHECK(cuda_row_grad(g, blocks(op, g, zs), c10::cuda::getCurrentCUDAStream()));
#else
  cpu_row_grad(g, at::get_num_threads());
#endif
}

// The student-only ops take no divergence: the consts are checked as for the others.
Tensor student_stats(const Tensor& zs, at::ArrayRef<double> consts, bool has_ce) {
  const std::string op = "kdkernels::student_stats";
  RowArgs g = make_args(op, zs, nullptr, nullptr, make_params(op, kForwardKL, consts, has_ce));
  Tensor out = at::empty({g.rows, kSStats}, zs.options().dtype(at::kFloat));
  if (g.rows == 0) return out;
#ifdef KDKERNELS_CUDA_BUILD
  c10::cuda::CUDAGuard guard(zs.device());
  const int nb = blocks(op, g, zs);
  Tensor work = workspace(g, nb, zs);
  C10_CUDA_CHECK(cuda_student_stats(g, out.data_ptr<float>(), work.data_ptr<float>(), nb,
                                    c10::cuda::getCurrentCUDAStream()));
#else
  cpu_student_stats(g, out.data_ptr<float>(), at::get_num_threads());
#endif
  return out;
}

void student_grad_(const Tensor& zs, const Tensor& labels, const Tensor& coef,
                   at::ArrayRef<double> consts, bool has_ce, const Tensor& out) {
  const std::string op = "kdkernels::student_grad_";
  RowArgs g = make_args(op, zs, nullptr, &labels, make_params(op, kForwardKL, consts, has_ce));
  bind_grad(op, g, zs, coef, kSCoefs, out);
  if (g.rows == 0 || g.cols == 0) return;
#ifdef KDKERNELS_CUDA_BUILD
  c10::cuda::CUDAGuard guard(zs.device());
  C10_CUDA_CHECK(cuda_student_grad(g, blocks(op, g, zs), c10::cuda::getCurrentCUDAStream()));
#else
  cpu_student_grad(g, at::get_num_threads());
#endif
}

}  // namespace
}  // namespace kdk

#ifndef KDKERNELS_CUDA_BUILD
TORCH_LIBRARY(kdkernels, m) {
  // div: kdkernels.divergences code; consts: RowSpec.consts (layouts.CONSTS order).
  m.def("row_stats(Tensor zs, Tensor zt, Tensor labels, int div, float[] consts, bool has_ce) "
        "-> Tensor");
  m.def("row_mix(Tensor zs, Tensor zt, Tensor norms, int div, float[] consts) -> Tensor");
  m.def("row_grad_(Tensor zs, Tensor zt, Tensor labels, Tensor coef, int div, float[] consts, "
        "bool has_ce, Tensor(a!) out) -> ()");
  // The student-only ops of the sparse-teacher losses (backends/base.py).
  m.def("student_stats(Tensor zs, float[] consts, bool has_ce) -> Tensor");
  m.def("student_grad_(Tensor zs, Tensor labels, Tensor coef, float[] consts, bool has_ce, "
        "Tensor(a!) out) -> ()");
}
#define KDK_DEVICE CPU
#else
#define KDK_DEVICE CUDA
#endif

TORCH_LIBRARY_IMPL(kdkernels, KDK_DEVICE, m) {
  m.impl("row_stats", &kdk::row_stats);
  m.impl("row_mix", &kdk::row_mix);
  m.impl("row_grad_", &kdk::row_grad_);
  m.impl("student_stats", &kdk::student_stats);
  m.impl("student_grad_", &kdk::student_grad_);
}

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
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "rows_cuda.h"
#else
#include "rows_cpu.h"
#endif

namespace kdk {
namespace {

using at::Tensor;

int div_code(const std::string& op, c10::string_view name) {
  static const char* kNames[] = {"forward_kl",      "reverse_kl",      "jsd",
                                 "skew_forward_kl", "skew_reverse_kl", "tvd"};
  for (int i = 0; i < 6; ++i)
    if (name == kNames[i]) return i;
  TORCH_CHECK(false, op, ": divergence must be one of forward_kl, reverse_kl, jsd, "
              "skew_forward_kl, skew_reverse_kl, tvd; got '", std::string(name), "'");
}

float positive(const std::string& op, const char* arg, double v) {
  TORCH_CHECK(std::isfinite(v) && v > 0, op, ": ", arg, " must be a finite number > 0, got ", v);
  return static_cast<float>(v);
}

RowParams make_params(const std::string& op, c10::string_view divergence, double temperature,
                      double beta, double skew, std::optional<double> scap,
                      std::optional<double> tcap, bool has_ce) {
  RowParams p{};
  p.div = div_code(op, divergence);
  const float t = positive(op, "temperature", temperature);
  TORCH_CHECK(beta >= 0 && beta <= 1, op, ": beta must be in [0, 1], got ", beta);
  TORCH_CHECK(skew >= 0 && skew <= 1, op, ": skew must be in [0, 1], got ", skew);
  p.inv_t = 1.0f / t;
  if (scap) {
    p.scap = positive(op, "student_softcap", *scap);
    p.inv_scap = 1.0f / p.scap;
  }
  if (tcap) {
    p.tcap = positive(op, "teacher_softcap", *tcap);
    p.inv_tcap = 1.0f / p.tcap;
  }
  p.has_ce = has_ce;
  p.ce_separate = has_ce && t != 1.0f;
  double wq = 0.0;  // weight of q in the log-mixture
  p.soft_scale = 1.0f;
  if (p.div == kJSD) {
    wq = beta;
    p.soft_scale = static_cast<float>(1.0 - beta);
  } else if (p.div == kSkewForwardKL) {
    wq = skew;
    p.soft_scale = static_cast<float>(-(1.0 - skew));
  } else if (p.div == kSkewReverseKL) {
    wq = 1.0 - skew;
  }
  p.skew = static_cast<float>(skew);
  p.mix_mode = wq == 0.0 ? kMixIsP : (wq == 1.0 ? kMixIsQ : kMixGeneral);
  if (p.mix_mode == kMixGeneral) {
    p.log_wq = static_cast<float>(std::log(wq));
    p.log_wp = static_cast<float>(std::log1p(-wq));
  }
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

RowArgs make_args(const std::string& op, const Tensor& zs, const Tensor& zt,
                  const Tensor* labels, const RowParams& p) {
  TORCH_CHECK(zs.dim() == 2, op, ": zs must be a 2-D [C, V] tensor, got shape ", zs.sizes());
  const int64_t rows = zs.size(0), cols = zs.size(1);
  check_logits(op, "zs", zs, rows, cols, zs);
  check_logits(op, "zt", zt, rows, cols, zs);
  RowArgs g{};
  g.zs = zs.data_ptr();
  g.zt = zt.data_ptr();
  g.zs_dtype = dtype_code(op, "zs", zs);
  g.zt_dtype = dtype_code(op, "zt", zt);
  g.zs_stride = zs.stride(0);
  g.zt_stride = zt.stride(0);
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
int blocks(const RowArgs& g, const Tensor& zs) {
  return cuda_blocks_per_row(g.rows, g.cols, zs.get_device());
}

Tensor workspace(const RowArgs& g, int nb, const Tensor& zs) {
  return at::empty({nb > 1 ? g.rows * nb * kStats : 0}, zs.options().dtype(at::kFloat));
}
#endif

Tensor row_stats(const Tensor& zs, const Tensor& zt, const Tensor& labels,
                 c10::string_view divergence, double temperature, double beta, double skew,
                 std::optional<double> student_softcap, std::optional<double> teacher_softcap,
                 bool has_ce) {
  const std::string op = "kdkernels::row_stats";
  RowParams p = make_params(op, divergence, temperature, beta, skew, student_softcap,
                            teacher_softcap, has_ce);
  RowArgs g = make_args(op, zs, zt, &labels, p);
  Tensor out = at::empty({g.rows, kStats}, zs.options().dtype(at::kFloat));
  if (g.rows == 0) return out;
#ifdef KDKERNELS_CUDA_BUILD
  c10::cuda::CUDAGuard guard(zs.device());
  const int nb = blocks(g, zs);
  Tensor work = workspace(g, nb, zs);
  cuda_row_stats(g, out.data_ptr<float>(), work.data_ptr<float>(), nb,
                 c10::cuda::getCurrentCUDAStream());
#else
  cpu_row_stats(g, out.data_ptr<float>(), at::get_num_threads());
#endif
  return out;
}

Tensor row_mix(const Tensor& zs, const Tensor& zt, const Tensor& norms,
               c10::string_view divergence, double temperature, double beta, double skew,
               std::optional<double> student_softcap, std::optional<double> teacher_softcap) {
  const std::string op = "kdkernels::row_mix";
  RowParams p = make_params(op, divergence, temperature, beta, skew, student_softcap,
                            teacher_softcap, false);
  TORCH_CHECK(p.div >= kJSD, op, ": the mix pass is only defined for jsd, skew_forward_kl, "
              "skew_reverse_kl and tvd, got '", std::string(divergence), "'");
  RowArgs g = make_args(op, zs, zt, nullptr, p);
  check_rows(op, "norms", norms, g.rows, kNorms, at::kFloat, zs);
  g.norms = norms.data_ptr<float>();
  Tensor out = at::empty({g.rows, kMix}, zs.options().dtype(at::kFloat));
  if (g.rows == 0) return out;
#ifdef KDKERNELS_CUDA_BUILD
  c10::cuda::CUDAGuard guard(zs.device());
  const int nb = blocks(g, zs);
  Tensor work = workspace(g, nb, zs);
  cuda_row_mix(g, out.data_ptr<float>(), work.data_ptr<float>(), nb,
               c10::cuda::getCurrentCUDAStream());
#else
  cpu_row_mix(g, out.data_ptr<float>(), at::get_num_threads());
#endif
  return out;
}

void row_grad_(const Tensor& zs, const Tensor& zt, const Tensor& labels, const Tensor& coef,
               c10::string_view divergence, double temperature, double beta, double skew,
               std::optional<double> student_softcap, std::optional<double> teacher_softcap,
               bool has_ce, const Tensor& out) {
  const std::string op = "kdkernels::row_grad_";
  RowParams p = make_params(op, divergence, temperature, beta, skew, student_softcap,
                            teacher_softcap, has_ce);
  RowArgs g = make_args(op, zs, zt, &labels, p);
  check_rows(op, "coef", coef, g.rows, kCoef, at::kFloat, zs);
  check_logits(op, "out", out, g.rows, g.cols, zs);
  g.coef = coef.data_ptr<float>();
  g.out = out.data_ptr();
  g.out_dtype = dtype_code(op, "out", out);
  g.out_stride = out.stride(0);
  if (g.rows == 0 || g.cols == 0) return;
#ifdef KDKERNELS_CUDA_BUILD
  c10::cuda::CUDAGuard guard(zs.device());
  cuda_row_grad(g, blocks(g, zs), c10::cuda::getCurrentCUDAStream());
#else
  cpu_row_grad(g, at::get_num_threads());
#endif
}

}  // namespace
}  // namespace kdk

#ifndef KDKERNELS_CUDA_BUILD
TORCH_LIBRARY(kdkernels, m) {
  m.def("row_stats(Tensor zs, Tensor zt, Tensor labels, str divergence, float temperature, "
        "float beta, float skew, float? student_softcap, float? teacher_softcap, bool has_ce) "
        "-> Tensor");
  m.def("row_mix(Tensor zs, Tensor zt, Tensor norms, str divergence, float temperature, "
        "float beta, float skew, float? student_softcap, float? teacher_softcap) -> Tensor");
  m.def("row_grad_(Tensor zs, Tensor zt, Tensor labels, Tensor coef, str divergence, "
        "float temperature, float beta, float skew, float? student_softcap, "
        "float? teacher_softcap, bool has_ce, Tensor(a!) out) -> ()");
}
#define KDK_DEVICE CPU
#else
#define KDK_DEVICE CUDA
#endif

TORCH_LIBRARY_IMPL(kdkernels, KDK_DEVICE, m) {
  m.impl("row_stats", &kdk::row_stats);
  m.impl("row_mix", &kdk::row_mix);
  m.impl("row_grad_", &kdk::row_grad_);
}

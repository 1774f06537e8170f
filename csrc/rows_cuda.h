// Entry points of the CUDA row ops (rows_cuda.cu). No torch header: the .cu compiles fast.
#pragma once

#include <cuda_runtime_api.h>

#include "row_math.h"

namespace kdk {

// Each returns the CUDA error of its query or launches (cudaSuccess when all went well);
// register.cpp raises it.

// Vocab blocks per row (*nb, 1 = no split) for `rows` rows of `cols` columns on `device`;
// the error of the SM-count query, never a guessed count.
cudaError_t cuda_blocks_per_row(int64_t rows, int64_t cols, int device, int* nb);
// Each takes a workspace of rows * nb * kStats floats (unused when nb == 1).
cudaError_t cuda_row_stats(const RowArgs& g, float* out, float* work, int nb,
                           cudaStream_t stream);
cudaError_t cuda_row_mix(const RowArgs& g, float* out, float* work, int nb,
                         cudaStream_t stream);
cudaError_t cuda_row_grad(const RowArgs& g, int nb, cudaStream_t stream);
// Student-only ops (g.zt unused); the same workspace as cuda_row_stats.
cudaError_t cuda_student_stats(const RowArgs& g, float* out, float* work, int nb,
                               cudaStream_t stream);
cudaError_t cuda_student_grad(const RowArgs& g, int nb, cudaStream_t stream);

}  // namespace kdk

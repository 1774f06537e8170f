// Entry points of the CUDA row ops (rows_cuda.cu). No torch header: the .cu compiles fast.
#pragma once

#include <cuda_runtime_api.h>

#include "row_math.h"

namespace kdk {

// Vocab blocks per row for `rows` rows of `cols` columns on `device` (1 = no split).
int cuda_blocks_per_row(int64_t rows, int64_t cols, int device);
// Each takes a workspace of rows * blocks_per_row * 9 floats (unused when blocks_per_row == 1).
void cuda_row_stats(const RowArgs& g, float* out, float* work, int nb, cudaStream_t stream);
void cuda_row_mix(const RowArgs& g, float* out, float* work, int nb, cudaStream_t stream);
void cuda_row_grad(const RowArgs& g, int nb, cudaStream_t stream);

}  // namespace kdk

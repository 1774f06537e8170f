// Entry points of the CPU row ops (rows_cpu.cpp); argument checking lives in register.cpp.
#pragma once

#include "row_math.h"

namespace kdk {

void cpu_row_stats(const RowArgs& g, float* out, int threads);  // out [rows, kStats]
void cpu_row_mix(const RowArgs& g, float* out, int threads);    // out [rows, kMixSums]
void cpu_row_grad(const RowArgs& g, int threads);               // writes g.out

// Student-only row ops (g.zt unused).
void cpu_student_stats(const RowArgs& g, float* out, int threads);  // out [rows, kSStats]
void cpu_student_grad(const RowArgs& g, int threads);               // writes g.out

}  // namespace kdk

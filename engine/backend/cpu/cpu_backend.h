/* cpu_backend: the CPU implementation of engine/backend/backend.h.
 * Matrix products: our deterministic blocked kernel (cpu_kernels) or OpenBLAS
 * cblas_sgemm (BE_MATMUL_BLAS); attention and matmul rows are split over a
 * thread pool created once; every scratch buffer is sized at create time for
 * max_batch_tokens, so a forward allocates nothing. KV dtype: f32. */
#ifndef TANDEM_ENGINE_BACKEND_CPU_BACKEND_H
#define TANDEM_ENGINE_BACKEND_CPU_BACKEND_H

#include "engine/backend/backend.h"

extern const be_ops be_cpu_ops;

#endif

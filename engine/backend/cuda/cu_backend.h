/* cu_backend: the CUDA implementation of engine/backend/backend.h ("cuda").
 *
 * Weights are uploaded once at create: matrices as BF16 (F32 models converted
 * on the device, round to nearest even; F16/BF16 kept as stored; F32 kept
 * with be_options.keep_f32_weights), norms and biases as F32. Matrix products
 * are cublasGemmEx with F32 accumulation (CUBLAS_COMPUTE_32F, no TF32) on
 * activations rounded to the weights' dtype; everything else (embedding,
 * RMSNorm, RoPE in both layouts, SwiGLU, paged attention split over the
 * context) is our kernels (cu_kernels.cuh). The KV pool lives in device memory
 * with exactly the common/kv_layout.h layout: the backend's own (cudaMalloc,
 * zeroed) or a caller's device region (kv_mem_kind BE_MEM_DEVICE, e.g. the
 * cuda_ipc transport's pool). KV dtype f32, f16 or bf16.
 *
 * One stream per backend; a forward enqueues every layer and waits once at
 * the end (logits copied out, K/V final). The layer hook gets the layer's
 * event as its fence with be_options.async_fence, else the host waits for
 * that event (not the device) before calling it.
 *
 * Results are deterministic for a given batch; across batch shapes cuBLAS
 * may pick another reduction order, so a row's logits can differ in the last
 * bits with what else is in the batch (tokens are expected to match).
 * probe() is TD_ENODEV when cudaGetDeviceCount fails (no driver, old driver),
 * finds no device, or cuBLAS cannot be loaded: libcublas is opened with
 * dlopen on the first probe that finds a device (by soname, then from the
 * toolkit's library directory of the build), not linked, so processes that
 * never use a GPU do not pay for mapping it. */
#ifndef TANDEM_ENGINE_BACKEND_CUDA_CU_BACKEND_H
#define TANDEM_ENGINE_BACKEND_CUDA_CU_BACKEND_H

#include "engine/backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

extern const be_ops be_cuda_ops;

#ifdef __cplusplus
}
#endif

#endif

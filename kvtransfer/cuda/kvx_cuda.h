/* kvx_cuda: CUDA runtime plumbing shared by the GPU transports (cuda_ipc,
 * nccl): error conversion, device probing, and the per-endpoint stream and
 * pool. Built only when CUDA is found. */
#ifndef TANDEM_KVTRANSFER_KVX_CUDA_H
#define TANDEM_KVTRANSFER_KVX_CUDA_H

#include <cuda_runtime_api.h>
#include <stddef.h>

#include "kvtransfer/kvx_internal.h"

/* 0 for cudaSuccess; otherwise logs the call under mod and returns TD_ENOMEM
 * (allocation failures) or TD_EIO. */
int kvx__cuda_err(const char *mod, cudaError_t e, const char *what);

/* 1 when a CUDA device can be used. Otherwise 0 and the reason in why[n]
 * (any error from cudaGetDeviceCount means no usable device: no driver or
 * no GPU). */
int kvx__cuda_available(char *why, size_t n);

/* Makes ep's device current on the calling thread (CUDA's current device is
 * per thread, so the progress thread needs it too). */
void kvx__cuda_thread_init(kvx_ep *ep);

/* Makes ep's device current, creates *stream (non-blocking) and, when the
 * endpoint was given no pool, allocates one of ep->pool_bytes into
 * *owned_pool and installs it as ep->pool. The caller frees both in its
 * ep_fini. Returns 0, TD_ENOMEM or TD_EIO. */
int kvx__cuda_ep_setup(const char *mod, kvx_ep *ep, cudaStream_t *stream, void **owned_pool);

#endif

#include "kvtransfer/cuda/kvx_cuda.h"

#include <stdio.h>

#include "common/err.h"
#include "common/log.h"

int kvx__cuda_err(const char *mod, cudaError_t e, const char *what)
{
    if (e == cudaSuccess) return 0;
    td_log_error(mod, "cuda_error", "call=%s err=%d msg=\"%s\"", what, (int)e,
                 cudaGetErrorString(e));
    return e == cudaErrorMemoryAllocation ? TD_ENOMEM : TD_EIO;
}

int kvx__cuda_available(char *why, size_t n)
{
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        if (why && n)
            snprintf(why, n, "no CUDA device (cudaGetDeviceCount: %s)",
                     e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 0;
    }
    if (why && n) why[0] = 0;
    return 1;
}

void kvx__cuda_thread_init(kvx_ep *ep)
{
    kvx__cuda_err("kvx_cuda", cudaSetDevice(ep->p.cuda_device), "cudaSetDevice");
}

int kvx__cuda_ep_setup(const char *mod, kvx_ep *ep, cudaStream_t *stream, void **owned_pool)
{
    int rc = kvx__cuda_err(mod, cudaSetDevice(ep->p.cuda_device), "cudaSetDevice");
    if (rc == 0)
        rc = kvx__cuda_err(mod, cudaStreamCreateWithFlags(stream, cudaStreamNonBlocking),
                           "cudaStreamCreate");
    if (rc == 0 && !ep->pool) {
        rc = kvx__cuda_err(mod, cudaMalloc(owned_pool, ep->pool_bytes), "cudaMalloc");
        if (rc == 0) {
            ep->pool = *owned_pool;
            ep->pool_owned = 1;
        }
    }
    return rc;
}

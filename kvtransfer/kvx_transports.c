/* The transports built into this library. The only place that knows which
 * optional transports were compiled (KVX_WITH_* from CMake). */
#include <string.h>

#include "kvtransfer/kvx_internal.h"

static const kvx__ops *const kvx__all[] = {
    &kvx__tcp_ops,
    &kvx__shm_ops,
#ifdef KVX_WITH_CUDA_IPC
    &kvx__cuda_ipc_ops,
#endif
#ifdef KVX_WITH_NCCL
    &kvx__nccl_ops,
#endif
};

const kvx__ops *kvx__ops_find(const char *name)
{
    for (size_t i = 0; i < sizeof(kvx__all) / sizeof(kvx__all[0]); i++)
        if (strcmp(kvx__all[i]->name, name) == 0) return kvx__all[i];
    return NULL;
}

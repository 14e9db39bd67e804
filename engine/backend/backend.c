#include "engine/backend/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "engine/backend/cpu/cpu_backend.h"
#ifdef TANDEM_WITH_CUDA_BACKEND
#include "engine/backend/cuda/cu_backend.h"
#endif

struct be_backend {
    const be_ops *ops;
    void *ctx;
    kv_layout kv;
};

/* Backends built into this binary. */
static const be_ops *const be__registry[] = {
    &be_cpu_ops,
#ifdef TANDEM_WITH_CUDA_BACKEND
    &be_cuda_ops,
#endif
};

const be_ops *be_find(const char *name)
{
    if (!name) return NULL;
    for (size_t i = 0; i < sizeof(be__registry) / sizeof(be__registry[0]); i++)
        if (strcmp(be__registry[i]->name, name) == 0) return be__registry[i];
    return NULL;
}

void be_options_defaults(be_options *o, const mdl_model *m)
{
    memset(o, 0, sizeof(*o));
    o->n_threads = 1;
    o->max_batch_tokens = 512;
    o->max_seqs = 64;
    o->matmul = BE_MATMUL_DETERMINISTIC;
    o->kv.n_layers = (uint32_t)m->cfg.n_layers;
    o->kv.n_kv_heads = (uint32_t)m->cfg.n_kv_heads;
    o->kv.head_dim = (uint32_t)m->cfg.head_dim;
    o->kv.block_size = 16;
    o->kv.dtype = KV_DTYPE_F32;
    /* One sequence of the model's context, capped at 4096 tokens so a
     * 128k-context model does not get gigabytes of KV by default. */
    int tokens = m->cfg.max_seq_len < 4096 ? m->cfg.max_seq_len : 4096;
    uint32_t blocks = (uint32_t)((tokens + 15) / 16);
    o->kv.num_blocks = blocks < 64 ? 64 : blocks;
    o->kv_mem_kind = BE_MEM_HOST;
}

static int be__err(char *err, size_t errlen, int code, const char *msg, const char *arg)
{
    if (err && errlen) snprintf(err, errlen, msg, arg);
    return code;
}

int be_open(const char *name, const mdl_model *m, const be_options *o, be_backend **out, char *err,
            size_t errlen)
{
    *out = NULL;
    const be_ops *ops = be_find(name);
    if (!ops && name && strcmp(name, "cuda") == 0)
        return be__err(err, errlen, TD_ENODEV, "backend \"%s\" is not built in this binary", name);
    if (!ops) return be__err(err, errlen, TD_ENOENT, "unknown backend \"%s\"", name ? name : "");
    int rc = ops->probe();
    if (rc != 0) return be__err(err, errlen, rc, "backend \"%s\" has no device here", name);
    const kv_layout *kv = &o->kv;
    if (kv->n_layers != (uint32_t)m->cfg.n_layers ||
        kv->n_kv_heads != (uint32_t)m->cfg.n_kv_heads ||
        kv->head_dim != (uint32_t)m->cfg.head_dim || kv->block_size == 0 || kv->num_blocks == 0 ||
        kv->block_size > 4096 || kv->num_blocks > (1u << 30))
        return be__err(err, errlen, TD_EINVAL,
                       "KV layout does not match the model (layers, kv heads, head_dim) or has "
                       "no blocks%s",
                       "");
    if (o->kv_mem && ((uintptr_t)o->kv_mem % 64) != 0)
        return be__err(err, errlen, TD_EINVAL, "kv_mem must be 64-byte aligned%s", "");
    if (o->kv_mem && o->kv_mem_kind != ops->mem)
        return be__err(err, errlen, TD_EUNSUPPORTED,
                       "backend \"%s\" cannot compute on a KV pool in this kind of memory "
                       "(host memory for cpu, device memory for cuda)",
                       name);
    be_backend *b = calloc(1, sizeof(*b));
    if (!b) return TD_ENOMEM;
    b->ops = ops;
    b->kv = *kv;
    rc = ops->create(m, o, &b->ctx, err, errlen);
    if (rc != 0) {
        free(b);
        return rc;
    }
    *out = b;
    return 0;
}

void be_close(be_backend *b)
{
    if (!b) return;
    b->ops->destroy(b->ctx);
    free(b);
}

int be_batch_check(const be_batch *b, const mdl_config *mc, const be_options *o, int *seq_maxpos)
{
    if (b->n_tokens < 1 || b->n_tokens > o->max_batch_tokens || b->n_seqs < 1 ||
        b->n_seqs > o->max_seqs || b->n_out < 0 || b->n_out > b->n_tokens || !b->tokens ||
        !b->pos || !b->seq || !b->block_tables || !b->n_blocks || (b->n_out && !b->logits) ||
        (b->n_out && !b->out_rows))
        return TD_EINVAL;
    for (int s = 0; s < b->n_seqs; s++)
        seq_maxpos[s] = -1;
    int bs = (int)o->kv.block_size;
    for (int t = 0; t < b->n_tokens; t++) {
        int s = b->seq[t], p = b->pos[t];
        if (b->tokens[t] < 0 || b->tokens[t] >= mc->vocab_size || s < 0 || s >= b->n_seqs ||
            p < 0 || p >= mc->max_seq_len || p / bs >= b->n_blocks[s])
            return TD_EINVAL;
        if (p > seq_maxpos[s]) seq_maxpos[s] = p;
    }
    for (int s = 0; s < b->n_seqs; s++) {
        if (seq_maxpos[s] < 0) continue;
        if (!b->block_tables[s]) return TD_EINVAL;
        for (int i = 0; i <= seq_maxpos[s] / bs; i++)
            if (b->block_tables[s][i] < 0 || (uint32_t)b->block_tables[s][i] >= o->kv.num_blocks)
                return TD_EINVAL;
    }
    for (int i = 0; i < b->n_out; i++)
        if (b->out_rows[i] < 0 || b->out_rows[i] >= b->n_tokens) return TD_EINVAL;
    return 0;
}

int be_forward(be_backend *b, const be_batch *batch)
{
    if (!b || !batch) return TD_EINVAL;
    return b->ops->forward(b->ctx, batch);
}

int be_copy_blocks(be_backend *b, const int32_t *src, const int32_t *dst, int n)
{
    if (!b || n < 0 || (n > 0 && (!src || !dst))) return TD_EINVAL;
    for (int i = 0; i < n; i++)
        if (src[i] < 0 || dst[i] < 0 || (uint32_t)src[i] >= b->kv.num_blocks ||
            (uint32_t)dst[i] >= b->kv.num_blocks)
            return TD_EINVAL;
    if (n == 0) return 0;
    if (!b->ops->copy_blocks) return TD_EUNSUPPORTED;
    return b->ops->copy_blocks(b->ctx, src, dst, n);
}

void be_kv_region(be_backend *b, void **base, size_t *bytes)
{
    b->ops->kv_region(b->ctx, base, bytes);
}

enum be_mem be_kv_mem(const be_backend *b)
{
    return b->ops->mem;
}

const kv_layout *be_kv_layout(const be_backend *b)
{
    return &b->kv;
}

const char *be_name(const be_backend *b)
{
    return b->ops->name;
}

int be_device_resolve(const char *spec, int prefer_cpu, const char **name, int *device, char *err,
                      size_t errlen)
{
    *name = "cpu";
    *device = 0;
    if (!spec || strcmp(spec, "auto") == 0) {
        const char *env = getenv("TANDEM_DEVICE");
        if (env && env[0] && strcmp(env, "auto") != 0)
            return be_device_resolve(env, prefer_cpu, name, device, err, errlen);
        const be_ops *cu = be_find("cuda");
        if (prefer_cpu) {
            td_log_info("backend", "device_auto", "chosen=cpu reason=\"KV pool in host memory\"");
        } else if (!cu) {
            td_log_info("backend", "device_auto", "chosen=cpu reason=\"built without CUDA\"");
        } else if (cu->probe() != 0) {
            td_log_info("backend", "device_auto", "chosen=cpu reason=\"no CUDA device\"");
        } else {
            *name = "cuda";
            td_log_info("backend", "device_auto", "chosen=cuda:0");
        }
        return 0;
    }
    if (strcmp(spec, "cpu") == 0) return 0;
    if (strncmp(spec, "cuda", 4) != 0 || (spec[4] != '\0' && spec[4] != ':'))
        return be__err(err, errlen, TD_EINVAL,
                       "bad device \"%s\": expected auto, cpu, cuda or cuda:N", spec);
    if (spec[4] == ':') {
        char *end = NULL;
        long v = strtol(spec + 5, &end, 10);
        if (end == spec + 5 || *end != '\0' || v < 0 || v > 1023)
            return be__err(err, errlen, TD_EINVAL,
                           "bad device \"%s\": expected auto, cpu, cuda or cuda:N", spec);
        *device = (int)v;
    }
    const be_ops *cu = be_find("cuda");
    if (!cu)
        return be__err(err, errlen, TD_ENODEV, "device \"%s\": this binary was built without CUDA",
                       spec);
    if (cu->probe() != 0)
        return be__err(err, errlen, TD_ENODEV,
                       "device \"%s\": no CUDA device is usable here (driver or GPU missing)",
                       spec);
    *name = "cuda";
    return 0;
}

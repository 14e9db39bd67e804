/* cu_backend: the CUDA backend (see cu_backend.h). Host side: weights upload,
 * scratch, the forward pass as a sequence of kernels and cuBLAS calls on one
 * stream, copy_blocks. Every CUDA and cuBLAS status is checked, logged with
 * the call that failed, and mapped to a TD_E* code (cu__cuda_fail,
 * cu__blas_fail); nothing here aborts. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" { /* C headers without extern "C" blocks of their own */
#include "common/err.h"
#include "common/log.h"
#include "engine/backend/backend.h"
#include "engine/model.h"
}
#include "engine/backend/cuda/cu_backend.h"
#include "engine/backend/cuda/cu_kernels.cuh"

/* Positions per attention range before a sequence is split further. */
#define CU_ATT_CHUNK 256
/* (token, range) pairs the attention's partial buffers hold at least. */
#define CU_ATT_PAIRS 1024
/* Floats of the staging buffer that converts F32 weights to BF16. */
#define CU_STAGE_FLOATS ((size_t)16 << 20)

/* A weight matrix on the device: [rows][cols] elements of dtype tag dt. */
typedef struct cu_mat {
    void *p;
    int dt;
} cu_mat;

typedef struct cu_layer {
    cu_mat wq, wk, wv, wo, gate, up, down;
    float *attn_norm, *ffn_norm; /* [dim] */
    float *bq, *bk, *bv;         /* [qd], [kvd], [kvd] or NULL */
} cu_layer;

typedef struct cu_ctx {
    const mdl_model *m;
    be_options o;
    kv_layout kv;
    int dev;
    cudaStream_t st;
    cublasHandle_t blas;
    cudaEvent_t *ev; /* [n_layers]: recorded after each layer's K/V write */
    int n_ev;

    void **allocs; /* every cudaMalloc of this backend, freed at destroy */
    int n_allocs, cap_allocs;

    cu_layer *L; /* [n_layers] */
    cu_mat embed, output;
    float *final_norm; /* [dim] */
    float *inv_freq;   /* [head_dim/2] */

    void *kv_base; /* pool region, device memory */
    size_t kv_bytes;

    /* Device scratch, T = max_batch_tokens: */
    float *x;       /* [T][dim] residual stream */
    float *xb;      /* [T][max(dim, qd)] normalised input / attention output */
    float *q;       /* [T][qd] */
    float *k, *v;   /* [T][kvd] */
    float *hb;      /* [T][hidden] */
    float *hb2;     /* [T][hidden] */
    uint16_t *xh;   /* [T][max(dim, qd, hidden)] GEMM input rounded to the weights' dtype */
    float *part;    /* [pairs][nh][hd] attention partial outputs */
    float *part_ml; /* [pairs][nh][2] */
    int pairs;
    float *logits; /* [logit_rows][vocab] */
    int logit_rows;
    int32_t *d_meta; /* token arrays and block tables of one forward */
    int32_t *h_meta; /* pinned staging of d_meta */
    size_t meta_cap; /* int32 entries of both */
    int *seq_maxpos; /* host [max_seqs] */
} cu_ctx;

/* ---- cuBLAS, loaded on first use ----
 * Linking libcublas(Lt) into every binary of the engine costs each process
 * about 0.1 s and 200+ MB of mapped pages at start, GPU or not (tandem-generate
 * runs hundreds of times in the tests). So the few entry points used here are
 * looked up with dlopen once, when a device is probed; the handle stays open
 * for the life of the process. */

#define CU_STR2(x) #x
#define CU_STR(x)  CU_STR2(x) /* the macro's target: cublasCreate -> "cublasCreate_v2" */

/* The 32-bit-index cublasGemmEx (C++ also sees an int64_t overload). */
typedef cublasStatus_t (*cu_gemm_ex_fn)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                        int, int, const void *, const void *, cudaDataType, int,
                                        const void *, cudaDataType, int, const void *, void *,
                                        cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);

static struct cu_blas_api {
    decltype(&cublasCreate) create;
    decltype(&cublasDestroy) destroy;
    decltype(&cublasSetStream) set_stream;
    decltype(&cublasSetMathMode) set_math_mode;
    cu_gemm_ex_fn gemm_ex;
    decltype(&cublasGetStatusString) status_string;
    int ok;
} cu__blas;
static pthread_once_t cu__blas_once = PTHREAD_ONCE_INIT;

template <typename F> static void cu__sym(void *lib, const char *name, F *out)
{
    *out = reinterpret_cast<F>(dlsym(lib, name));
    if (!*out) td_log_error("cuda", "cublas_symbol_missing", "symbol=%s", name);
}

static void cu__blas_load(void)
{
    char name[64];
    snprintf(name, sizeof(name), "libcublas.so.%d", CUBLAS_VER_MAJOR);
    void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
#ifdef TANDEM_CUDA_LIB_DIR
    if (!lib) { /* not on the loader's path: the toolkit we were built with */
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", TANDEM_CUDA_LIB_DIR, name);
        lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    }
#endif
    if (!lib) {
        const char *why = dlerror();
        td_log_error("cuda", "cublas_missing", "lib=%s msg=\"%s\"", name, why ? why : "");
        return;
    }
    cu__sym(lib, CU_STR(cublasCreate), &cu__blas.create);
    cu__sym(lib, CU_STR(cublasDestroy), &cu__blas.destroy);
    cu__sym(lib, CU_STR(cublasSetStream), &cu__blas.set_stream);
    cu__sym(lib, CU_STR(cublasSetMathMode), &cu__blas.set_math_mode);
    cu__sym(lib, CU_STR(cublasGemmEx), &cu__blas.gemm_ex);
    cu__sym(lib, CU_STR(cublasGetStatusString), &cu__blas.status_string);
    cu__blas.ok = cu__blas.create && cu__blas.destroy && cu__blas.set_stream &&
                  cu__blas.set_math_mode && cu__blas.gemm_ex && cu__blas.status_string;
}

/* 1 when cuBLAS is loaded (thread-safe). */
static int cu__blas_ready(void)
{
    if (pthread_once(&cu__blas_once, cu__blas_load) != 0) return 0;
    return cu__blas.ok;
}

/* ---- errors ---- */

static int cu__map_cuda(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return 0;
    case cudaErrorMemoryAllocation:
        return TD_ENOMEM;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
        return TD_ENODEV;
    case cudaErrorInvalidValue:
        return TD_EINVAL;
    default:
        return TD_EINTERNAL;
    }
}

static int cu__cuda_fail(const char *what, cudaError_t e, int line)
{
    td_log_error("cuda", "cuda_error", "call=\"%s\" line=%d err=%s msg=\"%s\"", what, line,
                 cudaGetErrorName(e), cudaGetErrorString(e));
    return cu__map_cuda(e);
}

static int cu__blas_fail(const char *what, cublasStatus_t s, int line)
{
    td_log_error("cuda", "cublas_error", "call=\"%s\" line=%d status=%d msg=\"%s\"", what, line,
                 (int)s, cu__blas.status_string(s));
    if (s == CUBLAS_STATUS_ALLOC_FAILED) return TD_ENOMEM;
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_ARCH_MISMATCH)
        return TD_EUNSUPPORTED;
    if (s == CUBLAS_STATUS_NOT_INITIALIZED) return TD_ENODEV;
    return TD_EINTERNAL;
}

/* Returns from the calling function with a TD_E* code when a call fails. */
#define CU_CK(call)                                                                                \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return cu__cuda_fail(#call, e_, __LINE__);                          \
    } while (0)
#define CU_BLAS(call)                                                                              \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) return cu__blas_fail(#call, s_, __LINE__);                \
    } while (0)
#define CU_RC(call)                                                                                \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        if (rc_ != 0) return rc_;                                                                  \
    } while (0)

static int cu__fail(char *err, size_t errlen, int code, const char *msg)
{
    if (err && errlen) snprintf(err, errlen, "cuda backend: %s", msg);
    return code;
}

/* ---- probe ---- */

static int cu_probe(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky, but leave no error behind */
        return TD_ENODEV;
    }
    if (n <= 0) return TD_ENODEV;
    return cu__blas_ready() ? 0 : TD_ENODEV; /* a GPU without cuBLAS: not usable */
}

/* ---- memory ---- */

static int cu__dalloc(cu_ctx *c, size_t bytes, void **out)
{
    *out = NULL;
    if (c->n_allocs == c->cap_allocs) {
        int cap = c->cap_allocs ? 2 * c->cap_allocs : 64;
        void **a = (void **)realloc(c->allocs, (size_t)cap * sizeof(void *));
        if (!a) return TD_ENOMEM;
        c->allocs = a;
        c->cap_allocs = cap;
    }
    void *p = NULL;
    CU_CK(cudaMalloc(&p, bytes ? bytes : 1));
    c->allocs[c->n_allocs++] = p;
    *out = p;
    return 0;
}

/* n floats of device scratch (zeroed). */
static int cu__fscratch(cu_ctx *c, size_t n, float **out)
{
    void *p = NULL;
    CU_RC(cu__dalloc(c, n * sizeof(float), &p));
    CU_CK(cudaMemsetAsync(p, 0, n * sizeof(float), c->st));
    *out = (float *)p;
    return 0;
}

static int cu__upload_f32(cu_ctx *c, const float *src, size_t n, float **out)
{
    *out = NULL;
    if (!src) return 0;
    void *p = NULL;
    CU_RC(cu__dalloc(c, n * sizeof(float), &p));
    CU_CK(cudaMemcpyAsync(p, src, n * sizeof(float), cudaMemcpyHostToDevice, c->st));
    *out = (float *)p;
    return 0;
}

/* Uploads a [rows][cols] matrix: F32 becomes BF16 on the device (through
 * stage, CU_STAGE_FLOATS floats) unless keep_f32_weights; F16/BF16 as is. */
static int cu__upload_mat(cu_ctx *c, mdl_mat src, size_t rows, size_t cols, float *stage,
                          cu_mat *out)
{
    size_t n = rows * cols;
    if (!src.data) return TD_EINVAL;
    if (src.dtype == MDL_DTYPE_F32 && !c->o.keep_f32_weights) {
        void *p = NULL;
        CU_RC(cu__dalloc(c, n * sizeof(uint16_t), &p));
        const float *h = (const float *)src.data;
        for (size_t off = 0; off < n; off += CU_STAGE_FLOATS) {
            size_t len = n - off < CU_STAGE_FLOATS ? n - off : CU_STAGE_FLOATS;
            /* Same stream: the next chunk's copy waits for this conversion. */
            CU_CK(cudaMemcpyAsync(stage, h + off, len * sizeof(float), cudaMemcpyHostToDevice,
                                  c->st));
            CU_CK(cu_to_half(c->st, (uint16_t *)p + off, stage, len, MDL_DTYPE_BF16));
        }
        out->p = p;
        out->dt = MDL_DTYPE_BF16;
        return 0;
    }
    size_t elt = src.dtype == MDL_DTYPE_F32 ? 4 : 2;
    void *p = NULL;
    CU_RC(cu__dalloc(c, n * elt, &p));
    CU_CK(cudaMemcpyAsync(p, src.data, n * elt, cudaMemcpyHostToDevice, c->st));
    out->p = p;
    out->dt = (int)src.dtype;
    return 0;
}

static void cu_destroy(void *vctx)
{
    cu_ctx *c = (cu_ctx *)vctx;
    if (!c) return;
    (void)cudaSetDevice(c->dev);
    if (c->st) (void)cudaStreamSynchronize(c->st);
    for (int i = 0; i < c->n_ev; i++)
        (void)cudaEventDestroy(c->ev[i]);
    if (c->blas) (void)cu__blas.destroy(c->blas);
    for (int i = 0; i < c->n_allocs; i++)
        (void)cudaFree(c->allocs[i]);
    if (c->h_meta) (void)cudaFreeHost(c->h_meta);
    if (c->st) (void)cudaStreamDestroy(c->st);
    free(c->allocs);
    free(c->ev);
    free(c->L);
    free(c->seq_maxpos);
    free(c);
}

static int cu__upload_model(cu_ctx *c)
{
    const mdl_model *m = c->m;
    const mdl_config *mc = &m->cfg;
    size_t dim = (size_t)mc->dim, hidden = (size_t)mc->hidden_dim, hd = (size_t)mc->head_dim;
    size_t qd = (size_t)mc->n_heads * hd, kvd = (size_t)mc->n_kv_heads * hd;
    size_t V = (size_t)mc->vocab_size;
    void *stage_v = NULL;
    CU_CK(cudaMalloc(&stage_v, CU_STAGE_FLOATS * sizeof(float)));
    float *stage = (float *)stage_v;
    int rc = 0;
    for (int l = 0; l < mc->n_layers && rc == 0; l++) {
        const mdl_layer *S = &m->layers[l];
        cu_layer *D = &c->L[l];
        if ((rc = cu__upload_mat(c, S->mat.wq, qd, dim, stage, &D->wq)) != 0 ||
            (rc = cu__upload_mat(c, S->mat.wk, kvd, dim, stage, &D->wk)) != 0 ||
            (rc = cu__upload_mat(c, S->mat.wv, kvd, dim, stage, &D->wv)) != 0 ||
            (rc = cu__upload_mat(c, S->mat.wo, dim, qd, stage, &D->wo)) != 0 ||
            (rc = cu__upload_mat(c, S->mat.w_gate, hidden, dim, stage, &D->gate)) != 0 ||
            (rc = cu__upload_mat(c, S->mat.w_up, hidden, dim, stage, &D->up)) != 0 ||
            (rc = cu__upload_mat(c, S->mat.w_down, dim, hidden, stage, &D->down)) != 0 ||
            (rc = cu__upload_f32(c, S->attn_norm, dim, &D->attn_norm)) != 0 ||
            (rc = cu__upload_f32(c, S->ffn_norm, dim, &D->ffn_norm)) != 0 ||
            (rc = cu__upload_f32(c, S->bq, qd, &D->bq)) != 0 ||
            (rc = cu__upload_f32(c, S->bk, kvd, &D->bk)) != 0 ||
            (rc = cu__upload_f32(c, S->bv, kvd, &D->bv)) != 0)
            break;
    }
    if (rc == 0) rc = cu__upload_mat(c, m->tok_embed_mat, V, dim, stage, &c->embed);
    if (rc == 0) {
        if (m->output_mat.data == m->tok_embed_mat.data)
            c->output = c->embed; /* tied: one copy */
        else
            rc = cu__upload_mat(c, m->output_mat, V, dim, stage, &c->output);
    }
    if (rc == 0) rc = cu__upload_f32(c, m->final_norm, dim, &c->final_norm);
    if (rc == 0 && !c->final_norm) rc = TD_EINVAL;
    /* The stage is read by queued conversions: wait before freeing it. */
    cudaError_t e = cudaStreamSynchronize(c->st);
    if (rc == 0 && e != cudaSuccess) rc = cu__cuda_fail("cudaStreamSynchronize", e, __LINE__);
    e = cudaFree(stage_v);
    if (rc == 0 && e != cudaSuccess) rc = cu__cuda_fail("cudaFree", e, __LINE__);
    return rc;
}

static int cu__setup(cu_ctx *c, char *err, size_t errlen)
{
    const mdl_config *mc = &c->m->cfg;
    const be_options *o = &c->o;
    CU_CK(cudaSetDevice(c->dev));
    CU_CK(cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking));
    if (!cu__blas_ready()) {
        cu__fail(err, errlen, TD_ENODEV, "cuBLAS could not be loaded (see the log)");
        return TD_ENODEV;
    }
    CU_BLAS(cu__blas.create(&c->blas));
    CU_BLAS(cu__blas.set_stream(c->blas, c->st));
    /* Plain F32 accumulation: no TF32, results comparable with the CPU. */
    CU_BLAS(cu__blas.set_math_mode(c->blas, CUBLAS_DEFAULT_MATH));
    c->ev = (cudaEvent_t *)calloc((size_t)mc->n_layers, sizeof(cudaEvent_t));
    if (!c->ev) return TD_ENOMEM;
    for (; c->n_ev < mc->n_layers; c->n_ev++)
        CU_CK(cudaEventCreateWithFlags(&c->ev[c->n_ev], cudaEventDisableTiming));

    /* KV pool: the caller's device region, or ours. */
    c->kv_bytes = kv_layout_pool_bytes(&c->kv);
    if (o->kv_mem) {
        cudaPointerAttributes a;
        memset(&a, 0, sizeof(a));
        CU_CK(cudaPointerGetAttributes(&a, o->kv_mem));
        if (a.type != cudaMemoryTypeDevice || a.device != c->dev) {
            cu__fail(err, errlen, TD_EINVAL, "kv_mem is not device memory of this device");
            return TD_EINVAL;
        }
        c->kv_base = o->kv_mem;
    } else {
        CU_RC(cu__dalloc(c, c->kv_bytes, &c->kv_base));
        CU_CK(cudaMemsetAsync(c->kv_base, 0, c->kv_bytes, c->st));
    }

    c->L = (cu_layer *)calloc((size_t)mc->n_layers, sizeof(cu_layer));
    if (!c->L) return TD_ENOMEM;
    CU_RC(cu__upload_model(c));

    size_t T = (size_t)o->max_batch_tokens, dim = (size_t)mc->dim, hd = (size_t)mc->head_dim;
    size_t hidden = (size_t)mc->hidden_dim, nh = (size_t)mc->n_heads;
    size_t qd = nh * hd, kvd = (size_t)mc->n_kv_heads * hd;
    size_t xbw = dim > qd ? dim : qd;
    size_t xhw = xbw > hidden ? xbw : hidden;
    c->pairs = (int)(T > CU_ATT_PAIRS ? T : CU_ATT_PAIRS);
    c->logit_rows = o->max_seqs < 1 ? 1 : (o->max_seqs > 1024 ? 1024 : o->max_seqs);
    void *xh = NULL;
    CU_RC(cu__fscratch(c, T * dim, &c->x));
    CU_RC(cu__fscratch(c, T * xbw, &c->xb));
    CU_RC(cu__fscratch(c, T * qd, &c->q));
    CU_RC(cu__fscratch(c, T * kvd, &c->k));
    CU_RC(cu__fscratch(c, T * kvd, &c->v));
    CU_RC(cu__fscratch(c, T * hidden, &c->hb));
    CU_RC(cu__fscratch(c, T * hidden, &c->hb2));
    CU_RC(cu__dalloc(c, T * xhw * sizeof(uint16_t), &xh));
    c->xh = (uint16_t *)xh;
    CU_RC(cu__fscratch(c, (size_t)c->pairs * nh * hd, &c->part));
    CU_RC(cu__fscratch(c, (size_t)c->pairs * nh * 2, &c->part_ml));
    CU_RC(cu__fscratch(c, (size_t)c->logit_rows * (size_t)mc->vocab_size, &c->logits));

    float *inv = (float *)malloc((hd / 2 ? hd / 2 : 1) * sizeof(float));
    if (!inv) return TD_ENOMEM;
    mdl_rope_inv_freq(mc, inv);
    int rc = cu__upload_f32(c, inv, hd / 2 ? hd / 2 : 1, &c->inv_freq);
    if (rc == 0) {
        cudaError_t e = cudaStreamSynchronize(c->st); /* inv is read by the queued copy */
        if (e != cudaSuccess) rc = cu__cuda_fail("cudaStreamSynchronize", e, __LINE__);
    }
    free(inv);
    if (rc != 0) return rc;

    /* Token arrays (4T), table offsets (max_seqs) and the reachable block
     * table entries (max_seqs * blocks of one full context). */
    size_t per_seq = ((size_t)mc->max_seq_len + c->kv.block_size - 1) / c->kv.block_size;
    size_t seqs = (size_t)o->max_seqs;
    if (per_seq > SIZE_MAX / 4 / (seqs + 1)) return TD_EINVAL;
    c->meta_cap = 4 * T + seqs + seqs * per_seq;
    void *dm = NULL;
    CU_RC(cu__dalloc(c, c->meta_cap * sizeof(int32_t), &dm));
    c->d_meta = (int32_t *)dm;
    CU_CK(cudaMallocHost((void **)&c->h_meta, c->meta_cap * sizeof(int32_t)));
    c->seq_maxpos = (int *)calloc(seqs, sizeof(int));
    if (!c->seq_maxpos) return TD_ENOMEM;
    CU_CK(cudaStreamSynchronize(c->st));
    return 0;
}

static int cu_create(const mdl_model *m, const be_options *o, void **out, char *err, size_t errlen)
{
    *out = NULL;
    if (err && errlen) err[0] = '\0';
    const mdl_config *mc = &m->cfg;
    if (o->kv.dtype != KV_DTYPE_F32 && o->kv.dtype != KV_DTYPE_F16 && o->kv.dtype != KV_DTYPE_BF16)
        return cu__fail(err, errlen, TD_EUNSUPPORTED, "KV dtype must be f32, f16 or bf16");
    if (o->max_batch_tokens < 1 || o->max_batch_tokens > 65535 || o->max_seqs < 1 ||
        o->max_seqs > (1 << 20) || o->device < 0)
        return cu__fail(err, errlen, TD_EINVAL,
                        "bad limits (max_batch_tokens 1..65535, max_seqs >= 1, device >= 0)");
    if (mc->head_dim < 2 || mc->head_dim > CU_MAX_HEAD_DIM || (mc->head_dim & 1) ||
        mc->n_kv_heads < 1 || mc->n_heads % mc->n_kv_heads != 0 || mc->n_heads > 65535)
        return cu__fail(err, errlen, TD_EUNSUPPORTED,
                        "head_dim must be even and at most 256, n_heads a multiple of n_kv_heads");
    if (o->kv_mem && o->kv_mem_kind != BE_MEM_DEVICE)
        return cu__fail(err, errlen, TD_EUNSUPPORTED, "kv_mem must be device memory");
    cu_ctx *c = (cu_ctx *)calloc(1, sizeof(*c));
    if (!c) return TD_ENOMEM;
    c->m = m;
    c->o = *o;
    c->kv = o->kv;
    c->dev = o->device;
    int rc = cu__setup(c, err, errlen);
    if (rc != 0) {
        if (err && errlen && !err[0]) {
            char msg[160];
            snprintf(msg, sizeof(msg), "cannot start on cuda:%d (%s; the log names the call)",
                     c->dev, td_strerror(rc));
            cu__fail(err, errlen, rc, msg);
        }
        cu_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

static void cu_kv_region(void *vctx, void **base, size_t *bytes)
{
    cu_ctx *c = (cu_ctx *)vctx;
    *base = c->kv_base;
    *bytes = c->kv_bytes;
}

/* ---- forward ---- */

static cudaDataType_t cu__cuda_type(int dt)
{
    return dt == MDL_DTYPE_F32 ? CUDA_R_32F : dt == MDL_DTYPE_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

/* out[T][N] = x[T][K] W^T + beta * out. *cast holds the dtype x was last
 * rounded to in c->xh (-1: none; the caller resets it when x changes), so
 * q/k/v or gate/up round their shared input once. */
static int cu__mm(cu_ctx *c, float *out, const float *x, const cu_mat *W, int T, int K, int N,
                  float beta, int *cast)
{
    const void *B = x;
    if (W->dt != MDL_DTYPE_F32) {
        if (*cast != W->dt) {
            CU_CK(cu_to_half(c->st, c->xh, x, (size_t)T * (size_t)K, W->dt));
            *cast = W->dt;
        }
        B = c->xh;
    }
    const float alpha = 1.0f;
    cudaDataType_t t = cu__cuda_type(W->dt);
    /* Row-major out[T][N] is column-major [N][T]: out = op(W) x with W seen
     * column-major [K][N] (transposed) and x column-major [K][T]. */
    CU_BLAS(cu__blas.gemm_ex(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &alpha, W->p, t, K, B, t,
                             K, &beta, out, CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT));
    return 0;
}

static int cu__enqueue(cu_ctx *c, const be_batch *b)
{
    const mdl_model *m = c->m;
    const mdl_config *mc = &m->cfg;
    int T = b->n_tokens, dim = mc->dim, hd = mc->head_dim, hidden = mc->hidden_dim;
    int nh = mc->n_heads, nkv = mc->n_kv_heads, qd = nh * hd, kvd = nkv * hd;
    int bs = (int)c->kv.block_size;

    /* Token arrays and the reachable part of each block table, one copy. */
    int32_t *hm = c->h_meta;
    size_t o_pos = (size_t)T, o_seq = 2 * (size_t)T, o_rows = 3 * (size_t)T;
    size_t o_off = o_rows + (size_t)b->n_out, o_tab = o_off + (size_t)b->n_seqs;
    memcpy(hm, b->tokens, (size_t)T * sizeof(int32_t));
    memcpy(hm + o_pos, b->pos, (size_t)T * sizeof(int32_t));
    memcpy(hm + o_seq, b->seq, (size_t)T * sizeof(int32_t));
    if (b->n_out) memcpy(hm + o_rows, b->out_rows, (size_t)b->n_out * sizeof(int32_t));
    size_t n_tab = 0;
    int max_len = 1;
    for (int s = 0; s < b->n_seqs; s++) {
        hm[o_off + (size_t)s] = (int32_t)n_tab;
        if (c->seq_maxpos[s] < 0) continue;
        size_t cnt = (size_t)(c->seq_maxpos[s] / bs) + 1;
        if (o_tab + n_tab + cnt > c->meta_cap) return TD_EINTERNAL; /* sized at create */
        memcpy(hm + o_tab + n_tab, b->block_tables[s], cnt * sizeof(int32_t));
        n_tab += cnt;
        if (c->seq_maxpos[s] + 1 > max_len) max_len = c->seq_maxpos[s] + 1;
    }
    CU_CK(cudaMemcpyAsync(c->d_meta, hm, (o_tab + n_tab) * sizeof(int32_t), cudaMemcpyHostToDevice,
                          c->st));
    cu_tokens tk;
    tk.tok = c->d_meta;
    tk.pos = c->d_meta + o_pos;
    tk.seq = c->d_meta + o_seq;
    tk.tab_off = c->d_meta + o_off;
    tk.tables = c->d_meta + o_tab;
    const int32_t *d_rows = c->d_meta + o_rows;
    cu_kv kv;
    kv.base = c->kv_base;
    kv.dtype = (int)c->kv.dtype;
    kv.num_blocks = c->kv.num_blocks;
    kv.bs = bs;
    kv.nkv = nkv;
    kv.hd = hd;

    /* Attention ranges: CU_ATT_CHUNK positions each, as many as the partial
     * buffers hold for T tokens. */
    int S = (max_len + CU_ATT_CHUNK - 1) / CU_ATT_CHUNK;
    int cap = c->pairs / T;
    if (S > cap) S = cap;
    if (S < 1) S = 1;
    float scale = 1.0f / sqrtf((float)hd);

    CU_CK(cu_embed(c->st, c->x, c->embed.p, c->embed.dt, tk.tok, T, dim));
    for (int l = 0; l < mc->n_layers; l++) {
        const cu_layer *L = &c->L[l];
        int cast = -1;
        CU_CK(cu_rmsnorm(c->st, c->xb, c->x, NULL, L->attn_norm, T, dim, mc->norm_eps));
        CU_RC(cu__mm(c, c->q, c->xb, &L->wq, T, dim, qd, 0.0f, &cast));
        CU_RC(cu__mm(c, c->k, c->xb, &L->wk, T, dim, kvd, 0.0f, &cast));
        CU_RC(cu__mm(c, c->v, c->xb, &L->wv, T, dim, kvd, 0.0f, &cast));
        if (L->bq) CU_CK(cu_add_bias(c->st, c->q, L->bq, T, qd));
        if (L->bk) CU_CK(cu_add_bias(c->st, c->k, L->bk, T, kvd));
        if (L->bv) CU_CK(cu_add_bias(c->st, c->v, L->bv, T, kvd));
        CU_CK(cu_rope(c->st, c->q, c->k, tk.pos, c->inv_freq, T, nh, nkv, hd,
                      mc->rope_layout == MDL_ROPE_HALF));
        CU_CK(cu_kv_store(c->st, &kv, l, c->k, c->v, tk, T));
        if (b->on_layer_done) {
            void *fence = NULL;
            CU_CK(cudaEventRecord(c->ev[l], c->st));
            if (c->o.async_fence)
                fence = (void *)c->ev[l];
            else
                CU_CK(cudaEventSynchronize(c->ev[l])); /* this layer's K/V, not the device */
            CU_RC(b->on_layer_done(b->on_layer_done_arg, l, fence));
        }
        CU_CK(cu_attention(c->st, c->xb, c->part, c->part_ml, c->q, &kv, l, tk, T, nh, S, scale));
        cast = -1;
        CU_RC(cu__mm(c, c->x, c->xb, &L->wo, T, qd, dim, 1.0f, &cast)); /* x += attn Wo^T */
        CU_CK(cu_rmsnorm(c->st, c->xb, c->x, NULL, L->ffn_norm, T, dim, mc->norm_eps));
        cast = -1;
        CU_RC(cu__mm(c, c->hb, c->xb, &L->gate, T, dim, hidden, 0.0f, &cast));
        CU_RC(cu__mm(c, c->hb2, c->xb, &L->up, T, dim, hidden, 0.0f, &cast));
        CU_CK(cu_silu_mul(c->st, c->hb, c->hb2, (size_t)T * (size_t)hidden));
        cast = -1;
        CU_RC(cu__mm(c, c->x, c->hb, &L->down, T, hidden, dim, 1.0f, &cast)); /* x += ffn */
    }
    int V = mc->vocab_size;
    for (int r0 = 0; r0 < b->n_out; r0 += c->logit_rows) {
        int R = b->n_out - r0 < c->logit_rows ? b->n_out - r0 : c->logit_rows;
        int cast = -1;
        CU_CK(cu_rmsnorm(c->st, c->xb, c->x, d_rows + r0, c->final_norm, R, dim, mc->norm_eps));
        CU_RC(cu__mm(c, c->logits, c->xb, &c->output, R, dim, V, 0.0f, &cast));
        CU_CK(cudaMemcpyAsync(b->logits + (size_t)r0 * V, c->logits, (size_t)R * V * sizeof(float),
                              cudaMemcpyDeviceToHost, c->st));
    }
    return 0;
}

static int cu_forward(void *vctx, const be_batch *b)
{
    cu_ctx *c = (cu_ctx *)vctx;
    int rc = be_batch_check(b, &c->m->cfg, &c->o, c->seq_maxpos);
    if (rc != 0) return rc;
    CU_CK(cudaSetDevice(c->dev));
    rc = cu__enqueue(c, b);
    /* Always wait: the pinned token arrays are reused by the next forward,
     * and on success the logits and K/V are final when we return. */
    cudaError_t e = cudaStreamSynchronize(c->st);
    if (rc == 0 && e != cudaSuccess) rc = cu__cuda_fail("cudaStreamSynchronize", e, __LINE__);
    return rc;
}

static int cu__copy(cu_ctx *c, const int32_t *src, const int32_t *dst, int n)
{
    size_t bytes = kv_layout_block_bytes(&c->kv);
    for (int i = 0; i < n; i++) {
        if (src[i] == dst[i]) continue;
        for (uint32_t l = 0; l < c->kv.n_layers; l++) {
            char *base = (char *)c->kv_base;
            size_t so = kv_layout_block_offset(&c->kv, l, (uint32_t)src[i]);
            size_t d = kv_layout_block_offset(&c->kv, l, (uint32_t)dst[i]);
            /* In stream order: a later pair sees the earlier pairs' copies. */
            CU_CK(cudaMemcpyAsync(base + d, base + so, bytes, cudaMemcpyDeviceToDevice, c->st));
        }
    }
    return 0;
}

static int cu_copy_blocks(void *vctx, const int32_t *src, const int32_t *dst, int n)
{
    cu_ctx *c = (cu_ctx *)vctx;
    CU_CK(cudaSetDevice(c->dev));
    int rc = cu__copy(c, src, dst, n);
    cudaError_t e = cudaStreamSynchronize(c->st);
    if (rc == 0 && e != cudaSuccess) rc = cu__cuda_fail("cudaStreamSynchronize", e, __LINE__);
    return rc;
}

/* Positional: be_ops member order (name, probe, create, destroy, forward,
 * kv_region, mem, copy_blocks). */
extern "C" const be_ops be_cuda_ops = {
    "cuda",     cu_probe,     cu_create,     cu_destroy,
    cu_forward, cu_kv_region, BE_MEM_DEVICE, cu_copy_blocks,
};

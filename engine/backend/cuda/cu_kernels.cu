/* cu_kernels: see cu_kernels.cuh. Plain CUDA C, one thread block per row or
 * per (token, head); written for clarity first (a faster attention for long
 * prefills would tile queries and use tensor cores). */
#include "engine/backend/cuda/cu_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

/* ---- element access ---- */

static __device__ __forceinline__ float cu__bf16_to_f32(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16); /* exact */
}

static __device__ __forceinline__ float cu__f16_to_f32(uint16_t h)
{
    return __half2float(__ushort_as_half(h)); /* exact */
}

/* Element i of an array of dtype tag dt, as F32. */
static __device__ __forceinline__ float cu__load(const void *p, size_t i, int dt)
{
    if (dt == 0) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dt == 1 ? cu__f16_to_f32(h) : cu__bf16_to_f32(h);
}

static __device__ __forceinline__ uint16_t cu__to_half_bits(float x, int dt)
{
    if (dt == 1) return __half_as_ushort(__float2half_rn(x));
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

/* Typed views for the attention's inner loop (the dtype is a template
 * parameter there, not a per-element branch). */
struct cu__f32 {
    typedef float T;
    static __device__ __forceinline__ float get(const float *p, size_t i)
    {
        return p[i];
    }
};
struct cu__f16 {
    typedef uint16_t T;
    static __device__ __forceinline__ float get(const uint16_t *p, size_t i)
    {
        return cu__f16_to_f32(p[i]);
    }
};
struct cu__bf16 {
    typedef uint16_t T;
    static __device__ __forceinline__ float get(const uint16_t *p, size_t i)
    {
        return cu__bf16_to_f32(p[i]);
    }
};

/* Grid for a grid-stride loop over n elements, 256 threads a block. */
static unsigned cu__blocks(size_t n)
{
    size_t b = (n + 255) / 256;
    if (b < 1) b = 1;
    if (b > 65535) b = 65535;
    return (unsigned)b;
}

/* ---- reductions ---- */

static __device__ __forceinline__ float cu__warp_sum(float v)
{
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every
 * thread gets the result. Uses 33 floats of shared memory. */
static __device__ float cu__block_sum(float v)
{
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cu__warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < nw ? part[lane] : 0.0f;
        s = cu__warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

/* ---- embedding ---- */

static __global__ void cu__embed_k(float *x, const void *E, int et, const int32_t *tok, int dim)
{
    int t = blockIdx.x;
    size_t row = (size_t)tok[t] * (size_t)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        x[(size_t)t * dim + i] = cu__load(E, row + (size_t)i, et);
}

cudaError_t cu_embed(cudaStream_t st, float *x, const void *E, int et, const int32_t *tok, int T,
                     int dim)
{
    cu__embed_k<<<T, 256, 0, st>>>(x, E, et, tok, dim);
    return cudaGetLastError();
}

/* ---- RMSNorm ---- */

static __global__ void cu__rmsnorm_k(float *out, const float *x, const int32_t *rows,
                                     const float *w, int n, float eps)
{
    int r = blockIdx.x;
    const float *xr = x + (size_t)(rows ? rows[r] : r) * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = cu__block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    float *o = out + (size_t)r * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        o[i] = xr[i] * inv * w[i];
}

cudaError_t cu_rmsnorm(cudaStream_t st, float *out, const float *x, const int32_t *rows,
                       const float *w, int R, int n, float eps)
{
    cu__rmsnorm_k<<<R, 256, 0, st>>>(out, x, rows, w, n, eps);
    return cudaGetLastError();
}

/* ---- RoPE ---- */

static __global__ void cu__rope_k(float *q, float *k, const int32_t *pos, const float *inv_freq,
                                  int nh, int nkv, int hd, int half_layout)
{
    int t = blockIdx.x, half = hd / 2;
    float p = (float)pos[t];
    int total = (nh + nkv) * half;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        int head = idx / half, i = idx % half;
        float *v =
            head < nh ? q + ((size_t)t * nh + head) * hd : k + ((size_t)t * nkv + (head - nh)) * hd;
        float ang = p * inv_freq[i];
        float co = cosf(ang), si = sinf(ang);
        int a = half_layout ? i : 2 * i;
        int b = half_layout ? i + half : 2 * i + 1;
        float x = v[a], y = v[b];
        v[a] = x * co - y * si;
        v[b] = x * si + y * co;
    }
}

cudaError_t cu_rope(cudaStream_t st, float *q, float *k, const int32_t *pos, const float *inv_freq,
                    int T, int nh, int nkv, int hd, int half_layout)
{
    cu__rope_k<<<T, 128, 0, st>>>(q, k, pos, inv_freq, nh, nkv, hd, half_layout);
    return cudaGetLastError();
}

/* ---- KV store ---- */

static __global__ void cu__kv_store_k(cu_kv kv, int layer, const float *k, const float *v,
                                      cu_tokens tk)
{
    int t = blockIdx.x;
    int p = tk.pos[t];
    size_t kvd = (size_t)kv.nkv * kv.hd;
    size_t block_elems = 2 * (size_t)kv.bs * kvd;
    int32_t blk = tk.tables[tk.tab_off[tk.seq[t]] + p / kv.bs];
    size_t k_el =
        ((size_t)layer * kv.num_blocks + (size_t)blk) * block_elems + (size_t)(p % kv.bs) * kvd;
    size_t v_el = k_el + (size_t)kv.bs * kvd;
    const float *kr = k + (size_t)t * kvd, *vr = v + (size_t)t * kvd;
    for (size_t e = threadIdx.x; e < kvd; e += blockDim.x) {
        if (kv.dtype == 0) {
            ((float *)kv.base)[k_el + e] = kr[e];
            ((float *)kv.base)[v_el + e] = vr[e];
        } else {
            ((uint16_t *)kv.base)[k_el + e] = cu__to_half_bits(kr[e], kv.dtype);
            ((uint16_t *)kv.base)[v_el + e] = cu__to_half_bits(vr[e], kv.dtype);
        }
    }
}

cudaError_t cu_kv_store(cudaStream_t st, const cu_kv *kv, int layer, const float *k, const float *v,
                        cu_tokens tk, int T)
{
    cu__kv_store_k<<<T, 256, 0, st>>>(*kv, layer, k, v, tk);
    return cudaGetLastError();
}

/* ---- attention ---- */

#define CU_ATT_WARPS 4
#define CU_ATT_R     (CU_MAX_HEAD_DIM / 32) /* head elements per lane */

/* Pass 1. Block (h, t, s): query head h of token t over range s of its
 * positions. Each warp takes every CU_ATT_WARPS-th position of the range with
 * an online softmax (lane i holds head elements i, i + 32, ...), then the
 * warps merge through shared memory. */
template <typename V>
static __global__ void cu__attn_split_k(float *part, float *part_ml, const float *q, cu_kv kv,
                                        int layer, cu_tokens tk, int nh, int S, float scale)
{
    __shared__ float sm_m[CU_ATT_WARPS], sm_l[CU_ATT_WARPS];
    __shared__ float sm_acc[CU_ATT_WARPS][CU_MAX_HEAD_DIM];
    typedef typename V::T E;
    int h = blockIdx.x, t = blockIdx.y, s = blockIdx.z;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int hd = kv.hd;
    int kh = h / (nh / kv.nkv);
    int p_end = tk.pos[t] + 1; /* positions 0..pos */
    int chunk = (p_end + S - 1) / S;
    int p0 = s * chunk;
    int p1 = p0 + chunk < p_end ? p0 + chunk : p_end;
    const int32_t *table = tk.tables + tk.tab_off[tk.seq[t]];
    size_t kvd = (size_t)kv.nkv * hd;
    size_t block_elems = 2 * (size_t)kv.bs * kvd;
    const E *layer_base = (const E *)kv.base + (size_t)layer * kv.num_blocks * block_elems;

    const float *qv = q + ((size_t)t * nh + h) * hd;
    float qr[CU_ATT_R], acc[CU_ATT_R];
#pragma unroll
    for (int r = 0; r < CU_ATT_R; r++) {
        int i = lane + 32 * r;
        qr[r] = i < hd ? qv[i] * scale : 0.0f;
        acc[r] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int p = p0 + warp; p < p1; p += CU_ATT_WARPS) { /* uniform within the warp */
        const E *blk = layer_base + (size_t)table[p / kv.bs] * block_elems;
        size_t slot = (size_t)(p % kv.bs) * kvd + (size_t)kh * hd;
        const E *kr = blk + slot;
        const E *vr = blk + (size_t)kv.bs * kvd + slot;
        float d = 0.0f;
#pragma unroll
        for (int r = 0; r < CU_ATT_R; r++) {
            int i = lane + 32 * r;
            if (i < hd) d += qr[r] * V::get(kr, (size_t)i);
        }
        d = cu__warp_sum(d);
        float mn = fmaxf(m, d);
        float corr = expf(m - mn); /* m = -inf at first: 0, and l, acc are 0 */
        float w = expf(d - mn);
        l = l * corr + w;
#pragma unroll
        for (int r = 0; r < CU_ATT_R; r++) {
            int i = lane + 32 * r;
            if (i < hd) acc[r] = acc[r] * corr + w * V::get(vr, (size_t)i);
        }
        m = mn;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int r = 0; r < CU_ATT_R; r++) {
        int i = lane + 32 * r;
        if (i < hd) sm_acc[warp][i] = acc[r];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < CU_ATT_WARPS; w++)
        M = fmaxf(M, sm_m[w]);
    size_t pi = ((size_t)t * nh + h) * S + s;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < CU_ATT_WARPS; w++)
            if (sm_m[w] != -INFINITY) o += expf(sm_m[w] - M) * sm_acc[w][i];
        part[pi * hd + i] = o;
    }
    if (threadIdx.x == 0) {
        float L = 0.0f;
        for (int w = 0; w < CU_ATT_WARPS; w++)
            if (sm_m[w] != -INFINITY) L += expf(sm_m[w] - M) * sm_l[w];
        part_ml[pi * 2] = M; /* -inf for an empty range */
        part_ml[pi * 2 + 1] = L;
    }
}

/* Pass 2. Block (h, t): merges the S ranges. Range 0 always holds position
 * 0, so the total is positive. */
static __global__ void cu__attn_merge_k(float *out, const float *part, const float *part_ml, int nh,
                                        int hd, int S)
{
    int h = blockIdx.x, t = blockIdx.y;
    size_t base = ((size_t)t * nh + h) * S;
    float M = -INFINITY;
    for (int s = 0; s < S; s++)
        M = fmaxf(M, part_ml[(base + s) * 2]);
    float L = 0.0f;
    for (int s = 0; s < S; s++) {
        float ms = part_ml[(base + s) * 2];
        if (ms != -INFINITY) L += expf(ms - M) * part_ml[(base + s) * 2 + 1];
    }
    float inv = 1.0f / L;
    float *o = out + ((size_t)t * nh + h) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < S; s++) {
            float ms = part_ml[(base + s) * 2];
            if (ms != -INFINITY) acc += expf(ms - M) * part[(base + s) * hd + i];
        }
        o[i] = acc * inv;
    }
}

cudaError_t cu_attention(cudaStream_t st, float *out, float *part, float *part_ml, const float *q,
                         const cu_kv *kv, int layer, cu_tokens tk, int T, int nh, int S,
                         float scale)
{
    if (kv->hd > CU_MAX_HEAD_DIM || kv->hd < 1 || S < 1 || T < 1 || T > 65535 || S > 65535)
        return cudaErrorInvalidValue;
    dim3 g1((unsigned)nh, (unsigned)T, (unsigned)S);
    if (kv->dtype == 0)
        cu__attn_split_k<cu__f32>
            <<<g1, 32 * CU_ATT_WARPS, 0, st>>>(part, part_ml, q, *kv, layer, tk, nh, S, scale);
    else if (kv->dtype == 1)
        cu__attn_split_k<cu__f16>
            <<<g1, 32 * CU_ATT_WARPS, 0, st>>>(part, part_ml, q, *kv, layer, tk, nh, S, scale);
    else
        cu__attn_split_k<cu__bf16>
            <<<g1, 32 * CU_ATT_WARPS, 0, st>>>(part, part_ml, q, *kv, layer, tk, nh, S, scale);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    dim3 g2((unsigned)nh, (unsigned)T);
    cu__attn_merge_k<<<g2, 128, 0, st>>>(out, part, part_ml, nh, kv->hd, S);
    return cudaGetLastError();
}

/* ---- element-wise ---- */

static __global__ void cu__to_half_k(uint16_t *dst, const float *src, size_t n, int dt)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = cu__to_half_bits(src[i], dt);
}

cudaError_t cu_to_half(cudaStream_t st, uint16_t *dst, const float *src, size_t n, int dt)
{
    if (n == 0) return cudaSuccess;
    cu__to_half_k<<<cu__blocks(n), 256, 0, st>>>(dst, src, n, dt);
    return cudaGetLastError();
}

static __global__ void cu__add_bias_k(float *out, const float *bias, size_t n, int N)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] += bias[i % (size_t)N];
}

cudaError_t cu_add_bias(cudaStream_t st, float *out, const float *bias, int T, int N)
{
    size_t n = (size_t)T * (size_t)N;
    if (n == 0) return cudaSuccess;
    cu__add_bias_k<<<cu__blocks(n), 256, 0, st>>>(out, bias, n, N);
    return cudaGetLastError();
}

static __global__ void cu__silu_mul_k(float *g, const float *u, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float x = g[i];
        g[i] = x * (1.0f / (1.0f + expf(-x))) * u[i];
    }
}

cudaError_t cu_silu_mul(cudaStream_t st, float *g, const float *u, size_t n)
{
    if (n == 0) return cudaSuccess;
    cu__silu_mul_k<<<cu__blocks(n), 256, 0, st>>>(g, u, n);
    return cudaGetLastError();
}

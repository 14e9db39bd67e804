/* cu_kernels: the CUDA backend's kernels (prefix cu_), each behind a host
 * launcher that enqueues it on `st` and returns cudaGetLastError() (launch
 * errors only; faults surface at the next synchronisation).
 *
 * Element types are passed as an int tag with the values shared by
 * enum mdl_dtype and enum kv_dtype: 0 F32, 1 F16 (IEEE binary16), 2 BF16.
 * Activations are always F32 [rows][cols] row-major. Conversions to F16/BF16
 * round to nearest even, as the CPU backend does.
 *
 * Paged KV addressing (common/kv_layout.h), with elements of the pool's dtype:
 *   block (layer, b) starts at ((layer * num_blocks) + b) * 2 * bs * kvd,
 *   K of slot j at + j * kvd, V of slot j at + bs * kvd + j * kvd,
 * kvd = n_kv_heads * head_dim. A token's block id is
 * tables[tab_off[seq[t]] + pos[t] / bs]: the batch's block tables flattened
 * (only the entries the batch reaches), tab_off[s] where sequence s starts. */
#ifndef TANDEM_ENGINE_BACKEND_CUDA_CU_KERNELS_CUH
#define TANDEM_ENGINE_BACKEND_CUDA_CU_KERNELS_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

/* Largest head_dim the attention kernels take (registers per lane). */
#define CU_MAX_HEAD_DIM 256

/* The token geometry of one forward, as device pointers. */
typedef struct cu_tokens {
    const int32_t *tok;     /* [T] token ids */
    const int32_t *pos;     /* [T] positions */
    const int32_t *seq;     /* [T] sequence index */
    const int32_t *tab_off; /* [n_seqs] offset of each sequence's entries in tables */
    const int32_t *tables;  /* flattened block ids */
} cu_tokens;

/* The paged pool and one layer's shape. */
typedef struct cu_kv {
    void *base;          /* pool region, device memory */
    int dtype;           /* element type tag */
    uint32_t num_blocks; /* blocks per layer */
    int bs;              /* block_size */
    int nkv;             /* n_kv_heads */
    int hd;              /* head_dim */
} cu_kv;

/* x[t][i] = E[tok[t]][i] widened to F32; E: [vocab][dim] of dtype et. */
cudaError_t cu_embed(cudaStream_t st, float *x, const void *E, int et, const int32_t *tok, int T,
                     int dim);

/* out[r][i] = x[src][i] / sqrt(mean(x[src]^2) + eps) * w[i], src = rows ? rows[r] : r,
 * r < R; x and out: row length n. */
cudaError_t cu_rmsnorm(cudaStream_t st, float *out, const float *x, const int32_t *rows,
                       const float *w, int R, int n, float eps);

/* Rotates q [T][nh][hd] and k [T][nkv][hd] in place by pos[t] * inv_freq[i]
 * (inv_freq: [hd/2], device). half_layout 0: pairs (2i, 2i+1) (llama2.c);
 * 1: pairs (i, i + hd/2) (Hugging Face). */
cudaError_t cu_rope(cudaStream_t st, float *q, float *k, const int32_t *pos, const float *inv_freq,
                    int T, int nh, int nkv, int hd, int half_layout);

/* Stores k, v [T][kvd] (F32) into the pool's slots of layer `layer`. */
cudaError_t cu_kv_store(cudaStream_t st, const cu_kv *kv, int layer, const float *k, const float *v,
                        cu_tokens tk, int T);

/* Attention of every (token, query head) over positions 0..pos[t] of its
 * sequence, split into S ranges (flash-decoding): pass 1 writes each range's
 * max score, sum of exponentials and unnormalised output into part
 * [T][nh][S][hd] and part_ml [T][nh][S][2]; pass 2 merges the ranges into out
 * [T][nh][hd]. q: [T][nh][hd], already rotated. GQA: query head h reads kv
 * head h / (nh / nkv). */
cudaError_t cu_attention(cudaStream_t st, float *out, float *part, float *part_ml, const float *q,
                         const cu_kv *kv, int layer, cu_tokens tk, int T, int nh, int S,
                         float scale);

/* dst[i] = src[i] rounded to dtype dt (1 F16, 2 BF16), i < n. */
cudaError_t cu_to_half(cudaStream_t st, uint16_t *dst, const float *src, size_t n, int dt);

/* out[t][j] += bias[j], t < T, j < N. */
cudaError_t cu_add_bias(cudaStream_t st, float *out, const float *bias, int T, int N);

/* g[i] = silu(g[i]) * u[i], i < n (SwiGLU). */
cudaError_t cu_silu_mul(cudaStream_t st, float *g, const float *u, size_t n);

#endif

/* model: a Llama-family decoder's configuration and weights, loaded from a
 * Hugging Face directory (config.json + safetensors), a llama2.c .bin file, or
 * a GGUF file with F32/F16/BF16 tensors.
 *
 * Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v
 * biases); TinyLlama is a Llama. GQA, tied or untied output, F32/F16/BF16.
 *
 * Weights are memory-mapped. F32 tensors are used in place (no copy). F16 and
 * BF16 tensors are, with mdl_load, converted once at load to F32 in heap
 * memory (2x the file's bytes). With mdl_load_ex(MDL_LOAD_KEEP_DTYPE) the
 * weight matrices stay in their dtype, in place in the mapping, and the CPU
 * backend widens them in registers inside the matmul: half the weight RAM and
 * half the bytes read per token, with the same results (widening is exact).
 *
 * Every matrix is row-major [out][in] (the Hugging Face / llama2.c convention),
 * so y = W x is y[o] = sum_i W[o][i] x[i].
 *
 * A loaded model is immutable and may be shared by threads and backends.
 */
#ifndef TANDEM_ENGINE_MODEL_H
#define TANDEM_ENGINE_MODEL_H

#include <stddef.h>
#include <stdint.h>

/* How RoPE pairs the dimensions of one head. */
enum mdl_rope_layout {
    MDL_ROPE_ADJACENT = 0, /* llama2.c: rotate (2i, 2i+1), frequency index i */
    MDL_ROPE_HALF = 1,     /* Hugging Face: rotate (i, i + head_dim/2), frequency index i */
};

enum mdl_rope_scaling {
    MDL_ROPE_SCALING_NONE = 0,
    MDL_ROPE_SCALING_LINEAR = 1, /* frequencies / factor */
    MDL_ROPE_SCALING_LLAMA3 = 2, /* Llama 3.1: long wavelengths / factor, blended band */
};

#define MDL_MAX_EOS 8

enum mdl_format {
    MDL_FORMAT_HF = 0,
    MDL_FORMAT_LLAMA2C = 1,
    MDL_FORMAT_GGUF = 2,
};

typedef struct mdl_config {
    char arch[64]; /* "LlamaForCausalLM", ..., or "llama2.c" */
    enum mdl_format format;
    int dim;        /* hidden_size */
    int hidden_dim; /* intermediate_size (FFN) */
    int n_layers;
    int n_heads;    /* query heads */
    int n_kv_heads; /* key/value heads (GQA when < n_heads) */
    int head_dim;   /* per head; n_heads * head_dim need not equal dim */
    int vocab_size;
    int max_seq_len;  /* max_position_embeddings, or llama2.c seq_len */
    float rope_theta; /* RoPE base (10000 by default) */
    float norm_eps;   /* RMSNorm epsilon */
    enum mdl_rope_layout rope_layout;
    /* rope_scaling from config.json: NONE, LINEAR (factor) or LLAMA3 (factor,
     * low/high_freq_factor, original_max_position_embeddings). */
    enum mdl_rope_scaling rope_scaling;
    float rope_factor;
    float rope_low_freq_factor;
    float rope_high_freq_factor;
    int rope_orig_max_pos;
    int qkv_bias;    /* 1 when q/k/v projections carry biases (Qwen2) */
    int tied_output; /* 1 when the classifier is the token embedding */
    int32_t bos_id;  /* -1 when unknown */
    int32_t eos_id;  /* -1 when unknown */
    /* Further end-of-sequence ids when config.json lists several (Llama 3:
     * <|end_of_text|>, <|eom_id|>, <|eot_id|>); eos_id is the first. */
    int32_t eos_extra[MDL_MAX_EOS];
    int n_eos_extra;
} mdl_config;

/* Element type of a weight matrix as held in memory. */
enum mdl_dtype {
    MDL_DTYPE_F32 = 0,
    MDL_DTYPE_F16 = 1,  /* IEEE binary16 */
    MDL_DTYPE_BF16 = 2, /* bfloat16: the top half of an F32 */
};

/* A weight matrix as held in memory: row-major [rows][cols] elements of dtype
 * (2 or 4 bytes each, host byte order), owned by the model. Every matrix has
 * one, whatever the load mode; for F32 it is the same data as the float
 * pointer beside it. */
typedef struct mdl_mat {
    const void *data;
    enum mdl_dtype dtype;
} mdl_mat;

/* The matrices of one layer in their stored dtype (shapes as in mdl_layer). */
typedef struct mdl_layer_mats {
    mdl_mat wq, wk, wv, wo, w_gate, w_up, w_down;
} mdl_layer_mats;

/* One decoder layer. All pointers are F32 and owned by the model. A matrix
 * kept in F16/BF16 (MDL_LOAD_KEEP_DTYPE) has a NULL float pointer here: read
 * it through mat. Norms and biases are always F32. */
typedef struct mdl_layer {
    const float *attn_norm; /* [dim] */
    const float *wq;        /* [n_heads*head_dim][dim] */
    const float *wk;        /* [n_kv_heads*head_dim][dim] */
    const float *wv;        /* [n_kv_heads*head_dim][dim] */
    const float *bq;        /* [n_heads*head_dim] or NULL */
    const float *bk;        /* [n_kv_heads*head_dim] or NULL */
    const float *bv;        /* [n_kv_heads*head_dim] or NULL */
    const float *wo;        /* [dim][n_heads*head_dim] */
    const float *ffn_norm;  /* [dim] */
    const float *w_gate;    /* [hidden_dim][dim] (llama2.c w1) */
    const float *w_up;      /* [hidden_dim][dim] (llama2.c w3) */
    const float *w_down;    /* [dim][hidden_dim] (llama2.c w2) */
    mdl_layer_mats mat;     /* every matrix above, in its stored dtype */
} mdl_layer;

typedef struct mdl_model {
    mdl_config cfg;
    const float *tok_embed;       /* [vocab_size][dim]; NULL when kept in F16/BF16 */
    mdl_layer *layers;            /* [n_layers] */
    const float *final_norm;      /* [dim] */
    const float *output;          /* [vocab_size][dim]; == tok_embed when tied */
    mdl_mat tok_embed_mat;        /* tok_embed in its stored dtype */
    mdl_mat output_mat;           /* output in its stored dtype (== tok_embed_mat when tied) */
    size_t weight_bytes;          /* bytes of weights one token's forward reads, as stored */
    struct mdl__storage *storage; /* mappings and converted buffers (internal) */
} mdl_model;

/* path: a Hugging Face model directory (config.json plus model.safetensors or
 * model.safetensors.index.json), a GGUF file (by its magic; "llama" and
 * "qwen2" architectures, unquantized), or a llama2.c checkpoint file. On success *out
 * is owned by the caller (mdl_free). Errors: TD_ENOENT/TD_EIO (files),
 * TD_EFORMAT (malformed, truncated, missing tensor, wrong shape),
 * TD_EUNSUPPORTED (architecture, dtype, feature), TD_ENOMEM; a reason naming the
 * problem goes to err[errlen] when err is not NULL. */
int mdl_load(const char *path, mdl_model **out, char *err, size_t errlen);

/* Flags of mdl_load_ex. */
enum {
    /* F16/BF16 weight matrices (the embedding and classifier included) stay
     * in their dtype, in place in the file mapping: their float pointers in
     * mdl_model/mdl_layer are NULL and only the mdl_mat views hold them.
     * Norms, biases and F32 tensors are as with mdl_load. On a big-endian
     * host the flag is ignored (matrices are widened). */
    MDL_LOAD_KEEP_DTYPE = 1u << 0,
};

/* mdl_load with flags (MDL_LOAD_*); mdl_load(p, ...) is mdl_load_ex(p, 0, ...). */
int mdl_load_ex(const char *path, unsigned flags, mdl_model **out, char *err, size_t errlen);
void mdl_free(mdl_model *m); /* accepts NULL */

/* Builds a model with random weights (uniform in [-scale, scale], from seed)
 * for tests and benchmarks; cfg's shape fields must be set (head_dim 0 means
 * dim / n_heads). Owned by the caller (mdl_free). */
int mdl_create_random(const mdl_config *cfg, uint64_t seed, float scale, mdl_model **out);

/* RoPE inverse frequencies for pair i < head_dim/2 (the angle at position p is
 * p * inv_freq[i]), with the config's rope_theta and rope_scaling applied, in
 * float32 as Hugging Face and llama2.c compute them. out: [head_dim/2]. */
void mdl_rope_inv_freq(const mdl_config *cfg, float *out);

/* A 64-bit fingerprint of the model for handshakes between workers (prefill
 * and decode must run the same model for KV blocks to be interchangeable):
 * XXH3 over the config fields that shape the K/V and the logits (dims, heads,
 * vocab, RoPE layout/theta/scaling, eps, biases, tying) and over samples of
 * the weights (up to 64 KiB from the start and end of the embedding, the
 * first and last layers' Q/K/V projections, the final norm and the
 * classifier). Reading the samples touches a few hundred KiB, not the whole
 * model. The same weights in llama2.c and HF layout differ (their K rows are
 * permuted, so their KV blocks are not interchangeable). */
uint64_t mdl_fingerprint(const mdl_model *m);

/* Fills cfg with a config's defaults (theta 10000, eps 1e-5, ids -1). */
void mdl_config_defaults(mdl_config *cfg);

#endif

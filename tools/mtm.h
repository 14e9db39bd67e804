/* mtm: internals of make-test-model, a tool that writes random but
 * deterministic Llama-family checkpoints in real on-disk formats (Hugging Face
 * directories with safetensors, llama2.c .bin + tokenizer.bin) for tests.
 *
 * Weights are defined once, in llama2.c's layout (Q/K rows in adjacent-pair
 * RoPE order), as a pure function of (seed, tensor name, element index), so
 * both formats written from the same seed describe the same function; the HF
 * writer permutes Q/K rows (and biases) to the half-split RoPE layout.
 *
 * Functions return 0 or a negative TD_E* code (common/err.h) and print a
 * human-readable reason to stderr on failure.
 */
#ifndef TANDEM_TOOLS_MTM_H
#define TANDEM_TOOLS_MTM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* The formats are little-endian on disk; the writers store native words. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "make-test-model writes native words and needs a little-endian host"
#endif

enum mtm_arch {
    MTM_ARCH_LLAMA = 0,
    MTM_ARCH_MISTRAL,
    MTM_ARCH_QWEN2,
};

enum mtm_dtype {
    MTM_F32 = 0,
    MTM_F16,
    MTM_BF16,
};

/* One row of the shape table. */
typedef struct mtm_shape {
    const char *name;
    enum mtm_arch arch;
    int dim;    /* hidden size */
    int hidden; /* MLP intermediate size */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int vocab;    /* vocabulary size, special + byte + merged tokens */
    int seq_len;  /* max_position_embeddings / llama2.c seq_len */
    int head_dim; /* per-head size; dim / n_heads unless the shape says otherwise */
    double rope_theta;
    double rms_eps;
    int tied;     /* classifier shares the token embedding */
    int qkv_bias; /* q/k/v projections have biases (Qwen2) */
    const char *about;
} mtm_shape;

/* The shape table, terminated by a row with name == NULL. */
extern const mtm_shape mtm_shapes[];
const mtm_shape *mtm_shape_find(const char *name); /* NULL when unknown */

/* ---- weights (mtm_weights.c) ---- */

/* Canonical tensor kinds, in llama2.c order. Per-layer kinds take a layer
 * index; the others take -1. */
enum mtm_tensor {
    MTM_T_EMBED = 0,  /* [vocab][dim] */
    MTM_T_ATTN_NORM,  /* [dim] */
    MTM_T_WQ,         /* [n_heads*hd][dim], rows in adjacent-pair RoPE order */
    MTM_T_WK,         /* [n_kv*hd][dim], rows in adjacent-pair RoPE order */
    MTM_T_WV,         /* [n_kv*hd][dim] */
    MTM_T_WO,         /* [dim][n_heads*hd] */
    MTM_T_FFN_NORM,   /* [dim] */
    MTM_T_W1,         /* gate: [hidden][dim] */
    MTM_T_W2,         /* down: [dim][hidden] */
    MTM_T_W3,         /* up: [hidden][dim] */
    MTM_T_FINAL_NORM, /* [dim] */
    MTM_T_LM_HEAD,    /* [vocab][dim], only when untied */
    MTM_T_BQ,         /* [n_heads*hd], adjacent-pair order, only with qkv_bias */
    MTM_T_BK,         /* [n_kv*hd] */
    MTM_T_BV,         /* [n_kv*hd] */
    MTM_T_COUNT
};

/* Rows and columns of a tensor kind (cols == 1 for vectors). */
void mtm_tensor_dims(const mtm_shape *s, enum mtm_tensor t, size_t *rows, size_t *cols);

/* Fills out[rows*cols] with the canonical values of tensor t of layer
 * (or -1) for seed. Pure function: same arguments, same bits, any machine
 * (integer PRNG, no libm, float64 sums rounded once to float32). */
void mtm_tensor_fill(const mtm_shape *s, uint64_t seed, enum mtm_tensor t, int layer, float *out);

/* Reorders rows of a [n_heads*hd][cols] matrix (cols == 1 for a bias) from
 * adjacent-pair to half-split RoPE order: within each head, destination row
 * i < hd/2 takes source row 2i and row i + hd/2 takes row 2i+1. */
void mtm_permute_rope_rows(const float *src, float *dst, int n_heads, int hd, size_t cols);

/* Float32 to IEEE half / bfloat16, round to nearest even. */
uint16_t mtm_f32_to_f16(float f);
uint16_t mtm_f32_to_bf16(float f);

/* ---- vocabulary (mtm_vocab.c) ---- */

/* A deterministic byte-level BPE vocabulary: id 0 <unk>, 1 <s>, 2 </s>,
 * 3 + b the byte b, then merged tokens in merge order (rank r = id - 259). */
typedef struct mtm_vocab {
    int n;           /* == shape vocab */
    char **piece;    /* [n] raw bytes of each token (NUL-terminated; specials' text) */
    int *len;        /* [n] byte length of piece */
    int (*merge)[2]; /* [n - 259] the two ids merged into token 259 + r */
} mtm_vocab;

#define MTM_VOCAB_FIRST_MERGE 259

/* Builds the vocabulary for n tokens (n >= 259). *out owned by the caller
 * (mtm_vocab_free). TD_EINVAL when n is too small. */
int mtm_vocab_build(int n, uint64_t seed, mtm_vocab *out);
void mtm_vocab_free(mtm_vocab *v); /* accepts a zeroed struct */

/* Writes tokenizer.json / tokenizer_config.json / llama2.c tokenizer.bin. */
int mtm_write_tokenizer_json(const mtm_vocab *v, const char *path);
int mtm_write_tokenizer_config(const mtm_shape *s, const char *path);
int mtm_write_tokenizer_bin(const mtm_vocab *v, const char *path);

/* ---- formats (mtm_formats.c) ---- */

/* Writes an HF directory dir (created if missing) holding config.json,
 * generation_config.json, model.safetensors (or n_shards shards + index),
 * tokenizer.json and tokenizer_config.json. */
int mtm_write_hf(const mtm_shape *s, uint64_t seed, enum mtm_dtype dt, int n_shards,
                 const char *dir);

/* Writes a llama2.c checkpoint at path (f32) and tokenizer.bin beside it.
 * TD_EUNSUPPORTED for shapes the format cannot express. */
int mtm_write_llama2c(const mtm_shape *s, uint64_t seed, const char *path);

/* Writes all n bytes or returns TD_EIO (reason printed with path). */
int mtm_fwrite(FILE *f, const void *p, size_t n, const char *path);

#endif

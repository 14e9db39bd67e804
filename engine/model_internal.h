/* Internals shared by model.c and the loaders (loader_hf.c, loader_llama2c.c). */
#ifndef TANDEM_ENGINE_MODEL_INTERNAL_H
#define TANDEM_ENGINE_MODEL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"
#include "engine/safetensors.h"

struct mdl__storage {
    sft_file **files; /* open safetensors shards */
    size_t n_files;
    void *map; /* llama2.c file mapping, or NULL */
    size_t map_bytes;
    void **bufs; /* heap buffers (converted or aligned weights) */
    size_t n_bufs, cap_bufs;
    int keep_dtype; /* MDL_LOAD_KEEP_DTYPE: matrices stay F16/BF16 */
};

/* Allocates a zeroed, 64-byte aligned model-owned buffer of n floats (NULL on OOM). */
float *mdl__alloc_f32(mdl_model *m, size_t n);

/* Checks shape fields for sanity and that every weight byte size fits in size_t. */
int mdl__check_config(const mdl_config *c, char *err, size_t errlen);

/* Sets weight_bytes from the config. */
void mdl__account(mdl_model *m);

/* Weight data as F32: in place when src is aligned F32 (dtype SFT_F32),
 * else copied or converted from F16/BF16 into a model buffer. n: elements. */
int mdl__to_f32(mdl_model *m, const void *src, enum sft_dtype dtype, size_t n, const float **out);

/* A weight matrix of n elements: with keep_dtype and an F16/BF16 source,
 * *mat views it in place (copied to an aligned model buffer when src is
 * misaligned) and *out is NULL; otherwise *out is as from mdl__to_f32 and
 * *mat views *out as F32. */
int mdl__to_mat(mdl_model *m, const void *src, enum sft_dtype dtype, size_t n, const float **out,
                mdl_mat *mat);

/* Sets every mdl_mat left empty by a loader to its F32 pointer. */
void mdl__fill_mats(mdl_model *m);

int mdl__load_gguf(const char *path, mdl_model *m, char *err, size_t errlen);
/* dir: the model directory (config.json); weights: one .safetensors file to
 * read instead of the directory's model.safetensors or index, or NULL. */
int mdl__load_hf(const char *dir, const char *weights, mdl_model *m, char *err, size_t errlen);
int mdl__load_llama2c(const char *path, mdl_model *m, char *err, size_t errlen);

/* IEEE half / bfloat16 to float. */
float mdl__f16_to_f32(uint16_t h);
float mdl__bf16_to_f32(uint16_t h);

#endif

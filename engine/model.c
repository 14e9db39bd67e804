#include "engine/model.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <xxhash.h>

#include "common/err.h"
#include "engine/model_internal.h"

float *mdl__alloc_f32(mdl_model *m, size_t n)
{
    struct mdl__storage *s = m->storage;
    if (n > SIZE_MAX / sizeof(float) - 64) return NULL;
    if (s->n_bufs == s->cap_bufs) {
        size_t cap = s->cap_bufs ? 2 * s->cap_bufs : 16;
        void **nb = realloc(s->bufs, cap * sizeof(*nb));
        if (!nb) return NULL;
        s->bufs = nb;
        s->cap_bufs = cap;
    }
    size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63; /* aligned_alloc wants a multiple */
    if (bytes == 0) bytes = 64;
    void *p = aligned_alloc(64, bytes);
    if (!p) return NULL;
    memset(p, 0, bytes);
    s->bufs[s->n_bufs++] = p;
    return p;
}

int mdl__to_f32(mdl_model *m, const void *src, enum sft_dtype dtype, size_t n, const float **out)
{
    if (dtype == SFT_F32 && ((uintptr_t)src % sizeof(float)) == 0) {
        *out = src;
        return 0;
    }
    if (dtype != SFT_F32 && dtype != SFT_F16 && dtype != SFT_BF16) return TD_EUNSUPPORTED;
    float *dst = mdl__alloc_f32(m, n);
    if (!dst) return TD_ENOMEM;
    const unsigned char *b = src;
    if (dtype == SFT_F32) {
        memcpy(dst, b, n * sizeof(float));
    } else {
        for (size_t i = 0; i < n; i++) {
            uint16_t h = (uint16_t)(b[2 * i] | (b[2 * i + 1] << 8));
            dst[i] = dtype == SFT_F16 ? mdl__f16_to_f32(h) : mdl__bf16_to_f32(h);
        }
    }
    *out = dst;
    return 0;
}

int mdl__to_mat(mdl_model *m, const void *src, enum sft_dtype dtype, size_t n, const float **out,
                mdl_mat *mat)
{
    int little = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
    if (m->storage->keep_dtype && little && (dtype == SFT_F16 || dtype == SFT_BF16)) {
        const void *data = src;
        if ((uintptr_t)src % sizeof(uint16_t) != 0) {
            float *dst = mdl__alloc_f32(m, (n + 1) / 2);
            if (!dst) return TD_ENOMEM;
            memcpy(dst, src, n * sizeof(uint16_t));
            data = dst;
        }
        *out = NULL;
        mat->data = data;
        mat->dtype = dtype == SFT_F16 ? MDL_DTYPE_F16 : MDL_DTYPE_BF16;
        return 0;
    }
    int rc = mdl__to_f32(m, src, dtype, n, out);
    if (rc != 0) return rc;
    mat->data = *out;
    mat->dtype = MDL_DTYPE_F32;
    return 0;
}

static void mdl__fill_mat(mdl_mat *mat, const float *f32)
{
    if (!mat->data) {
        mat->data = f32;
        mat->dtype = MDL_DTYPE_F32;
    }
}

void mdl__fill_mats(mdl_model *m)
{
    for (int l = 0; l < m->cfg.n_layers; l++) {
        mdl_layer *L = &m->layers[l];
        mdl__fill_mat(&L->mat.wq, L->wq);
        mdl__fill_mat(&L->mat.wk, L->wk);
        mdl__fill_mat(&L->mat.wv, L->wv);
        mdl__fill_mat(&L->mat.wo, L->wo);
        mdl__fill_mat(&L->mat.w_gate, L->w_gate);
        mdl__fill_mat(&L->mat.w_up, L->w_up);
        mdl__fill_mat(&L->mat.w_down, L->w_down);
    }
    mdl__fill_mat(&m->tok_embed_mat, m->tok_embed);
    if (m->cfg.tied_output && !m->output_mat.data) m->output_mat = m->tok_embed_mat;
    mdl__fill_mat(&m->output_mat, m->output);
}

float mdl__f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400));
            man &= 0x3ff;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

float mdl__bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Hashes elements [i0, i1) of w as F32 (widened in chunks, so a model kept
 * in F16/BF16 hashes as the same model widened at load). */
static void mdl__fp_range(XXH3_state_t *st, const mdl_mat *w, size_t i0, size_t i1)
{
    if (w->dtype == MDL_DTYPE_F32) {
        XXH3_64bits_update(st, (const float *)w->data + i0, (i1 - i0) * sizeof(float));
        return;
    }
    float buf[1024];
    const uint16_t *h = w->data;
    while (i0 < i1) {
        size_t k = i1 - i0 < 1024 ? i1 - i0 : 1024;
        for (size_t i = 0; i < k; i++)
            buf[i] = w->dtype == MDL_DTYPE_F16 ? mdl__f16_to_f32(h[i0 + i])
                                               : mdl__bf16_to_f32(h[i0 + i]);
        XXH3_64bits_update(st, buf, k * sizeof(float));
        i0 += k;
    }
}

/* Hashes up to `cap` bytes (as F32) from each end of a weight array of n
 * elements. */
static void mdl__fp_sample_mat(XXH3_state_t *st, const mdl_mat *w, size_t n)
{
    const size_t cap = 64 * 1024 / sizeof(float); /* elements */
    if (!w->data) {
        XXH3_64bits_update(st, "none", 4);
    } else if (n <= 2 * cap) {
        mdl__fp_range(st, w, 0, n);
    } else {
        mdl__fp_range(st, w, 0, cap);
        mdl__fp_range(st, w, n - cap, n);
    }
}

static void mdl__fp_sample(XXH3_state_t *st, const float *w, size_t n)
{
    mdl_mat v = {.data = w, .dtype = MDL_DTYPE_F32};
    mdl__fp_sample_mat(st, &v, n);
}

uint64_t mdl_fingerprint(const mdl_model *m)
{
    const mdl_config *c = &m->cfg;
    XXH3_state_t *st = XXH3_createState();
    if (!st) return 0;
    XXH3_64bits_reset(st);
    /* Fields one by one (not the struct: padding and the arch name would
     * make equal models differ). */
    int32_t ints[14] = {c->dim,
                        c->hidden_dim,
                        c->n_layers,
                        c->n_heads,
                        c->n_kv_heads,
                        c->head_dim,
                        c->vocab_size,
                        (int32_t)c->rope_layout,
                        c->qkv_bias,
                        c->tied_output,
                        (int32_t)c->rope_scaling,
                        c->rope_orig_max_pos,
                        0,
                        0};
    float fl[5] = {c->rope_theta, c->norm_eps, c->rope_factor, c->rope_low_freq_factor,
                   c->rope_high_freq_factor};
    XXH3_64bits_update(st, ints, sizeof(ints));
    XXH3_64bits_update(st, fl, sizeof(fl));
    size_t d = (size_t)c->dim, qd = (size_t)c->n_heads * c->head_dim;
    size_t kvd = (size_t)c->n_kv_heads * c->head_dim;
    mdl__fp_sample_mat(st, &m->tok_embed_mat, (size_t)c->vocab_size * d);
    int ls[2] = {0, c->n_layers - 1};
    for (int i = 0; i < 2; i++) {
        const mdl_layer *L = &m->layers[ls[i]];
        mdl__fp_sample_mat(st, &L->mat.wq, qd * d);
        mdl__fp_sample_mat(st, &L->mat.wk, kvd * d);
        mdl__fp_sample_mat(st, &L->mat.wv, kvd * d);
    }
    mdl__fp_sample(st, m->final_norm, d);
    mdl__fp_sample_mat(st, &m->output_mat, (size_t)c->vocab_size * d);
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    return h;
}

void mdl_config_defaults(mdl_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->rope_theta = 10000.0f;
    cfg->norm_eps = 1e-5f;
    cfg->bos_id = -1;
    cfg->eos_id = -1;
    cfg->rope_layout = MDL_ROPE_HALF;
}

void mdl_rope_inv_freq(const mdl_config *c, float *out)
{
    int hd = c->head_dim;
    for (int i = 0; i < hd / 2; i++) {
        float f = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)hd);
        if (c->rope_scaling == MDL_ROPE_SCALING_LINEAR) {
            f /= c->rope_factor;
        } else if (c->rope_scaling == MDL_ROPE_SCALING_LLAMA3) {
            /* Long wavelengths are stretched by factor, short ones kept, the band
             * between blended (Llama 3.1's scheme). */
            float old = (float)c->rope_orig_max_pos;
            float low_wl = old / c->rope_low_freq_factor, high_wl = old / c->rope_high_freq_factor;
            float wl = 2.0f * 3.14159265358979f / f;
            if (wl > low_wl) {
                f /= c->rope_factor;
            } else if (wl >= high_wl) {
                float sm = (old / wl - c->rope_low_freq_factor) /
                           (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (1.0f - sm) * f / c->rope_factor + sm * f;
            }
        }
        out[i] = f;
    }
}

int mdl__check_config(const mdl_config *c, char *err, size_t errlen)
{
    /* Bounds keep every size product far below 2^63 (each factor < 2^20). */
    const int lim = 1 << 20;
    if (c->dim <= 0 || c->dim > lim || c->hidden_dim <= 0 || c->hidden_dim > lim ||
        c->n_layers <= 0 || c->n_layers > 4096 || c->n_heads <= 0 || c->n_heads > 4096 ||
        c->n_kv_heads <= 0 || c->n_kv_heads > c->n_heads || c->vocab_size <= 0 ||
        c->vocab_size > (1 << 22) || c->head_dim <= 0 || c->head_dim > 4096 ||
        c->max_seq_len <= 0 || c->max_seq_len > (1 << 24))
        return td_err_fail(err, errlen, TD_EFORMAT,
                           "model config out of range: dim=%d hidden=%d layers=%d heads=%d "
                           "kv_heads=%d head_dim=%d vocab=%d max_seq_len=%d",
                           c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                           c->head_dim, c->vocab_size, c->max_seq_len);
    if (c->n_heads % c->n_kv_heads != 0)
        return td_err_fail(err, errlen, TD_EFORMAT,
                           "model config: %d attention heads not a multiple of %d kv heads",
                           c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0)
        return td_err_fail(err, errlen, TD_EFORMAT, "model config: head_dim %d is odd (RoPE)",
                           c->head_dim);
    if (!(c->norm_eps > 0.0f) || !(c->rope_theta > 0.0f))
        return td_err_fail(err, errlen, TD_EFORMAT, "model config: bad rms_norm_eps or rope_theta");
    /* Special ids must name rows of the embedding, or a forward pass fed
     * with them fails far from the cause. -1 is "unknown". */
    if (c->bos_id < -1 || c->bos_id >= c->vocab_size)
        return td_err_fail(err, errlen, TD_EFORMAT,
                           "model config: bos_token_id %d outside the vocabulary of %d", c->bos_id,
                           c->vocab_size);
    if (c->eos_id < -1 || c->eos_id >= c->vocab_size)
        return td_err_fail(err, errlen, TD_EFORMAT,
                           "model config: eos_token_id %d outside the vocabulary of %d", c->eos_id,
                           c->vocab_size);
    for (int i = 0; i < c->n_eos_extra; i++)
        if (c->eos_extra[i] < 0 || c->eos_extra[i] >= c->vocab_size)
            return td_err_fail(err, errlen, TD_EFORMAT,
                               "model config: eos_token_id %d outside the vocabulary of %d",
                               c->eos_extra[i], c->vocab_size);
    return 0;
}

void mdl__account(mdl_model *m)
{
    const mdl_config *c = &m->cfg;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    /* element size of each matrix as stored */
#define MDL__ES(mt) ((mt).dtype == MDL_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t))
    size_t bytes = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const mdl_layer_mats *L = &m->layers[l].mat;
        bytes += 2 * (size_t)c->dim * sizeof(float); /* norms */
        if (c->qkv_bias) bytes += (qd + 2 * kvd) * sizeof(float);
        bytes += qd * c->dim * MDL__ES(L->wq) + kvd * c->dim * (MDL__ES(L->wk) + MDL__ES(L->wv)) +
                 (size_t)c->dim * qd * MDL__ES(L->wo) +
                 (size_t)c->hidden_dim * c->dim *
                     (MDL__ES(L->w_gate) + MDL__ES(L->w_up) + MDL__ES(L->w_down));
    }
    bytes += (size_t)c->dim * sizeof(float)                             /* final norm */
             + (size_t)c->dim * MDL__ES(m->tok_embed_mat)               /* embed row */
             + (size_t)c->vocab_size * c->dim * MDL__ES(m->output_mat); /* classifier */
#undef MDL__ES
    m->weight_bytes = bytes;
}

/* What a model file is, by its content (never by its name). */
enum mdl__kind {
    MDL__KIND_GGUF,
    MDL__KIND_SAFETENSORS,
    MDL__KIND_LLAMA2C,
    MDL__KIND_OTHER, /* none of them: the reason is in err */
};

/* Reads the first bytes of path and decides what it holds: "GGUF" magic; a
 * safetensors header (u64 little-endian length, then a JSON object that fits
 * in the file); else a llama2.c legacy header (7 int32 with plausible
 * dimensions; that format has no magic). Anything else, such as a JSON or
 * text file or a tokenizer, is MDL__KIND_OTHER with a reason. */
static enum mdl__kind mdl__sniff(const char *path, uint64_t file_bytes, char *err, size_t errlen)
{
    unsigned char b[32] = {0};
    size_t n = 0;
    FILE *f = fopen(path, "rb");
    if (f) {
        n = fread(b, 1, sizeof(b), f);
        fclose(f);
    }
    if (n >= 4 && memcmp(b, "GGUF", 4) == 0) return MDL__KIND_GGUF;
    if (n >= 9) {
        uint64_t hl = 0;
        for (int i = 7; i >= 0; i--)
            hl = (hl << 8) | b[i];
        if (b[8] == '{' && hl >= 2 && hl <= file_bytes - 8) return MDL__KIND_SAFETENSORS;
    }
    size_t k = 0; /* leading bytes that read as text */
    while (k < n && (b[k] == '\t' || b[k] == '\n' || b[k] == '\r' || (b[k] >= 0x20 && b[k] < 0x7f)))
        k++;
    if (n >= 28 && k < n) {
        int32_t h[7];
        memcpy(h, b, sizeof(h));
        /* the ranges of mdl__check_config, loosely: a header of small
         * positive ints (vocab negative when the classifier is untied) */
        int plausible = h[0] > 0 && h[0] <= (1 << 20) && h[1] > 0 && h[1] <= (1 << 20) &&
                        h[2] > 0 && h[2] <= 4096 && h[3] > 0 && h[3] <= 4096 && h[4] > 0 &&
                        h[4] <= 4096 && h[5] != 0 && h[5] >= -(1 << 22) && h[5] <= (1 << 22) &&
                        h[6] > 0 && h[6] <= (1 << 24);
        if (plausible || (uint32_t)h[0] == 0x616b3432 /* versioned llama2.c: refused later */)
            return MDL__KIND_LLAMA2C;
    }
    const char *what = "an unknown format";
    if (n == 0)
        what = "empty";
    else if (b[0] == '{')
        what = "a JSON file";
    else if (k == n)
        what = "a text file";
    td_err_set(err, errlen,
               "%s is not a model checkpoint (%s): expected a Hugging Face directory, a "
               ".safetensors, GGUF or llama2.c file",
               path, what);
    return MDL__KIND_OTHER;
}

/* The directory of a file path, into dir[cap]. */
static void mdl__dirname(const char *path, char *dir, size_t cap)
{
    snprintf(dir, cap, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        snprintf(dir, cap, ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
}

int mdl_load(const char *path, mdl_model **out, char *err, size_t errlen)
{
    return mdl_load_ex(path, 0, out, err, errlen);
}

int mdl_load_ex(const char *path, unsigned flags, mdl_model **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!path) return td_err_fail(err, errlen, TD_EINVAL, "model path is NULL");
    mdl_model *m = calloc(1, sizeof(*m));
    if (!m) return td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
    m->storage = calloc(1, sizeof(*m->storage));
    if (!m->storage) {
        free(m);
        return td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
    }
    m->storage->keep_dtype = (flags & MDL_LOAD_KEEP_DTYPE) != 0;
    mdl_config_defaults(&m->cfg);
    struct stat st;
    int rc;
    char dir[4096];
    if (stat(path, &st) != 0)
        rc = td_err_fail(err, errlen, TD_ENOENT, "model path %s does not exist", path);
    else if (S_ISDIR(st.st_mode))
        rc = mdl__load_hf(path, NULL, m, err, errlen);
    else if (!S_ISREG(st.st_mode))
        rc = td_err_fail(err, errlen, TD_EINVAL, "model path %s is not a regular file", path);
    else {
        switch (mdl__sniff(path, (uint64_t)st.st_size, err, errlen)) {
        case MDL__KIND_GGUF:
            rc = mdl__load_gguf(path, m, err, errlen);
            break;
        case MDL__KIND_SAFETENSORS: /* its config.json is beside it */
            mdl__dirname(path, dir, sizeof(dir));
            rc = mdl__load_hf(dir, path, m, err, errlen);
            break;
        case MDL__KIND_LLAMA2C:
            rc = mdl__load_llama2c(path, m, err, errlen);
            break;
        default:
            rc = TD_EFORMAT;
            break;
        }
    }
    if (rc != 0) {
        mdl_free(m);
        return rc;
    }
    mdl__fill_mats(m);
    mdl__account(m);
    *out = m;
    return 0;
}

void mdl_free(mdl_model *m)
{
    if (!m) return;
    struct mdl__storage *s = m->storage;
    if (s) {
        for (size_t i = 0; i < s->n_files; i++)
            sft_close(s->files[i]);
        free(s->files);
        if (s->map) munmap(s->map, s->map_bytes);
        for (size_t i = 0; i < s->n_bufs; i++)
            free(s->bufs[i]);
        free(s->bufs);
        free(s);
    }
    free(m->layers);
    free(m);
}

/* splitmix64: a small, well-mixed generator for reproducible random weights. */
static uint64_t mdl__next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float *mdl__rand(mdl_model *m, size_t n, uint64_t *rng, float scale, float offset)
{
    float *p = mdl__alloc_f32(m, n);
    if (!p) return NULL;
    for (size_t i = 0; i < n; i++) {
        float u = (float)(mdl__next(rng) >> 40) / (float)(1 << 24); /* [0,1) */
        p[i] = offset + scale * (2.0f * u - 1.0f);
    }
    return p;
}

int mdl_create_random(const mdl_config *cfg, uint64_t seed, float scale, mdl_model **out)
{
    *out = NULL;
    mdl_model *m = calloc(1, sizeof(*m));
    if (!m) return TD_ENOMEM;
    m->storage = calloc(1, sizeof(*m->storage));
    if (!m->storage) {
        free(m);
        return TD_ENOMEM;
    }
    m->cfg = *cfg;
    mdl_config *c = &m->cfg;
    if (c->head_dim == 0 && c->n_heads > 0) c->head_dim = c->dim / c->n_heads;
    if (c->n_kv_heads == 0) c->n_kv_heads = c->n_heads;
    if (c->max_seq_len == 0) c->max_seq_len = 2048;
    if (c->rope_theta == 0.0f) c->rope_theta = 10000.0f;
    if (c->norm_eps == 0.0f) c->norm_eps = 1e-5f;
    if (!c->arch[0]) snprintf(c->arch, sizeof(c->arch), "random");
    int rc = mdl__check_config(c, NULL, 0);
    if (rc != 0) goto fail;
    rc = TD_ENOMEM;
    m->layers = calloc((size_t)c->n_layers, sizeof(*m->layers));
    if (!m->layers) goto fail;
    uint64_t rng = seed;
    size_t d = (size_t)c->dim, h = (size_t)c->hidden_dim;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    if (!(m->tok_embed = mdl__rand(m, (size_t)c->vocab_size * d, &rng, scale, 0))) goto fail;
    for (int l = 0; l < c->n_layers; l++) {
        mdl_layer *L = &m->layers[l];
        /* Norm weights around 1 keep activations in a sane range. */
        if (!(L->attn_norm = mdl__rand(m, d, &rng, 0.1f, 1.0f))) goto fail;
        if (!(L->wq = mdl__rand(m, qd * d, &rng, scale, 0))) goto fail;
        if (!(L->wk = mdl__rand(m, kvd * d, &rng, scale, 0))) goto fail;
        if (!(L->wv = mdl__rand(m, kvd * d, &rng, scale, 0))) goto fail;
        if (c->qkv_bias) {
            if (!(L->bq = mdl__rand(m, qd, &rng, scale, 0))) goto fail;
            if (!(L->bk = mdl__rand(m, kvd, &rng, scale, 0))) goto fail;
            if (!(L->bv = mdl__rand(m, kvd, &rng, scale, 0))) goto fail;
        }
        if (!(L->wo = mdl__rand(m, d * qd, &rng, scale, 0))) goto fail;
        if (!(L->ffn_norm = mdl__rand(m, d, &rng, 0.1f, 1.0f))) goto fail;
        if (!(L->w_gate = mdl__rand(m, h * d, &rng, scale, 0))) goto fail;
        if (!(L->w_up = mdl__rand(m, h * d, &rng, scale, 0))) goto fail;
        if (!(L->w_down = mdl__rand(m, d * h, &rng, scale, 0))) goto fail;
    }
    if (!(m->final_norm = mdl__rand(m, d, &rng, 0.1f, 1.0f))) goto fail;
    if (c->tied_output)
        m->output = m->tok_embed;
    else if (!(m->output = mdl__rand(m, (size_t)c->vocab_size * d, &rng, scale, 0)))
        goto fail;
    mdl__fill_mats(m);
    mdl__account(m);
    *out = m;
    return 0;
fail:
    mdl_free(m);
    return rc;
}

/* GGUF (versions 2 and 3) as written by llama.cpp, for F32 / F16 / BF16
 * tensors of the "llama" (Llama, Mistral, TinyLlama) and "qwen2"
 * architectures. Layout:
 *   "GGUF", u32 version, u64 n_tensors, u64 n_kv,
 *   n_kv x (string key, u32 type, value)   string = u64 length + bytes
 *   n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
 *   padding to general.alignment (default 32), then the data section.
 * ne[0] is the innermost dimension: a [out][in] matrix has ne = {in, out}.
 * llama.cpp's converter stores Llama Q/K rows in the adjacent-pair RoPE order
 * (its "normal" RoPE); qwen2 keeps Hugging Face's half-split order. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "engine/model_internal.h"

#define GGUF_MAX_COUNT (1u << 24) /* tensors or metadata entries */
#define GGUF_MAX_DIMS  4

enum gguf_type {
    GGUF_U8 = 0,
    GGUF_I8 = 1,
    GGUF_U16 = 2,
    GGUF_I16 = 3,
    GGUF_U32 = 4,
    GGUF_I32 = 5,
    GGUF_F32 = 6,
    GGUF_BOOL = 7,
    GGUF_STRING = 8,
    GGUF_ARRAY = 9,
    GGUF_U64 = 10,
    GGUF_I64 = 11,
    GGUF_F64 = 12,
};

/* A bounds-checked cursor over the mapping; any overrun sets bad. */
typedef struct gguf_rd {
    const unsigned char *p;
    size_t len, off;
    int bad;
} gguf_rd;

static int gg__take(gguf_rd *r, size_t n, const unsigned char **out)
{
    if (r->bad || n > r->len - r->off) {
        r->bad = 1;
        return -1;
    }
    *out = r->p + r->off;
    r->off += n;
    return 0;
}

static uint64_t gg__u(gguf_rd *r, size_t n)
{
    const unsigned char *b;
    if (gg__take(r, n, &b) != 0) return 0;
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;)
        v = (v << 8) | b[i];
    return v;
}

/* String: pointer into the mapping (not NUL-terminated) and length. */
static const char *gg__str(gguf_rd *r, size_t *len)
{
    uint64_t n = gg__u(r, 8);
    const unsigned char *b;
    if (n > SIZE_MAX || gg__take(r, (size_t)n, &b) != 0) return NULL;
    *len = (size_t)n;
    return (const char *)b;
}

static size_t gg__scalar_size(uint32_t t)
{
    switch (t) {
    case GGUF_U8:
    case GGUF_I8:
    case GGUF_BOOL:
        return 1;
    case GGUF_U16:
    case GGUF_I16:
        return 2;
    case GGUF_U32:
    case GGUF_I32:
    case GGUF_F32:
        return 4;
    case GGUF_U64:
    case GGUF_I64:
    case GGUF_F64:
        return 8;
    default:
        return 0;
    }
}

/* Skips one value of type t (arrays nest at most `depth` more levels). */
static void gg__skip(gguf_rd *r, uint32_t t, int depth)
{
    if (t == GGUF_STRING) {
        size_t n;
        (void)gg__str(r, &n);
    } else if (t == GGUF_ARRAY) {
        uint32_t et = (uint32_t)gg__u(r, 4);
        uint64_t n = gg__u(r, 8);
        size_t es = gg__scalar_size(et);
        const unsigned char *b;
        if (es) {
            if (n > (r->len - r->off) / es)
                r->bad = 1;
            else
                (void)gg__take(r, (size_t)(n * es), &b);
        } else if ((et == GGUF_STRING || et == GGUF_ARRAY) && depth > 0) {
            for (uint64_t i = 0; i < n && !r->bad; i++)
                gg__skip(r, et, depth - 1);
        } else {
            r->bad = 1;
        }
    } else {
        size_t es = gg__scalar_size(t);
        const unsigned char *b;
        if (!es)
            r->bad = 1;
        else
            (void)gg__take(r, es, &b);
    }
}

/* A scalar metadata value read as double (integers are exact below 2^53). */
static int gg__num(gguf_rd *r, uint32_t t, double *out)
{
    uint64_t u;
    switch (t) {
    case GGUF_U8:
    case GGUF_U16:
    case GGUF_U32:
    case GGUF_U64:
    case GGUF_BOOL:
        *out = (double)gg__u(r, gg__scalar_size(t));
        return r->bad ? -1 : 0;
    case GGUF_I8:
        *out = (double)(int8_t)gg__u(r, 1);
        return r->bad ? -1 : 0;
    case GGUF_I16:
        *out = (double)(int16_t)gg__u(r, 2);
        return r->bad ? -1 : 0;
    case GGUF_I32:
        *out = (double)(int32_t)gg__u(r, 4);
        return r->bad ? -1 : 0;
    case GGUF_I64:
        *out = (double)(int64_t)gg__u(r, 8);
        return r->bad ? -1 : 0;
    case GGUF_F32: {
        u = gg__u(r, 4);
        uint32_t b = (uint32_t)u;
        float f;
        memcpy(&f, &b, 4);
        *out = f;
        return r->bad ? -1 : 0;
    }
    case GGUF_F64: {
        u = gg__u(r, 8);
        double d;
        memcpy(&d, &u, 8);
        *out = d;
        return r->bad ? -1 : 0;
    }
    default:
        gg__skip(r, t, 2);
        return -1;
    }
}

typedef struct gguf_tensor {
    const char *name;
    size_t name_len;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    uint32_t type;
    uint64_t offset;
} gguf_tensor;

typedef struct gguf_meta {
    char arch[32];
    double dim, hidden, layers, heads, kv_heads, ctx, eps, theta, key_len, alignment, bos, eos,
        vocab;
} gguf_meta;

static int gg__key_is(const char *k, size_t kl, const char *arch, const char *suffix)
{
    size_t al = strlen(arch), sl = strlen(suffix);
    return kl == al + 1 + sl && memcmp(k, arch, al) == 0 && k[al] == '.' &&
           memcmp(k + al + 1, suffix, sl) == 0;
}

static int gg__key_eq(const char *k, size_t kl, const char *s)
{
    return kl == strlen(s) && memcmp(k, s, kl) == 0;
}

/* Two passes over the metadata: the architecture first (keys are prefixed
 * with it), then the numbers. */
static int gg__read_meta(gguf_rd *r, uint64_t n_kv, gguf_meta *g, const char *path, char *err,
                         size_t errlen)
{
    size_t start = r->off;
    for (int pass = 0; pass < 2; pass++) {
        r->off = start;
        for (uint64_t i = 0; i < n_kv && !r->bad; i++) {
            size_t kl;
            const char *k = gg__str(r, &kl);
            uint32_t t = (uint32_t)gg__u(r, 4);
            if (!k || r->bad) break;
            if (pass == 0) {
                if (gg__key_eq(k, kl, "general.architecture") && t == GGUF_STRING) {
                    size_t vl;
                    const char *v = gg__str(r, &vl);
                    if (v && vl < sizeof(g->arch)) {
                        memcpy(g->arch, v, vl);
                        g->arch[vl] = '\0';
                    }
                } else {
                    gg__skip(r, t, 2);
                }
                continue;
            }
            double *dst = NULL;
            if (gg__key_is(k, kl, g->arch, "embedding_length"))
                dst = &g->dim;
            else if (gg__key_is(k, kl, g->arch, "feed_forward_length"))
                dst = &g->hidden;
            else if (gg__key_is(k, kl, g->arch, "block_count"))
                dst = &g->layers;
            else if (gg__key_is(k, kl, g->arch, "attention.head_count"))
                dst = &g->heads;
            else if (gg__key_is(k, kl, g->arch, "attention.head_count_kv"))
                dst = &g->kv_heads;
            else if (gg__key_is(k, kl, g->arch, "context_length"))
                dst = &g->ctx;
            else if (gg__key_is(k, kl, g->arch, "attention.layer_norm_rms_epsilon"))
                dst = &g->eps;
            else if (gg__key_is(k, kl, g->arch, "rope.freq_base"))
                dst = &g->theta;
            else if (gg__key_is(k, kl, g->arch, "attention.key_length"))
                dst = &g->key_len;
            else if (gg__key_is(k, kl, g->arch, "vocab_size"))
                dst = &g->vocab;
            else if (gg__key_eq(k, kl, "general.alignment"))
                dst = &g->alignment;
            else if (gg__key_eq(k, kl, "tokenizer.ggml.bos_token_id"))
                dst = &g->bos;
            else if (gg__key_eq(k, kl, "tokenizer.ggml.eos_token_id"))
                dst = &g->eos;
            if (!dst) {
                gg__skip(r, t, 2);
            } else if (gg__num(r, t, dst) != 0 && !r->bad) {
                return td_err_fail(err, errlen, TD_EFORMAT, "%s: metadata %.*s is not a number",
                                   path, (int)kl, k);
            }
        }
        if (r->bad) break;
        if (pass == 0 && !g->arch[0])
            return td_err_fail(err, errlen, TD_EFORMAT, "%s: no general.architecture", path);
    }
    if (r->bad) return td_err_fail(err, errlen, TD_EFORMAT, "%s: metadata runs past the end", path);
    return 0;
}

static int gg__int(double v, int *out)
{
    if (!(v >= 0 && v <= (double)(1 << 30)) || v != (double)(int)v) return -1;
    *out = (int)v;
    return 0;
}

/* Finds `name` and returns it as F32 of shape [rows][cols] (cols 0: 1-D);
 * mat (matrices; NULL for vectors): the tensor in its stored dtype, see
 * mdl__to_mat. *out stays NULL when it is absent and not required. */
static int gg__get(mdl_model *m, const gguf_tensor *ts, uint64_t n, size_t data_start,
                   size_t fbytes, const char *name, int64_t rows, int64_t cols, int required,
                   const float **out, mdl_mat *mat, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    size_t nl = strlen(name);
    const gguf_tensor *t = NULL;
    for (uint64_t i = 0; i < n; i++)
        if (ts[i].name_len == nl && memcmp(ts[i].name, name, nl) == 0) {
            t = &ts[i];
            break;
        }
    if (!t) {
        if (!required) return 0;
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: missing tensor \"%s\"", path, name);
    }
    int ok = cols ? (t->n_dims == 2 && t->ne[0] == (uint64_t)cols && t->ne[1] == (uint64_t)rows)
                  : (t->n_dims == 1 && t->ne[0] == (uint64_t)rows);
    if (!ok)
        return td_err_fail(
            err, errlen, TD_EFORMAT,
            "%s: tensor \"%s\" has %u dims ne=[%llu, %llu], expected ne=[%lld, %lld]", path, name,
            t->n_dims, (unsigned long long)t->ne[0],
            (unsigned long long)(t->n_dims > 1 ? t->ne[1] : 1), (long long)(cols ? cols : rows),
            (long long)(cols ? rows : 1));
    enum sft_dtype dt;
    size_t es;
    switch (t->type) {
    case 0:
        dt = SFT_F32;
        es = 4;
        break;
    case 1:
        dt = SFT_F16;
        es = 2;
        break;
    case 30:
        dt = SFT_BF16;
        es = 2;
        break;
    default:
        return td_err_fail(err, errlen, TD_EUNSUPPORTED,
                           "%s: tensor \"%s\" has ggml type %u (only F32, F16, BF16 are supported)",
                           path, name, t->type);
    }
    /* rows and cols are bounded by mdl__check_config, so this cannot overflow. */
    size_t count = (size_t)rows * (size_t)(cols ? cols : 1), bytes = count * es;
    size_t room = fbytes - data_start;
    if (t->offset > room || bytes > room - (size_t)t->offset)
        return td_err_fail(err, errlen, TD_EFORMAT,
                           "%s: tensor \"%s\" data (offset %llu, %zu bytes) lies outside the file",
                           path, name, (unsigned long long)t->offset, bytes);
    const unsigned char *src = (const unsigned char *)m->storage->map + data_start + t->offset;
    if ((mat ? mdl__to_mat(m, src, dt, count, out, mat) : mdl__to_f32(m, src, dt, count, out)) != 0)
        return td_err_fail(err, errlen, TD_ENOMEM, "out of memory converting \"%s\"", name);
    return 0;
}

int mdl__load_gguf(const char *path, mdl_model *m, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return td_err_fail(err, errlen, td_err_from_errno(e), "cannot open %s: %s", path,
                           strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < 24) {
        close(fd);
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: truncated GGUF header", path);
    }
    size_t fbytes = (size_t)st.st_size;
    void *map = mmap(NULL, fbytes, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return td_err_fail(err, errlen, TD_EIO, "mmap %s: %s", path, strerror(errno));
    m->storage->map = map;
    m->storage->map_bytes = fbytes;

    gguf_rd r = {.p = map, .len = fbytes};
    (void)gg__u(&r, 4); /* magic, checked by the caller */
    uint32_t version = (uint32_t)gg__u(&r, 4);
    uint64_t n_tensors = gg__u(&r, 8), n_kv = gg__u(&r, 8);
    if (version < 2 || version > 3)
        return td_err_fail(err, errlen, TD_EUNSUPPORTED,
                           "%s: GGUF version %u (2 and 3 are supported)", path, version);
    if (n_tensors > GGUF_MAX_COUNT || n_kv > GGUF_MAX_COUNT)
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: %llu tensors / %llu metadata entries",
                           path, (unsigned long long)n_tensors, (unsigned long long)n_kv);
    gguf_meta g = {.theta = 10000.0, .eps = 1e-5, .alignment = 32, .bos = -1, .eos = -1};
    int rc = gg__read_meta(&r, n_kv, &g, path, err, errlen);
    if (rc != 0) return rc;

    mdl_config *c = &m->cfg;
    int is_llama = strcmp(g.arch, "llama") == 0, is_qwen2 = strcmp(g.arch, "qwen2") == 0;
    if (!is_llama && !is_qwen2)
        return td_err_fail(err, errlen, TD_EUNSUPPORTED,
                           "%s: unsupported GGUF architecture \"%s\" (llama and qwen2 are)", path,
                           g.arch);
    snprintf(c->arch, sizeof(c->arch), "gguf:%s", g.arch);
    c->format = MDL_FORMAT_GGUF;
    c->rope_layout = is_llama ? MDL_ROPE_ADJACENT : MDL_ROPE_HALF;
    c->qkv_bias = is_qwen2;
    if (g.kv_heads == 0) g.kv_heads = g.heads;
    if (gg__int(g.dim, &c->dim) || gg__int(g.hidden, &c->hidden_dim) ||
        gg__int(g.layers, &c->n_layers) || gg__int(g.heads, &c->n_heads) ||
        gg__int(g.kv_heads, &c->n_kv_heads) || gg__int(g.ctx, &c->max_seq_len) || c->n_heads == 0)
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: missing or bad %s.* dimensions", path,
                           g.arch);
    c->head_dim = c->dim / c->n_heads;
    if (g.key_len != 0 && gg__int(g.key_len, &c->head_dim))
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: bad attention.key_length", path);
    c->norm_eps = (float)g.eps;
    c->rope_theta = (float)g.theta;
    c->bos_id = g.bos >= 0 && g.bos <= INT32_MAX ? (int32_t)g.bos : -1;
    c->eos_id = g.eos >= 0 && g.eos <= INT32_MAX ? (int32_t)g.eos : -1;
    int align;
    if (gg__int(g.alignment, &align) || align == 0 || (align & (align - 1)))
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: bad general.alignment", path);

    /* Each tensor info takes at least 32 bytes (name length, n_dims, one dim,
     * type, offset): a count the rest of the file cannot hold is refused
     * before it sizes an allocation (up to 1.2 GB for a 24-byte header). */
    if (n_tensors > (r.len - r.off) / 32)
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: %llu tensors do not fit in the file", path,
                           (unsigned long long)n_tensors);
    gguf_tensor *ts = calloc(n_tensors ? (size_t)n_tensors : 1, sizeof(*ts));
    if (!ts) return td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
    for (uint64_t i = 0; i < n_tensors && !r.bad; i++) {
        gguf_tensor *t = &ts[i];
        t->name = gg__str(&r, &t->name_len);
        t->n_dims = (uint32_t)gg__u(&r, 4);
        if (t->n_dims == 0 || t->n_dims > GGUF_MAX_DIMS) r.bad = 1;
        for (uint32_t d = 0; d < t->n_dims && !r.bad; d++)
            t->ne[d] = gg__u(&r, 8);
        t->type = (uint32_t)gg__u(&r, 4);
        t->offset = gg__u(&r, 8);
    }
    size_t data_start = (r.off + (size_t)align - 1) & ~((size_t)align - 1);
    if (r.bad || data_start > fbytes) {
        free(ts);
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: tensor table runs past the end", path);
    }
    if (c->vocab_size == 0) {
        for (uint64_t i = 0; i < n_tensors; i++)
            if (ts[i].name_len == 17 && memcmp(ts[i].name, "token_embd.weight", 17) == 0 &&
                ts[i].n_dims == 2 && ts[i].ne[1] < (1u << 30))
                c->vocab_size = (int)ts[i].ne[1];
    }
    rc = mdl__check_config(c, err, errlen);
    if (rc != 0) {
        free(ts);
        return rc;
    }

    /* Resolves one tensor by name and expected shape [rows][cols] (cols 0: 1-D). */
#define GG_GETM(dst, mat, want_name, rows, cols, required)                                         \
    do {                                                                                           \
        rc = gg__get(m, ts, n_tensors, data_start, fbytes, want_name, rows, cols, required,        \
                     &(dst), mat, path, err, errlen);                                              \
        if (rc != 0) goto out;                                                                     \
    } while (0)
#define GG_GET(dst, want_name, rows, cols, required)                                               \
    GG_GETM(dst, NULL, want_name, rows, cols, required)
    int64_t d = c->dim, hd = c->hidden_dim, V = c->vocab_size;
    int64_t qd = (int64_t)c->n_heads * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim;
    m->layers = calloc((size_t)c->n_layers, sizeof(*m->layers));
    if (!m->layers) {
        rc = td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
        goto out;
    }
    GG_GETM(m->tok_embed, &m->tok_embed_mat, "token_embd.weight", V, d, 1);
    GG_GET(m->final_norm, "output_norm.weight", d, 0, 1);
    GG_GETM(m->output, &m->output_mat, "output.weight", V, d, 0);
    c->tied_output = m->output_mat.data == NULL;
    if (c->tied_output) {
        m->output = m->tok_embed;
        m->output_mat = m->tok_embed_mat;
    }
    for (int l = 0; l < c->n_layers; l++) {
        mdl_layer *ly = &m->layers[l];
        char name[96];
#define GG_LAYER(field, suffix, rows, cols, req)                                                   \
    do {                                                                                           \
        snprintf(name, sizeof(name), "blk.%d.%s", l, suffix);                                      \
        GG_GET(ly->field, name, rows, cols, req);                                                  \
    } while (0)
#define GG_MAT(field, suffix, rows, cols)                                                          \
    do {                                                                                           \
        snprintf(name, sizeof(name), "blk.%d.%s", l, suffix);                                      \
        GG_GETM(ly->field, &ly->mat.field, name, rows, cols, 1);                                   \
    } while (0)
        GG_LAYER(attn_norm, "attn_norm.weight", d, 0, 1);
        GG_MAT(wq, "attn_q.weight", qd, d);
        GG_MAT(wk, "attn_k.weight", kvd, d);
        GG_MAT(wv, "attn_v.weight", kvd, d);
        GG_LAYER(bq, "attn_q.bias", qd, 0, is_qwen2);
        GG_LAYER(bk, "attn_k.bias", kvd, 0, is_qwen2);
        GG_LAYER(bv, "attn_v.bias", kvd, 0, is_qwen2);
        GG_MAT(wo, "attn_output.weight", d, qd);
        GG_LAYER(ffn_norm, "ffn_norm.weight", d, 0, 1);
        GG_MAT(w_gate, "ffn_gate.weight", hd, d);
        GG_MAT(w_up, "ffn_up.weight", hd, d);
        GG_MAT(w_down, "ffn_down.weight", d, hd);
#undef GG_LAYER
#undef GG_MAT
        if ((ly->bq != NULL) != (ly->bk != NULL) || (ly->bq != NULL) != (ly->bv != NULL)) {
            rc = td_err_fail(err, errlen, TD_EFORMAT,
                             "%s: layer %d has some but not all of the q/k/v biases", path, l);
            goto out;
        }
        if (ly->bq) c->qkv_bias = 1;
    }
#undef GG_GET
#undef GG_GETM
    rc = 0;
out:
    free(ts);
    return rc;
}

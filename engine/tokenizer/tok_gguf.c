/* The tokenizer inside a GGUF file (llama.cpp's metadata keys
 * tokenizer.ggml.*). Only the SentencePiece-style "llama" model is read: its
 * pieces and scores are exactly a llama2.c tokenizer.bin with U+2581 for the
 * space, so the file's vocabulary is turned into that layout and loaded by
 * tok_l2c.c (same merges by score, byte fallback, dummy prefix). BOS/EOS
 * come from the metadata, special tokens from token_type (control and
 * unknown). Other models ("gpt2" BPE, ...) are refused with TD_EUNSUPPORTED.
 *
 * The metadata is read through a bounds-checked cursor over a read-only
 * mapping; the tensors are never touched. */
#include "engine/tokenizer/tok_internal.h"

#include "common/err.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum {
    GG_U8 = 0,
    GG_I8 = 1,
    GG_U16 = 2,
    GG_I16 = 3,
    GG_U32 = 4,
    GG_I32 = 5,
    GG_F32 = 6,
    GG_BOOL = 7,
    GG_STRING = 8,
    GG_ARRAY = 9,
    GG_U64 = 10,
    GG_I64 = 11,
    GG_F64 = 12,
};

#define GG_TOKEN_CONTROL 3 /* token_type: control (BOS, EOS, ...) */
#define GG_TOKEN_UNKNOWN 2

typedef struct gg_cur {
    const uint8_t *p;
    size_t n, off;
    bool bad; /* read past the end */
} gg_cur;

static const uint8_t *gg_take(gg_cur *c, size_t k)
{
    if (c->bad || k > c->n - c->off) {
        c->bad = true;
        return NULL;
    }
    const uint8_t *q = c->p + c->off;
    c->off += k;
    return q;
}

static uint64_t gg_uint(gg_cur *c, size_t bytes)
{
    const uint8_t *q = gg_take(c, bytes);
    uint64_t v = 0;
    for (size_t i = bytes; q && i-- > 0;)
        v = (v << 8) | q[i];
    return v;
}

/* A GGUF string: u64 length, bytes. */
static const char *gg_str(gg_cur *c, size_t *len)
{
    uint64_t l = gg_uint(c, 8);
    const uint8_t *q = gg_take(c, l > SIZE_MAX ? SIZE_MAX : (size_t)l);
    *len = q ? (size_t)l : 0;
    return (const char *)q;
}

static size_t gg_scalar_size(uint32_t type)
{
    switch (type) {
    case GG_U8:
    case GG_I8:
    case GG_BOOL:
        return 1;
    case GG_U16:
    case GG_I16:
        return 2;
    case GG_U32:
    case GG_I32:
    case GG_F32:
        return 4;
    case GG_U64:
    case GG_I64:
    case GG_F64:
        return 8;
    default:
        return 0;
    }
}

/* Skips one value of type (arrays of arrays included, one level deep at a
 * time: depth bounds the recursion). */
static void gg_skip(gg_cur *c, uint32_t type, int depth)
{
    size_t sz = gg_scalar_size(type), l;
    if (sz) {
        gg_take(c, sz);
    } else if (type == GG_STRING) {
        gg_str(c, &l);
    } else if (type == GG_ARRAY && depth < 4) {
        uint32_t et = (uint32_t)gg_uint(c, 4);
        uint64_t n = gg_uint(c, 8);
        size_t esz = gg_scalar_size(et);
        if (esz) {
            if (n > (c->n - c->off) / esz) c->bad = true;
            gg_take(c, (size_t)n * esz);
            return;
        }
        for (uint64_t i = 0; i < n && !c->bad; i++)
            gg_skip(c, et, depth + 1);
    } else {
        c->bad = true;
    }
}

/* An array header of element type want: returns its length (or -1). */
static int64_t gg_array(gg_cur *c, uint32_t type, uint32_t want)
{
    if (type != GG_ARRAY) return -1;
    uint32_t et = (uint32_t)gg_uint(c, 4);
    uint64_t n = gg_uint(c, 8);
    if (c->bad || et != want || n > (1u << 24)) return -1;
    return (int64_t)n;
}

static int gg_fail(char *err, size_t errlen, int rc, const char *path, const char *what)
{
    td_err_set(err, errlen, "%s: GGUF tokenizer: %s", path, what);
    return rc;
}

/* What the metadata gives. Pointers point into the mapping. */
typedef struct gg_vocab {
    const char *model;
    size_t model_len;
    int64_t n_tokens;
    size_t tokens_off; /* cursor offset of the first token string */
    int64_t n_scores;
    size_t scores_off;
    int64_t n_types;
    size_t types_off;
    int64_t bos, eos;
    int add_bos; /* -1: not given */
} gg_vocab;

static int gg_read_meta(gg_cur *c, gg_vocab *v, const char *path, char *err, size_t errlen)
{
    const uint8_t *magic = gg_take(c, 4);
    if (!magic || memcmp(magic, "GGUF", 4) != 0)
        return gg_fail(err, errlen, TD_EFORMAT, path, "no GGUF magic");
    uint32_t version = (uint32_t)gg_uint(c, 4);
    if (version != 2 && version != 3)
        return gg_fail(err, errlen, TD_EUNSUPPORTED, path, "GGUF version other than 2 or 3");
    gg_uint(c, 8); /* tensor count: not needed */
    uint64_t n_kv = gg_uint(c, 8);
    for (uint64_t i = 0; i < n_kv && !c->bad; i++) {
        size_t kl;
        const char *k = gg_str(c, &kl);
        uint32_t type = (uint32_t)gg_uint(c, 4);
        if (c->bad) break;
#define KEY_IS(s) (kl == sizeof(s) - 1 && memcmp(k, s, kl) == 0)
        if (KEY_IS("tokenizer.ggml.model") && type == GG_STRING) {
            v->model = gg_str(c, &v->model_len);
        } else if (KEY_IS("tokenizer.ggml.tokens")) {
            if ((v->n_tokens = gg_array(c, type, GG_STRING)) < 0)
                return gg_fail(err, errlen, TD_EFORMAT, path, "tokens is not a string array");
            v->tokens_off = c->off;
            for (int64_t j = 0; j < v->n_tokens && !c->bad; j++)
                gg_skip(c, GG_STRING, 0);
        } else if (KEY_IS("tokenizer.ggml.scores")) {
            if ((v->n_scores = gg_array(c, type, GG_F32)) < 0)
                return gg_fail(err, errlen, TD_EFORMAT, path, "scores is not an f32 array");
            v->scores_off = c->off;
            gg_take(c, (size_t)v->n_scores * 4);
        } else if (KEY_IS("tokenizer.ggml.token_type")) {
            if ((v->n_types = gg_array(c, type, GG_I32)) < 0)
                return gg_fail(err, errlen, TD_EFORMAT, path, "token_type is not an i32 array");
            v->types_off = c->off;
            gg_take(c, (size_t)v->n_types * 4);
        } else if ((KEY_IS("tokenizer.ggml.bos_token_id") ||
                    KEY_IS("tokenizer.ggml.eos_token_id")) &&
                   (type == GG_U32 || type == GG_I32)) {
            uint32_t id = (uint32_t)gg_uint(c, 4);
            int64_t val = type == GG_I32 && id > INT32_MAX ? -1 : (int64_t)id;
            if (k[15] == 'b')
                v->bos = val;
            else
                v->eos = val;
        } else if (KEY_IS("tokenizer.ggml.add_bos_token") && type == GG_BOOL) {
            v->add_bos = gg_uint(c, 1) != 0;
        } else {
            gg_skip(c, type, 0);
        }
#undef KEY_IS
    }
    if (c->bad) return gg_fail(err, errlen, TD_EFORMAT, path, "metadata runs past the file's end");
    return 0;
}

/* Writes the vocabulary as a llama2.c tokenizer.bin (U+2581 becomes ' ').
 * *out is malloc'd. */
static int gg_to_l2c(const gg_cur *c, const gg_vocab *v, char **out, size_t *out_len)
{
    gg_cur t = {.p = c->p, .n = c->n, .off = v->tokens_off};
    size_t total = 4, max_len = 1;
    for (int64_t i = 0; i < v->n_tokens; i++) {
        size_t l;
        gg_str(&t, &l);
        total += 8 + l;
        if (l > max_len) max_len = l;
    }
    if (t.bad || max_len > 4096) return TD_EFORMAT;
    char *b = malloc(total);
    if (b == NULL) return TD_ENOMEM;
    t.off = v->tokens_off;
    size_t o = 4;
    int32_t ml = (int32_t)max_len;
    memcpy(b, &ml, 4);
    for (int64_t i = 0; i < v->n_tokens; i++) {
        size_t l;
        const char *s = gg_str(&t, &l);
        memcpy(b + o, c->p + v->scores_off + 4 * (size_t)i, 4); /* f32, little-endian */
        size_t w = 0;
        for (size_t k = 0; k < l;) {
            if (k + 3 <= l && memcmp(s + k, "\xE2\x96\x81", 3) == 0) {
                b[o + 8 + w++] = ' ';
                k += 3;
            } else {
                b[o + 8 + w++] = s[k++];
            }
        }
        int32_t wl = (int32_t)w;
        memcpy(b + o + 4, &wl, 4);
        o += 8 + w;
    }
    *out = b;
    *out_len = o;
    return 0;
}

int tok__gguf_load(tok_tokenizer *t, const char *path, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        td_err_set(err, errlen, "%s: %s", path, strerror(e));
        return td_err_from_errno(e);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0) {
        close(fd);
        return gg_fail(err, errlen, TD_EFORMAT, path, "empty or unreadable file");
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return gg_fail(err, errlen, TD_EIO, path, "cannot map the file");
    gg_cur c = {.p = map, .n = (size_t)st.st_size};
    gg_vocab v = {.bos = -1, .eos = -1, .add_bos = -1};
    char *blob = NULL;
    size_t blob_len = 0;
    int rc = gg_read_meta(&c, &v, path, err, errlen);
    if (rc < 0) goto out;
    if (v.model == NULL) {
        rc = gg_fail(err, errlen, TD_EFORMAT, path, "the file has no tokenizer.ggml.* vocabulary");
        goto out;
    }
    if (!(v.model_len == 5 && memcmp(v.model, "llama", 5) == 0)) {
        td_err_set(err, errlen,
                   "%s: GGUF tokenizer model '%.*s' is not supported (only 'llama'); pass a "
                   "tokenizer file",
                   path, (int)(v.model_len > 32 ? 32 : v.model_len), v.model);
        rc = TD_EUNSUPPORTED;
        goto out;
    }
    if (v.n_tokens <= 0 || v.n_scores != v.n_tokens ||
        (v.n_types != 0 && v.n_types != v.n_tokens)) {
        rc = gg_fail(err, errlen, TD_EFORMAT, path,
                     "tokens, scores and token_type differ in length");
        goto out;
    }
    rc = gg_to_l2c(&c, &v, &blob, &blob_len);
    if (rc < 0) {
        gg_fail(err, errlen, rc, path, rc == TD_ENOMEM ? "out of memory" : "a token is too long");
        goto out;
    }
    rc = tok__l2c_load(t, blob, blob_len, err, errlen);
    if (rc < 0) goto out;
    /* The metadata, not llama2.c's fixed ids 0-2, says what is special. */
    if (v.n_types > 0) {
        for (int32_t i = 0; i < t->n_vocab; i++) {
            gg_cur tc = {.p = c.p, .n = c.n, .off = v.types_off + 4 * (size_t)i};
            int32_t ty = (int32_t)(uint32_t)gg_uint(&tc, 4);
            t->attr[i] &= (uint8_t)~TOK__ATTR_SPECIAL;
            if (ty == GG_TOKEN_CONTROL || ty == GG_TOKEN_UNKNOWN) t->attr[i] |= TOK__ATTR_SPECIAL;
            if (ty == GG_TOKEN_UNKNOWN) t->unk_id = i;
        }
    }
    t->bos_id = v.bos >= 0 && v.bos < t->n_vocab ? (int32_t)v.bos : -1;
    t->eos_id = v.eos >= 0 && v.eos < t->n_vocab ? (int32_t)v.eos : -1;
    t->add_bos = t->bos_id >= 0 && v.add_bos != 0;
out:
    free(blob);
    munmap(map, (size_t)st.st_size);
    return rc;
}

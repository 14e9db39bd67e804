/* tok: loading dispatch, shared tables, decoding, streaming, chat templates. */
#include "engine/tokenizer/tok_internal.h"

#include "common/err.h"
#include "common/sbuf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <xxhash.h>

/* tokenizer files larger than this are refused (the largest real ones are
 * under 20 MB). */
#define TOK__MAX_FILE ((size_t)512 << 20)

int tok__read_file(const char *path, size_t max, char **data, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        int e = errno;
        td_err_set(err, errlen, "%s: %s", path, strerror(e));
        return td_err_from_errno(e);
    }
    int rc = 0;
    char *buf = NULL;
    if (fseek(f, 0, SEEK_END) != 0) goto io;
    long sz = ftell(f);
    if (sz < 0) goto io;
    if ((size_t)sz > max) {
        td_err_set(err, errlen, "%s: %ld bytes, larger than the %zu allowed", path, sz, max);
        rc = TD_ETOOLONG;
        goto out;
    }
    if (fseek(f, 0, SEEK_SET) != 0) goto io;
    buf = malloc((size_t)sz + 1);
    if (buf == NULL) {
        rc = TD_ENOMEM;
        goto out;
    }
    if (sz > 0 && fread(buf, 1, (size_t)sz, f) != (size_t)sz) goto io;
    buf[sz] = '\0';
    *data = buf;
    *len = (size_t)sz;
    buf = NULL;
    goto out;
io:
    td_err_set(err, errlen, "%s: read error", path);
    rc = TD_EIO;
out:
    free(buf);
    fclose(f);
    return rc;
}

int tok__alloc_vocab(tok_tokenizer *t, int32_t n_vocab)
{
    if (n_vocab <= 0 || n_vocab > (1 << 24)) return TD_ERANGE;
    size_t n = (size_t)n_vocab;
    t->n_vocab = n_vocab;
    t->piece_off = calloc(n, sizeof(uint32_t));
    t->piece_len = calloc(n, sizeof(uint32_t));
    t->dec_off = calloc(n, sizeof(uint32_t));
    t->dec_len = calloc(n, sizeof(uint32_t));
    t->attr = calloc(n, 1);
    if (!t->piece_off || !t->piece_len || !t->dec_off || !t->dec_len || !t->attr) return TD_ENOMEM;
    return 0;
}

int tok__arena_put(tok_tokenizer *t, const void *bytes, size_t len, uint32_t *off)
{
    if (len > UINT32_MAX - t->arena_len) return TD_ERANGE;
    /* Allocated on the first put even when len is 0, so t->arena + off is
     * never arithmetic on NULL (a vocabulary of empty pieces). */
    if (t->arena == NULL || t->arena_len + len > t->arena_cap) {
        size_t cap = t->arena_cap ? t->arena_cap : 4096;
        while (cap < t->arena_len + len)
            cap *= 2;
        if (cap > UINT32_MAX) cap = UINT32_MAX;
        char *a = realloc(t->arena, cap);
        if (a == NULL) return TD_ENOMEM;
        t->arena = a;
        t->arena_cap = cap;
    }
    if (len) memcpy(t->arena + t->arena_len, bytes, len);
    *off = (uint32_t)t->arena_len;
    t->arena_len += len;
    return 0;
}

static uint32_t pow2_at_least(size_t n)
{
    uint32_t c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

int tok__vmap_build(tok_tokenizer *t, const int32_t *ids, size_t n)
{
    uint32_t cap = pow2_at_least(n * 2 + 1);
    t->vocab.slots = malloc(sizeof(int32_t) * cap);
    if (t->vocab.slots == NULL) return TD_ENOMEM;
    memset(t->vocab.slots, 0xff, sizeof(int32_t) * cap);
    t->vocab.mask = cap - 1;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        const char *p = t->arena + t->piece_off[id];
        size_t len = t->piece_len[id];
        uint32_t h = (uint32_t)XXH3_64bits(p, len) & t->vocab.mask;
        for (;;) {
            int32_t s = t->vocab.slots[h];
            if (s < 0) {
                t->vocab.slots[h] = id;
                break;
            }
            /* a duplicated piece keeps its first (lowest listed) id */
            if (t->piece_len[s] == len && memcmp(t->arena + t->piece_off[s], p, len) == 0) break;
            h = (h + 1) & t->vocab.mask;
        }
    }
    return 0;
}

int32_t tok__vmap_find(const tok_tokenizer *t, const void *bytes, size_t len)
{
    if (t->vocab.slots == NULL) return -1;
    uint32_t h = (uint32_t)XXH3_64bits(bytes, len) & t->vocab.mask;
    for (;;) {
        int32_t s = t->vocab.slots[h];
        if (s < 0) return -1;
        if (t->piece_len[s] == len && memcmp(t->arena + t->piece_off[s], bytes, len) == 0) return s;
        h = (h + 1) & t->vocab.mask;
    }
}

static uint32_t pair_hash(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return (uint32_t)k;
}

int tok__mmap_init(tok__mmap *m, size_t n)
{
    uint32_t cap = pow2_at_least(n * 2 + 1);
    m->keys = malloc(sizeof(uint64_t) * cap);
    m->rank = malloc(sizeof(int32_t) * cap);
    m->merged = malloc(sizeof(int32_t) * cap);
    if (!m->keys || !m->rank || !m->merged) return TD_ENOMEM;
    memset(m->keys, 0xff, sizeof(uint64_t) * cap);
    m->mask = cap - 1;
    m->count = 0;
    return 0;
}

int tok__mmap_put(tok__mmap *m, int32_t left, int32_t right, int32_t rank, int32_t merged)
{
    uint64_t k = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    uint32_t h = pair_hash(k) & m->mask;
    if ((size_t)m->count * 2 >= m->mask) return TD_ERANGE; /* sized by tok__mmap_init */
    while (m->keys[h] != UINT64_MAX) {
        if (m->keys[h] == k) return 0; /* a repeated merge keeps its first rank */
        h = (h + 1) & m->mask;
    }
    m->keys[h] = k;
    m->rank[h] = rank;
    m->merged[h] = merged;
    m->count++;
    return 0;
}

bool tok__mmap_find(const tok__mmap *m, int32_t left, int32_t right, int32_t *rank, int32_t *merged)
{
    if (m->keys == NULL) return false;
    uint64_t k = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    uint32_t h = pair_hash(k) & m->mask;
    while (m->keys[h] != UINT64_MAX) {
        if (m->keys[h] == k) {
            *rank = m->rank[h];
            *merged = m->merged[h];
            return true;
        }
        h = (h + 1) & m->mask;
    }
    return false;
}

int tok__parse_byte_piece(const char *s, size_t len)
{
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    return v;
}

int tok__ids_push(tok__ids *ids, int32_t id)
{
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 64;
        int32_t *v = realloc(ids->v, cap * sizeof(int32_t));
        if (v == NULL) return TD_ENOMEM;
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

/* ------------------------------------------------------------------------ */

void tok_free(tok_tokenizer *t)
{
    if (t == NULL) return;
    free(t->arena);
    free(t->piece_off);
    free(t->piece_len);
    free(t->dec_off);
    free(t->dec_len);
    free(t->attr);
    free(t->scores);
    free(t->vocab.slots);
    free(t->merges.keys);
    free(t->merges.rank);
    free(t->merges.merged);
    free(t->added);
    free(t);
}

static bool is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static bool is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* First non-blank byte of a file is '{': a JSON file; "GGUF": a GGUF file. */
static int sniff(const char *path, bool *json, bool *gguf)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) return td_err_from_errno(errno);
    char magic[4];
    *gguf = fread(magic, 1, 4, f) == 4 && memcmp(magic, "GGUF", 4) == 0;
    rewind(f);
    int c;
    do {
        c = fgetc(f);
    } while (c == ' ' || c == '\t' || c == '\r' || c == '\n');
    fclose(f);
    *json = (c == '{');
    return 0;
}

static int load_file(tok_tokenizer *t, const char *path, char *err, size_t errlen)
{
    bool json = false, gguf = false;
    int rc = sniff(path, &json, &gguf);
    if (rc < 0) {
        td_err_set(err, errlen, "%s: %s", path, td_strerror(rc));
        return rc;
    }
    if (gguf) return tok__gguf_load(t, path, err, errlen);
    if (json) {
        if (ends_with(path, "vocab.json")) return tok__hf_load_gpt2(t, path, err, errlen);
        return tok__hf_load(t, path, err, errlen);
    }
    char *data = NULL;
    size_t len = 0;
    rc = tok__read_file(path, TOK__MAX_FILE, &data, &len, err, errlen);
    if (rc < 0) return rc;
    rc = tok__l2c_load(t, data, len, err, errlen);
    free(data);
    return rc;
}

int tok_load(const char *path, tok_tokenizer **out, char *err, size_t errlen)
{
    if (err && errlen) err[0] = '\0';
    if (path == NULL || out == NULL) {
        td_err_set(err, errlen, "tok_load: NULL argument");
        return TD_EINVAL;
    }
    *out = NULL;
    tok_tokenizer *t = calloc(1, sizeof(*t));
    if (t == NULL) return TD_ENOMEM;
    t->bos_id = t->eos_id = t->unk_id = -1;
    memset(t->byte_id, 0xff, sizeof(t->byte_id));

    int rc;
    if (is_dir(path)) {
        /* Order of preference inside a model directory. */
        static const char *const names[] = {"tokenizer.json", "vocab.json", "tokenizer.bin",
                                            "tok512.bin"};
        char buf[4096];
        rc = TD_ENOENT;
        td_err_set(
            err, errlen,
            "%s: no tokenizer.json, vocab.json + merges.txt or tokenizer.bin in this directory",
            path);
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
            int n = snprintf(buf, sizeof(buf), "%s/%s", path, names[i]);
            if (n < 0 || (size_t)n >= sizeof(buf)) {
                td_err_set(err, errlen, "%s: path too long", path);
                rc = TD_ETOOLONG;
                break;
            }
            if (is_file(buf)) {
                rc = load_file(t, buf, err, errlen);
                break;
            }
        }
    } else if (is_file(path)) {
        rc = load_file(t, path, err, errlen);
    } else {
        td_err_set(err, errlen, "%s: no such file or directory", path);
        rc = TD_ENOENT;
    }
    if (rc < 0) {
        if (err && errlen && err[0] == '\0')
            td_err_set(err, errlen, "%s: %s", path, td_strerror(rc));
        tok_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

int tok_vocab_size(const tok_tokenizer *t)
{
    return t ? t->n_vocab : 0;
}

int32_t tok_bos_id(const tok_tokenizer *t)
{
    return t ? t->bos_id : -1;
}

int32_t tok_eos_id(const tok_tokenizer *t)
{
    return t ? t->eos_id : -1;
}

int tok_adds_bos(const tok_tokenizer *t)
{
    return t ? t->add_bos : 0;
}

int tok_is_eog(const tok_tokenizer *t, int32_t id)
{
    if (t == NULL || id < 0) return 0;
    if (id == t->eos_id) return 1;
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] == id) return 1;
    return 0;
}

int tok_is_special(const tok_tokenizer *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_vocab) return 0;
    return (t->attr[id] & TOK__ATTR_SPECIAL) != 0;
}

int tok_piece(const tok_tokenizer *t, int32_t id, const char **piece, size_t *len)
{
    if (t == NULL || piece == NULL || len == NULL) return TD_EINVAL;
    if (id < 0 || id >= t->n_vocab) return TD_ERANGE;
    *piece = t->arena + t->piece_off[id];
    *len = t->piece_len[id];
    return 0;
}

int tok_check_model_vocab(const tok_tokenizer *t, int model_vocab, int exact, char *err,
                          size_t errlen)
{
    if (t == NULL) return TD_EINVAL;
    if (t->n_vocab > model_vocab) {
        td_err_set(err, errlen,
                   "the tokenizer has %d tokens but the model only %d: ids from %d on have no "
                   "embedding row (wrong tokenizer for this model?)",
                   t->n_vocab, model_vocab, model_vocab);
        return TD_EMISMATCH;
    }
    if (exact && t->n_vocab < model_vocab) {
        td_err_set(err, errlen,
                   "the tokenizer has %d tokens but the model %d: the model can emit ids the "
                   "tokenizer lacks (wrong tokenizer for this model?)",
                   t->n_vocab, model_vocab);
        return TD_EMISMATCH;
    }
    return 0;
}

int tok_parse_id(const char *s, size_t len, int32_t n_vocab, int32_t *id)
{
    if (s == NULL || id == NULL || len == 0) return TD_EINVAL;
    int64_t v = 0;
    bool big = false;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return TD_EINVAL;
        v = v * 10 + (s[i] - '0');
        if (v > INT32_MAX) {
            big = true; /* keep checking the digits; the value is out of range */
            v = INT32_MAX;
        }
    }
    if (big || v >= n_vocab) return TD_ERANGE;
    *id = (int32_t)v;
    return 0;
}

int tok_encode(const tok_tokenizer *t, const char *text, size_t len, int flags, int32_t **ids,
               size_t *n_ids)
{
    if (t == NULL || (text == NULL && len > 0) || ids == NULL || n_ids == NULL) return TD_EINVAL;
    *ids = NULL;
    *n_ids = 0;
    if (text == NULL) text = "";
    if (len >= UINT32_MAX / 4) return TD_ETOOLONG; /* symbol offsets are 32-bit */
    if (t->kind == TOK__KIND_L2C)
        return tok__l2c_encode(t, text, len, flags & TOK_ADD_BOS, ids, n_ids);
    return tok__hf_encode(t, text, len, flags, ids, n_ids);
}

/* ------------------------------------------------------------------------ */
/* Decoding */

/* Strips a leading space of the output: the SentencePiece decoders do it at
 * the start of the text (tokenizer.json "Strip"), llama2.c after BOS. */
static bool strip_at(const tok_tokenizer *t, bool at_start, int32_t prev)
{
    if (t->kind == TOK__KIND_L2C) return prev >= 0 && prev == t->bos_id;
    return t->dec_strip_space && at_start;
}

/* Ends a run of byte-fallback tokens, raw[run..n): kept when it is valid
 * UTF-8 as a whole, else replaced by one U+FFFD per byte. Returns the new
 * end of raw (raw has room for 3 bytes per byte of the run). */
static size_t end_byte_run(char *raw, size_t run, size_t n)
{
    size_t len = n - run;
    const uint8_t *u = (const uint8_t *)raw + run;
    bool valid = true;
    for (size_t i = 0; i < len && valid;) {
        uint32_t cp;
        size_t l = tok__utf8_next(u, len, i, &cp);
        valid = !(cp == 0xFFFD && l == 1);
        i += l;
    }
    if (valid) return n;
    for (size_t i = len; i-- > 0;) /* backwards: the output is longer than the input */
        memcpy(raw + run + 3 * i, "\xEF\xBF\xBD", 3);
    return run + 3 * len;
}

int tok_decode(const tok_tokenizer *t, const int32_t *ids, size_t n_ids, int skip_special,
               char **text, size_t *len)
{
    if (t == NULL || (ids == NULL && n_ids > 0) || text == NULL || len == NULL) return TD_EINVAL;
    *text = NULL;
    *len = 0;
    size_t raw_len = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab) return TD_ERANGE;
        raw_len += t->dec_len[ids[i]];
    }
    /* x3: a byte run may become U+FFFD per byte */
    if (raw_len > (SIZE_MAX - 1) / 3) return TD_ENOMEM;
    char *raw = malloc(raw_len * 3 + 1);
    if (raw == NULL) return TD_ENOMEM;
    size_t n = 0;
    size_t run = SIZE_MAX; /* start in raw of the current byte-token run */
    int32_t prev = -1;
    bool first = true; /* no token emitted yet */
    for (size_t i = 0; i < n_ids; i++) {
        int32_t id = ids[i];
        const char *p = t->arena + t->dec_off[id];
        size_t pl = t->dec_len[id];
        if (!(skip_special && (t->attr[id] & TOK__ATTR_SPECIAL))) {
            bool is_byte = t->dec_byte_runs && (t->attr[id] & TOK__ATTR_BYTE);
            if (!is_byte && run != SIZE_MAX) n = end_byte_run(raw, run, n);
            if (is_byte && run == SIZE_MAX) run = n;
            if (!is_byte) run = SIZE_MAX;
            if (pl > 0 && p[0] == ' ' && strip_at(t, first, prev)) {
                p++;
                pl--;
            }
            first = false;
            memcpy(raw + n, p, pl);
            n += pl;
        }
        prev = id;
    }
    if (run != SIZE_MAX) n = end_byte_run(raw, run, n);
    /* At most 3 output bytes (U+FFFD) per input byte. */
    char *out = malloc(n * 3 + 1);
    if (out == NULL) {
        free(raw);
        return TD_ENOMEM;
    }
    size_t used;
    size_t m = tok__utf8_sanitize((const uint8_t *)raw, n, out, true, &used);
    free(raw);
    out[m] = '\0';
    *text = out;
    *len = m;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Streaming */

struct tok_stream {
    const tok_tokenizer *tok;
    int32_t prev;
    uint8_t pending[4]; /* an incomplete UTF-8 sequence (at most 3 bytes) */
    size_t n_pending;
};

int tok_stream_create(const tok_tokenizer *tok, tok_stream **out)
{
    if (tok == NULL || out == NULL) return TD_EINVAL;
    tok_stream *st = calloc(1, sizeof(*st));
    if (st == NULL) return TD_ENOMEM;
    st->tok = tok;
    st->prev = -1;
    *out = st;
    return 0;
}

void tok_stream_free(tok_stream *st)
{
    free(st);
}

int tok_stream_push(tok_stream *st, int32_t id, char *out, size_t cap, size_t *written)
{
    if (st == NULL || out == NULL || written == NULL || cap == 0) return TD_EINVAL;
    const tok_tokenizer *t = st->tok;
    if (id < 0 || id >= t->n_vocab) return TD_ERANGE;
    *written = 0;
    if (t->attr[id] & TOK__ATTR_SPECIAL) {
        /* Special tokens (BOS, EOS, chat markers) are not user-visible text. */
        st->prev = id;
        out[0] = '\0';
        return 0;
    }
    const char *p = t->arena + t->dec_off[id];
    size_t pl = t->dec_len[id];
    /* A stream continues a text, so only a space right after BOS is dropped. */
    if (pl > 0 && p[0] == ' ' && st->prev >= 0 && st->prev == t->bos_id &&
        (t->kind == TOK__KIND_L2C || t->dec_strip_space)) {
        p++;
        pl--;
    }
    uint8_t small[64];
    uint8_t *buf = small;
    size_t n = st->n_pending + pl;
    if (n > sizeof(small)) {
        buf = malloc(n);
        if (buf == NULL) return TD_ENOMEM;
    }
    memcpy(buf, st->pending, st->n_pending);
    memcpy(buf + st->n_pending, p, pl);
    size_t used;
    size_t need = tok__utf8_sanitize(buf, n, NULL, false, &used);
    if (need + 1 > cap) {
        if (buf != small) free(buf);
        return TD_ERANGE;
    }
    tok__utf8_sanitize(buf, n, out, false, &used);
    out[need] = '\0';
    st->n_pending = n - used; /* < 4 by construction of the sanitizer */
    memmove(st->pending, buf + used, st->n_pending);
    if (buf != small) free(buf);
    st->prev = id;
    *written = need;
    return 0;
}

int tok_stream_flush(tok_stream *st, char *out, size_t cap, size_t *written)
{
    if (st == NULL || out == NULL || written == NULL || cap == 0) return TD_EINVAL;
    size_t used;
    size_t need = tok__utf8_sanitize(st->pending, st->n_pending, NULL, true, &used);
    if (need + 1 > cap) return TD_ERANGE;
    tok__utf8_sanitize(st->pending, st->n_pending, out, true, &used);
    out[need] = '\0';
    st->n_pending = 0;
    *written = need;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Chat templates */

enum tok_chat_family tok_chat_family_of(const tok_tokenizer *t)
{
    return t ? t->chat : TOK_CHAT_NONE;
}

/* Jinja's trim / Python's str.strip(): Unicode white space at both ends. */
static void put_stripped(sbuf *b, const char *s)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t n = strlen(s), i = 0, end = 0;
    while (i < n) {
        uint32_t cp;
        size_t l = tok__utf8_next(u, n, i, &cp);
        if (!tok__is_space(cp)) break;
        i += l;
    }
    /* end: just past the last non-space code point */
    for (size_t j = i; j < n;) {
        uint32_t cp;
        size_t l = tok__utf8_next(u, n, j, &cp);
        j += l;
        if (!tok__is_space(cp)) end = j;
    }
    if (end > i) sbuf_put(b, s + i, end - i);
}

static void put_token(sbuf *b, const tok_tokenizer *t, int32_t id, const char *fallback)
{
    if (id >= 0 && id < t->n_vocab && t->piece_len[id] > 0)
        sbuf_put(b, t->arena + t->piece_off[id], t->piece_len[id]);
    else
        sbuf_puts(b, fallback);
}

static bool role_ok(const char *r)
{
    return r && (!strcmp(r, "system") || !strcmp(r, "user") || !strcmp(r, "assistant"));
}

int tok_chat_render(const tok_tokenizer *t, const tok_chat_msg *msgs, size_t n_msgs,
                    int add_generation_prompt, char **out)
{
    if (t == NULL) return TD_EINVAL;
    return tok_chat_render_as(t, t->chat, msgs, n_msgs, add_generation_prompt, out);
}

int tok_chat_render_as(const tok_tokenizer *t, enum tok_chat_family family,
                       const tok_chat_msg *msgs, size_t n_msgs, int add_generation_prompt,
                       char **out)
{
    if (t == NULL || out == NULL || (msgs == NULL && n_msgs > 0)) return TD_EINVAL;
    *out = NULL;
    for (size_t i = 0; i < n_msgs; i++)
        if (!role_ok(msgs[i].role) || msgs[i].content == NULL) return TD_EINVAL;
    sbuf b = {0};
    switch (family) {
    case TOK_CHAT_LLAMA3:
        put_token(&b, t, t->bos_id, "<|begin_of_text|>");
        for (size_t i = 0; i < n_msgs; i++) {
            sbuf_puts(&b, "<|start_header_id|>");
            sbuf_puts(&b, msgs[i].role);
            sbuf_puts(&b, "<|end_header_id|>\n\n");
            put_stripped(&b, msgs[i].content);
            sbuf_puts(&b, "<|eot_id|>");
        }
        if (add_generation_prompt)
            sbuf_puts(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case TOK_CHAT_LLAMA2: {
        /* An optional leading system message folds into the first user turn;
         * the rest must alternate user/assistant starting with user. */
        size_t first = 0;
        const char *sys = NULL;
        if (n_msgs > 0 && !strcmp(msgs[0].role, "system")) {
            sys = msgs[0].content;
            first = 1;
        }
        for (size_t i = first; i < n_msgs; i++) {
            bool user_turn = ((i - first) % 2) == 0;
            if (user_turn != (strcmp(msgs[i].role, "user") == 0) ||
                !strcmp(msgs[i].role, "system")) {
                free(b.p);
                return TD_EINVAL;
            }
            if (user_turn) {
                put_token(&b, t, t->bos_id, "<s>");
                sbuf_puts(&b, "[INST] ");
                if (i == first && sys != NULL) {
                    /* content.strip() applies to the whole folded text */
                    sbuf c = {0};
                    sbuf_puts(&c, "<<SYS>>\n");
                    sbuf_puts(&c, sys);
                    sbuf_puts(&c, "\n<</SYS>>\n\n");
                    sbuf_puts(&c, msgs[i].content);
                    if (c.rc < 0) {
                        free(c.p);
                        free(b.p);
                        return c.rc;
                    }
                    put_stripped(&b, c.p);
                    free(c.p);
                } else {
                    put_stripped(&b, msgs[i].content);
                }
                sbuf_puts(&b, " [/INST]");
            } else {
                sbuf_puts(&b, " ");
                put_stripped(&b, msgs[i].content);
                sbuf_puts(&b, " ");
                put_token(&b, t, t->eos_id, "</s>");
            }
        }
        break;
    }
    case TOK_CHAT_CHATML:
        if (t->chat_default_system && (n_msgs == 0 || strcmp(msgs[0].role, "system") != 0)) {
            sbuf_puts(&b, "<|im_start|>system\n");
            sbuf_put(&b, t->arena + t->chat_system_off, t->chat_system_len);
            sbuf_puts(&b, "<|im_end|>\n");
        }
        for (size_t i = 0; i < n_msgs; i++) {
            sbuf_puts(&b, "<|im_start|>");
            sbuf_puts(&b, msgs[i].role);
            sbuf_puts(&b, "\n");
            sbuf_puts(&b, msgs[i].content);
            sbuf_puts(&b, "<|im_end|>\n");
        }
        if (add_generation_prompt) sbuf_puts(&b, "<|im_start|>assistant\n");
        break;
    default:
        return TD_EUNSUPPORTED;
    }
    int rc = b.rc;
    *out = sbuf_take(&b);
    return *out ? 0 : (rc ? rc : TD_ENOMEM);
}

/* lt_prompt: exact-length prompts: a per-request head of single-token words,
 * then one filler word repeated. */
#include "loadtest/lt_prompt.h"

#include "common/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef TANDEM_LT_HAVE_TOKENIZER
#include "engine/tokenizer/tok.h"
#endif

#define LT_PROMPT_MAX_ALT  16
#define LT_PROMPT_WORD_MAX 24

struct lt_prompt {
    int is_text;
    char sep;                                        /* ' ' for text, ',' for ids */
    char word[LT_PROMPT_WORD_MAX];                   /* the filler unit's word */
    char alt[LT_PROMPT_MAX_ALT][LT_PROMPT_WORD_MAX]; /* head digits */
    int n_alt;                                       /* >= 1 */
    size_t unit_len;                                 /* bytes of a filler unit, sep + word */
    int32_t max_units;
    int32_t bos; /* 1 when the server's encoding adds BOS */
    char *buf;   /* max_units filler units, each sep + word, NUL-terminated */
#ifdef TANDEM_LT_HAVE_TOKENIZER
    tok_tokenizer *tok;
#endif
};

/* Fills p->buf with max_units filler units (sep + word). */
static int fill(lt_prompt *p, const char *word, int32_t max_units)
{
    size_t wl = strlen(word);
    if (wl == 0 || wl >= LT_PROMPT_WORD_MAX) return TD_EINVAL;
    if (max_units < 1) max_units = 1;
    size_t units = (size_t)max_units;
    if (units > (SIZE_MAX - 1) / (wl + 1)) return TD_ERANGE;
    char *buf = malloc(units * (wl + 1) + 1);
    if (!buf) return TD_ENOMEM;
    char *w = buf;
    for (size_t i = 0; i < units; i++) {
        *w++ = p->sep;
        memcpy(w, word, wl);
        w += wl;
    }
    *w = '\0';
    free(p->buf);
    p->buf = buf;
    p->unit_len = wl + 1;
    p->max_units = max_units;
    snprintf(p->word, sizeof(p->word), "%s", word);
    return 0;
}

int lt_prompt_create_ids(int32_t id, int32_t max_tokens, lt_prompt **out)
{
    if (id < 0 || id > INT32_MAX - LT_PROMPT_MAX_ALT || !out) return TD_EINVAL;
    lt_prompt *p = calloc(1, sizeof(*p));
    if (!p) return TD_ENOMEM;
    p->sep = ',';
    char word[16];
    snprintf(word, sizeof(word), "%d", id);
    int rc = fill(p, word, max_tokens);
    if (rc) {
        free(p);
        return rc;
    }
    p->word[0] = '\0';
    p->n_alt = LT_PROMPT_MAX_ALT;
    for (int k = 0; k < LT_PROMPT_MAX_ALT; k++)
        snprintf(p->alt[k], sizeof(p->alt[k]), "%d", id + k);
    *out = p;
    return 0;
}

int lt_prompt_is_text(const lt_prompt *p)
{
    return p->is_text;
}

const char *lt_prompt_word(const lt_prompt *p)
{
    return p->word;
}

int lt_prompt_n_alt(const lt_prompt *p)
{
    return p->n_alt;
}

static int32_t units_for(const lt_prompt *p, int32_t n)
{
    int32_t units = p->is_text ? n - p->bos : n;
    if (units < 1) units = 1;
    if (units > p->max_units) units = p->max_units;
    return units;
}

void lt_prompt_get(const lt_prompt *p, int32_t n, uint64_t variant, lt_prompt_parts *out)
{
    int32_t units = units_for(p, n);
    int32_t head = units < LT_PROMPT_HEAD_UNITS ? units : LT_PROMPT_HEAD_UNITS;
    size_t w = 0;
    for (int32_t d = 0; d < head; d++) {
        const char *a = p->alt[variant % (uint64_t)p->n_alt];
        variant /= (uint64_t)p->n_alt;
        size_t al = strlen(a);
        if (d > 0) out->head[w++] = p->sep;
        memcpy(out->head + w, a, al); /* 6 * (23 + 1) bytes fit in LT_PROMPT_HEAD_MAX */
        w += al;
    }
    out->head[w] = '\0';
    out->head_len = w;
    out->tail = p->buf;
    out->tail_len = (size_t)(units - head) * p->unit_len;
}

/* Index into alt[] of unit k of the prompt: the head digits of the block the
 * unit falls in (the request's variant outside shared blocks), filler past the
 * head. Returns -1 for a filler unit. */
static int unit_alt(const lt_prompt *p, int32_t k, uint64_t variant, const lt_prompt_shape *shape)
{
    int64_t pos = k, id = -1;
    if (shape && shape->hashes && shape->block_tokens > 0) {
        /* Token position (BOS included) decides the block, so blocks line up
         * with the server's token blocks. */
        int64_t tok = (int64_t)k + (p->is_text ? p->bos : 0);
        int64_t block = tok / shape->block_tokens;
        if (block < (int64_t)shape->n_hash) {
            pos = tok - block * shape->block_tokens - (block == 0 && p->is_text ? p->bos : 0);
            id = (int64_t)block;
        } else {
            pos = tok - (int64_t)shape->n_hash * shape->block_tokens;
        }
    }
    if (pos >= LT_PROMPT_HEAD_UNITS) return -1;
    uint64_t v = id >= 0 ? shape->hashes[id] : variant;
    for (int64_t d = 0; d < pos; d++)
        v /= (uint64_t)p->n_alt;
    return (int)(v % (uint64_t)p->n_alt);
}

int lt_prompt_text(const lt_prompt *p, int32_t n, uint64_t variant, const lt_prompt_shape *shape,
                   char **out, size_t *len)
{
    if (!shape || !shape->hashes || shape->n_hash == 0) {
        lt_prompt_parts parts;
        lt_prompt_get(p, n, variant, &parts);
        char *s = malloc(parts.head_len + parts.tail_len + 1);
        if (!s) return TD_ENOMEM;
        memcpy(s, parts.head, parts.head_len);
        memcpy(s + parts.head_len, parts.tail, parts.tail_len);
        s[parts.head_len + parts.tail_len] = '\0';
        *out = s;
        *len = parts.head_len + parts.tail_len;
        return 0;
    }
    int32_t units = units_for(p, n);
    char *s = malloc((size_t)units * LT_PROMPT_WORD_MAX + 1); /* every unit fits sep + word */
    if (!s) return TD_ENOMEM;
    size_t w = 0;
    for (int32_t k = 0; k < units; k++) {
        int a = unit_alt(p, k, variant, shape);
        const char *word = a < 0 ? p->word : p->alt[a];
        if (!p->is_text && a < 0) word = p->alt[0]; /* id prompts: the filler id */
        size_t l = strlen(word);
        if (k > 0) s[w++] = p->sep;
        memcpy(s + w, word, l);
        w += l;
    }
    s[w] = '\0';
    *out = s;
    *len = w;
    return 0;
}

size_t lt_prompt_ids(const lt_prompt *p, int32_t n, uint64_t variant, const lt_prompt_shape *shape,
                     uint32_t *ids, size_t cap)
{
    if (p->is_text) return 0;
    int32_t units = units_for(p, n);
    if ((size_t)units > cap) return 0;
    uint32_t base = (uint32_t)strtoul(p->alt[0], NULL, 10);
    for (int32_t k = 0; k < units; k++) {
        int a = unit_alt(p, k, variant, shape);
        ids[k] = base + (uint32_t)(a < 0 ? 0 : a);
    }
    return (size_t)units;
}

void lt_prompt_free(lt_prompt *p)
{
    if (!p) return;
#ifdef TANDEM_LT_HAVE_TOKENIZER
    tok_free(p->tok);
#endif
    free(p->buf);
    free(p);
}

#ifdef TANDEM_LT_HAVE_TOKENIZER

static int count_text(const lt_prompt *p, const char *text, size_t len, int32_t *count)
{
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int rc = tok_encode(p->tok, text, len, p->bos ? TOK_ADD_BOS : 0, &ids, &n_ids);
    free(ids);
    if (rc) return rc;
    *count = (int32_t)n_ids;
    return 0;
}

int lt_prompt_count(const lt_prompt *p, int32_t n, uint64_t variant, const lt_prompt_shape *shape,
                    int32_t *count)
{
    if (!p->is_text) return TD_EUNSUPPORTED;
    char *text;
    size_t len;
    int rc = lt_prompt_text(p, n, variant, shape, &text, &len);
    if (rc) return rc;
    rc = count_text(p, text, len, count);
    free(text);
    return rc;
}

/* Tokens of the words joined by spaces (with BOS as the server adds it). */
static int count_words(const lt_prompt *p, const char *const *words, int n, int32_t *count)
{
    char buf[512];
    size_t w = 0;
    for (int i = 0; i < n; i++) {
        size_t l = strlen(words[i]);
        if (w + l + 2 > sizeof(buf)) return TD_ERANGE;
        if (i > 0) buf[w++] = ' ';
        memcpy(buf + w, words[i], l);
        w += l;
    }
    return count_text(p, buf, w, count);
}

/* 1 when `a` is one token at the start of a prompt and between fillers. */
static int word_fits(const lt_prompt *p, const char *a)
{
    const char *w = p->word;
    const char *const probes[][4] = {{a, w, w, NULL}, {w, a, w, NULL}, {a, a, w, NULL}};
    for (int i = 0; i < 3; i++) {
        int32_t got;
        if (count_words(p, probes[i], 3, &got) != 0 || got != 3 + p->bos) return 0;
    }
    return 1;
}

int lt_prompt_create_text(const char *path, int32_t max_tokens, lt_prompt **out, char *err,
                          size_t errlen)
{
    /* Common English words: most vocabularies hold them (and their
     * space-prefixed forms) as single tokens that do not merge with a neighbour. */
    static const char *const words[] = {
        "the",  "hello", "and",  "of",   "to",   "a",     "in",   "is",  "it",    "you",
        "that", "he",    "was",  "for",  "on",   "are",   "with", "as",  "his",   "they",
        "be",   "at",    "one",  "have", "this", "from",  "or",   "had", "by",    "but",
        "what", "some",  "we",   "can",  "out",  "other", "were", "all", "there", "when",
        "up",   "use",   "your", "how",  "said", "an",    "each", "she", "x",     "1"};
    static const int32_t probe[] = {1, 2, 3, 5, 16, 33, 100};
    const size_t n_words = sizeof(words) / sizeof(words[0]);
    if (!path || !out) return TD_EINVAL;
    lt_prompt *p = calloc(1, sizeof(*p));
    if (!p) return TD_ENOMEM;
    p->is_text = 1;
    p->sep = ' ';
    char terr[256] = "";
    int rc = tok_load(path, &p->tok, terr, sizeof(terr));
    if (rc) {
        td_err_set(err, errlen, "tokenizer %s: %s", path, terr[0] ? terr : td_strerror(rc));
        lt_prompt_free(p);
        return rc;
    }
    p->bos = tok_adds_bos(p->tok) && tok_bos_id(p->tok) >= 0;
    int32_t want_max = max_tokens < 128 ? 128 : max_tokens;
    size_t w = 0;
    for (; w < n_words; w++) {
        /* The filler alone first: it is also the only head word until more are found. */
        rc = fill(p, words[w], 128);
        if (rc) break;
        p->n_alt = 1;
        snprintf(p->alt[0], sizeof(p->alt[0]), "%s", words[w]);
        int good = 1;
        for (size_t k = 0; k < sizeof(probe) / sizeof(probe[0]) && good; k++) {
            int32_t n = probe[k] + p->bos, got;
            if (lt_prompt_count(p, n, 0, NULL, &got) != 0 || got != n) good = 0;
        }
        if (good) break;
    }
    if (rc == 0 && w == n_words) {
        td_err_set(err, errlen, "tokenizer %s: no filler word encodes to one token per repetition",
                   path);
        rc = TD_ENOENT;
    }
    if (rc == 0) {
        /* Head words: every other candidate that stays one token next to the
         * filler and next to itself. */
        for (size_t k = 0; k < n_words && p->n_alt < LT_PROMPT_MAX_ALT; k++) {
            if (k == w || !word_fits(p, words[k])) continue;
            snprintf(p->alt[p->n_alt++], sizeof(p->alt[0]), "%s", words[k]);
        }
        rc = fill(p, words[w], want_max);
    }
    if (rc == 0) {
        /* The longest prompt, with a head using the last words, must be exact too. */
        int32_t got;
        uint64_t v = (uint64_t)p->n_alt * p->n_alt * p->n_alt - 1;
        rc = lt_prompt_count(p, want_max + p->bos, v, NULL, &got);
        if (rc == 0 && got != want_max + p->bos) {
            td_err_set(err, errlen, "tokenizer %s: a %d-token prompt encodes to %d tokens", path,
                       want_max + p->bos, got);
            rc = TD_EMISMATCH;
        }
    } else if (rc != TD_ENOENT) {
        td_err_set(err, errlen, "tokenizer %s: %s", path, td_strerror(rc));
    }
    if (rc) {
        lt_prompt_free(p);
        return rc;
    }
    *out = p;
    return 0;
}

#else

int lt_prompt_count(const lt_prompt *p, int32_t n, uint64_t variant, const lt_prompt_shape *shape,
                    int32_t *count)
{
    (void)p, (void)n, (void)variant, (void)shape, (void)count;
    return TD_EUNSUPPORTED;
}

int lt_prompt_create_text(const char *path, int32_t max_tokens, lt_prompt **out, char *err,
                          size_t errlen)
{
    (void)path, (void)max_tokens, (void)out;
    td_err_set(err, errlen, "built without the tokenizer library: --tokenizer is not available");
    return TD_EUNSUPPORTED;
}

#endif

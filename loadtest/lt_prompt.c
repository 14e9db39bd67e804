/* lt_prompt: exact-length prompts built from one repeated filler word. */
#include "loadtest/lt_prompt.h"

#include "common/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef TANDEM_LT_HAVE_TOKENIZER
#include "engine/tokenizer/tok.h"
#endif

struct lt_prompt {
    int is_text;
    char word[32];
    size_t first_len; /* bytes of the first unit ("w" or "id") */
    size_t unit_len;  /* bytes of every later unit (" w" or ",id") */
    int32_t max_units;
    int32_t bos; /* 1 when the server's encoding adds BOS */
    char *buf;   /* first unit + (max_units - 1) later units, NUL-terminated */
#ifdef TANDEM_LT_HAVE_TOKENIZER
    tok_tokenizer *tok;
#endif
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Fills p->buf with max_units units: first, then sep + first repeated. */
static int fill(lt_prompt *p, const char *first, char sep, int32_t max_units)
{
    size_t fl = strlen(first);
    if (max_units < 1) max_units = 1;
    size_t units = (size_t)max_units;
    if (units > (SIZE_MAX - fl - 1) / (fl + 1)) return TD_ERANGE;
    char *buf = malloc(fl + (units - 1) * (fl + 1) + 1);
    if (!buf) return TD_ENOMEM;
    char *w = buf;
    memcpy(w, first, fl);
    w += fl;
    for (size_t i = 1; i < units; i++) {
        *w++ = sep;
        memcpy(w, first, fl);
        w += fl;
    }
    *w = '\0';
    free(p->buf);
    p->buf = buf;
    p->first_len = fl;
    p->unit_len = fl + 1;
    p->max_units = max_units;
    snprintf(p->word, sizeof(p->word), "%s", first);
    return 0;
}

int lt_prompt_create_ids(int32_t id, int32_t max_tokens, lt_prompt **out)
{
    if (id < 0 || !out) return TD_EINVAL;
    lt_prompt *p = calloc(1, sizeof(*p));
    if (!p) return TD_ENOMEM;
    char first[16];
    snprintf(first, sizeof(first), "%d", id);
    int rc = fill(p, first, ',', max_tokens);
    if (rc) {
        free(p);
        return rc;
    }
    p->word[0] = '\0';
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

void lt_prompt_get(const lt_prompt *p, int32_t n, const char **text, size_t *len)
{
    int32_t units = p->is_text ? n - p->bos : n;
    if (units < 1) units = 1;
    if (units > p->max_units) units = p->max_units;
    *text = p->buf;
    *len = p->first_len + (size_t)(units - 1) * p->unit_len;
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

static int count_tokens(const lt_prompt *p, const char *text, size_t len, int32_t *count)
{
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int rc = tok_encode(p->tok, text, len, p->bos ? TOK_ADD_BOS : 0, &ids, &n_ids);
    free(ids);
    if (rc) return rc;
    *count = (int32_t)n_ids;
    return 0;
}

int lt_prompt_count(const lt_prompt *p, int32_t n, int32_t *count)
{
    if (!p->is_text) return TD_EUNSUPPORTED;
    const char *text;
    size_t len;
    lt_prompt_get(p, n, &text, &len);
    return count_tokens(p, text, len, count);
}

int lt_prompt_create_text(const char *path, int32_t max_tokens, lt_prompt **out, char *err,
                          size_t errlen)
{
    /* Common English words first: most vocabularies hold them (and their
     * space-prefixed forms) as single tokens that do not merge with a neighbour. */
    static const char *const words[] = {"the", "hello", "a",  "and", "of", "to", "is",
                                        "x",   "1",     "in", "it",  "on", "at"};
    static const int32_t probe[] = {1, 2, 3, 5, 16, 33, 100};
    if (!path || !out) return TD_EINVAL;
    lt_prompt *p = calloc(1, sizeof(*p));
    if (!p) return TD_ENOMEM;
    p->is_text = 1;
    char terr[256] = "";
    int rc = tok_load(path, &p->tok, terr, sizeof(terr));
    if (rc) {
        set_err(err, errlen, "tokenizer %s: %s", path, terr[0] ? terr : td_strerror(rc));
        lt_prompt_free(p);
        return rc;
    }
    p->bos = tok_adds_bos(p->tok) && tok_bos_id(p->tok) >= 0;
    int32_t want_max = max_tokens < 128 ? 128 : max_tokens;
    for (size_t w = 0; w < sizeof(words) / sizeof(words[0]); w++) {
        /* Probe on a short buffer first, then build the full one. */
        rc = fill(p, words[w], ' ', 128);
        if (rc) break;
        int good = 1;
        for (size_t k = 0; k < sizeof(probe) / sizeof(probe[0]) && good; k++) {
            int32_t n = probe[k] + p->bos, got;
            if (lt_prompt_count(p, n, &got) != 0 || got != n) good = 0;
        }
        if (!good) continue;
        rc = fill(p, words[w], ' ', want_max);
        if (rc) break;
        int32_t got;
        rc = lt_prompt_count(p, want_max + p->bos, &got);
        if (rc) break;
        if (got == want_max + p->bos) {
            *out = p;
            return 0;
        }
    }
    if (!rc) {
        set_err(err, errlen, "tokenizer %s: no filler word encodes to one token per repetition",
                path);
        rc = TD_ENOENT;
    } else {
        set_err(err, errlen, "tokenizer %s: %s", path, td_strerror(rc));
    }
    lt_prompt_free(p);
    return rc;
}

#else

int lt_prompt_count(const lt_prompt *p, int32_t n, int32_t *count)
{
    (void)p;
    (void)n;
    (void)count;
    return TD_EUNSUPPORTED;
}

int lt_prompt_create_text(const char *path, int32_t max_tokens, lt_prompt **out, char *err,
                          size_t errlen)
{
    (void)path;
    (void)max_tokens;
    (void)out;
    set_err(err, errlen, "built without the tokenizer library: --tokenizer is not available");
    return TD_EUNSUPPORTED;
}

#endif

/* oai_text: incremental detokenization with stop strings (see oai_text.h).
 *
 * The text generated so far lives in buf[0..len); buf[0..sent) has been
 * released to the caller. Invariant: every occurrence of a stop string that
 * begins before `sent` would already have been found, so a new match always
 * begins at or after `sent`, and only buf[sent..len) (at most the longest
 * stop minus one byte, plus the newest piece) needs to be searched. */
#include "router/oai_text.h"

#include <stdlib.h>
#include <string.h>

#include "common/err.h"

enum { ST_RUNNING, ST_STOPPED, ST_DONE };

struct oai_text {
    const tok_tokenizer *tok;
    tok_stream *stream;
    char **stops; /* n_stops non-empty, NUL-terminated copies */
    size_t n_stops;
    int32_t *skip; /* n_skip ids never detokenized */
    size_t n_skip;
    char *buf; /* generated text, NUL-terminated at len */
    size_t len, cap;
    size_t sent;     /* bytes released */
    size_t n_tokens; /* ids pushed while running */
    int state;
};

void oai_text_free(oai_text *t)
{
    if (t == NULL) return;
    for (size_t i = 0; i < t->n_stops; i++)
        free(t->stops[i]);
    free(t->stops);
    free(t->skip);
    free(t->buf);
    tok_stream_free(t->stream);
    free(t);
}

int oai_text_create(const tok_tokenizer *tok, const char *const *stops, size_t n_stops,
                    const int32_t *skip_ids, size_t n_skip, oai_text **out)
{
    if (tok == NULL || out == NULL || (stops == NULL && n_stops > 0) ||
        (skip_ids == NULL && n_skip > 0))
        return TD_EINVAL;
    *out = NULL;
    oai_text *t = calloc(1, sizeof(*t));
    if (t == NULL) return TD_ENOMEM;
    t->tok = tok;
    int rc = tok_stream_create(tok, &t->stream);
    if (rc < 0) goto fail;
    rc = TD_ENOMEM;
    if (n_stops > 0) {
        t->stops = calloc(n_stops, sizeof(*t->stops));
        if (t->stops == NULL) goto fail;
        for (size_t i = 0; i < n_stops; i++) {
            if (stops[i] == NULL) {
                rc = TD_EINVAL;
                goto fail;
            }
            if (stops[i][0] == '\0') continue;
            t->stops[t->n_stops] = strdup(stops[i]);
            if (t->stops[t->n_stops] == NULL) goto fail;
            t->n_stops++;
        }
    }
    if (n_skip > 0) {
        t->skip = malloc(n_skip * sizeof(*t->skip));
        if (t->skip == NULL) goto fail;
        memcpy(t->skip, skip_ids, n_skip * sizeof(*t->skip));
        t->n_skip = n_skip;
    }
    t->cap = 256;
    t->buf = malloc(t->cap);
    if (t->buf == NULL) goto fail;
    t->buf[0] = '\0';
    t->state = ST_RUNNING;
    *out = t;
    return 0;
fail:
    oai_text_free(t);
    return rc;
}

static int grow(oai_text *t)
{
    size_t cap = t->cap * 2;
    char *b = realloc(t->buf, cap);
    if (b == NULL) return TD_ENOMEM;
    t->buf = b;
    t->cap = cap;
    return 0;
}

/* After text was appended: cut at a completed stop string, or release what
 * can no longer begin one (everything when final). */
static void release(oai_text *t, bool final, const char **out, size_t *len)
{
    size_t from = t->sent;
    size_t cut;
    const char *const *stops = (const char *const *)t->stops;
    if (t->n_stops > 0 && tok_stop_find(t->buf + from, t->len - from, stops, t->n_stops, &cut)) {
        t->len = from + cut;
        t->buf[t->len] = '\0';
        t->sent = t->len;
        t->state = ST_STOPPED;
    } else {
        size_t hold =
            final ? 0 : tok_stop_holdback(t->buf + from, t->len - from, stops, t->n_stops);
        t->sent = t->len - hold;
    }
    *out = t->buf + from;
    *len = t->sent - from;
}

int oai_text_push(oai_text *t, int32_t id, const char **out, size_t *len, bool *stopped)
{
    if (t == NULL || out == NULL || len == NULL || stopped == NULL) return TD_EINVAL;
    *out = t->buf + t->sent;
    *len = 0;
    *stopped = t->state == ST_STOPPED;
    if (t->state != ST_RUNNING) return 0;
    if (id < 0 || id >= tok_vocab_size(t->tok)) return TD_ERANGE;
    for (size_t i = 0; i < t->n_skip; i++) {
        if (t->skip[i] == id) {
            t->n_tokens++;
            return 0;
        }
    }
    size_t w = 0;
    for (;;) {
        int rc = tok_stream_push(t->stream, id, t->buf + t->len, t->cap - t->len, &w);
        if (rc == 0) break;
        if (rc != TD_ERANGE) return rc;
        if ((rc = grow(t)) < 0) return rc; /* nothing was consumed: retry */
    }
    t->n_tokens++;
    t->len += w;
    release(t, false, out, len);
    *stopped = t->state == ST_STOPPED;
    return 0;
}

int oai_text_finish(oai_text *t, const char **out, size_t *len)
{
    if (t == NULL || out == NULL || len == NULL) return TD_EINVAL;
    *out = t->buf + t->sent;
    *len = 0;
    if (t->state == ST_RUNNING) {
        size_t w = 0;
        for (;;) {
            int rc = tok_stream_flush(t->stream, t->buf + t->len, t->cap - t->len, &w);
            if (rc == 0) break;
            if (rc != TD_ERANGE) return rc;
            if ((rc = grow(t)) < 0) return rc;
        }
        t->len += w;
        release(t, true, out, len);
    }
    t->state = ST_DONE;
    return 0;
}

const char *oai_text_all(const oai_text *t, size_t *len)
{
    if (len) *len = t ? t->sent : 0;
    if (t == NULL) return "";
    return t->buf; /* held text may follow buf[sent] until stopped or finished */
}

size_t oai_text_tokens(const oai_text *t)
{
    return t ? t->n_tokens : 0;
}

/* lt_sse: the load tester's parser of an OpenAI-style completion stream
 * (Server-Sent Events), fed the HTTP body bytes as they arrive.
 *
 * Counts what the load test measures: each `data:` event whose first choice
 * carries non-empty text (completions "text" or chat "delta.content") calls
 * on_text; `data: [DONE]` sets done_seen; usage.completion_tokens, when
 * present, goes to usage_tokens. The first problem (data that is not JSON, an
 * "error" event, a line longer than LT_SSE_MAX_LINE) is kept in err and
 * parsing goes on. Lines end in "\n" or "\r\n"; "event:", "id:", "retry:" and
 * ":" comment lines are ignored.
 */
#ifndef TANDEM_LOADTEST_LT_SSE_H
#define TANDEM_LOADTEST_LT_SSE_H

#include <stddef.h>
#include <stdint.h>

#define LT_SSE_MAX_LINE (1 << 20) /* bytes; a longer line is a protocol error */

typedef struct lt_sse {
    void (*on_text)(void *arg); /* a text chunk arrived (may be NULL) */
    void *arg;
    int done_seen;        /* data: [DONE] arrived */
    int32_t usage_tokens; /* usage.completion_tokens, -1 when absent */
    char err[96];         /* first error, "" when none */
    char *line;           /* line being assembled (owned) */
    size_t line_len, line_cap;
} lt_sse;

/* Zeroes s and sets the callback; arg is passed back to on_text, not owned. */
void lt_sse_init(lt_sse *s, void (*on_text)(void *arg), void *arg);
/* Starts a new response (keeps the line buffer). */
void lt_sse_reset(lt_sse *s);
/* Parses len more body bytes; any split of the body gives the same result. */
void lt_sse_feed(lt_sse *s, const char *p, size_t len);
/* The body ended: parses a last line that had no newline. */
void lt_sse_end(lt_sse *s);
/* Frees the line buffer; s may be reused after lt_sse_init. NULL is fine. */
void lt_sse_free(lt_sse *s);

#endif

/* fuzz_lt_sse: the load tester's response parsing, loadtest/lt_sse.c on
 * arbitrary bytes, alone and behind http_parser as lt_replay.c drives it.
 *
 * Input: one control byte, then the bytes. Control bit 0: 0 = an SSE body,
 * 1 = a whole HTTP response (the body of a 200 goes to the SSE parser, as in
 * lt_replay.c). Bits 1-7: the size of the pieces the bytes are fed in (0:
 * all at once). Oracle: any split of the body gives the same result as one
 * piece. */
#include <http_parser.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "loadtest/lt_sse.h"
#include "tests/fuzz/fuzz_util.h"

struct result {
    lt_sse sse;
    int n_text;
    int status;
    int complete;
};

static void on_text(void *arg)
{
    ((struct result *)arg)->n_text++;
}

static int on_body(http_parser *hp, const char *at, size_t len)
{
    struct result *r = hp->data;
    if (hp->status_code == 200) lt_sse_feed(&r->sse, at, len);
    return 0;
}

static int on_headers_complete(http_parser *hp)
{
    ((struct result *)hp->data)->status = hp->status_code;
    return 0;
}

static int on_message_complete(http_parser *hp)
{
    ((struct result *)hp->data)->complete = 1;
    http_parser_pause(hp, 1);
    return 0;
}

static void run(const uint8_t *p, size_t n, int http, size_t piece, struct result *r)
{
    memset(r, 0, sizeof(*r));
    lt_sse_init(&r->sse, on_text, r);
    http_parser_settings st;
    http_parser_settings_init(&st);
    st.on_body = on_body;
    st.on_headers_complete = on_headers_complete;
    st.on_message_complete = on_message_complete;
    http_parser hp;
    http_parser_init(&hp, HTTP_RESPONSE);
    hp.data = r;
    for (size_t off = 0; off < n;) {
        size_t k = piece && piece < n - off ? piece : n - off;
        if (http) {
            size_t used = http_parser_execute(&hp, &st, (const char *)p + off, k);
            if (r->complete || HTTP_PARSER_ERRNO(&hp) != HPE_OK || used != k) break;
        } else {
            lt_sse_feed(&r->sse, (const char *)p + off, k);
        }
        off += k;
    }
    if (!http || r->complete) lt_sse_end(&r->sse);
    lt_sse_free(&r->sse);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    if (size < 1) return 0;
    int http = data[0] & 1;
    size_t piece = data[0] >> 1;
    struct result a, b;
    run(data + 1, size - 1, http, 0, &a);
    run(data + 1, size - 1, http, piece, &b);
    if (http && a.complete != b.complete) return 0; /* http_parser's business, not ours */
    if (a.n_text != b.n_text || a.sse.done_seen != b.sse.done_seen ||
        a.sse.usage_tokens != b.sse.usage_tokens || strcmp(a.sse.err, b.sse.err) != 0) {
        fprintf(stderr,
                "split into %zu-byte pieces changes the result: text %d/%d done %d/%d "
                "usage %d/%d err \"%s\"/\"%s\"\n",
                piece, a.n_text, b.n_text, a.sse.done_seen, b.sse.done_seen,
                (int)a.sse.usage_tokens, (int)b.sse.usage_tokens, a.sse.err, b.sse.err);
        abort();
    }
    return 0;
}

/* lt_sse: the load tester's SSE completion stream parser. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "loadtest/lt_sse.h"

static void count_text(void *arg)
{
    (*(int *)arg)++;
}

/* Feeds body in pieces of `piece` bytes (0: whole), then ends it. */
static void feed(lt_sse *s, const char *body, size_t piece)
{
    size_t n = strlen(body);
    for (size_t off = 0; off < n;) {
        size_t k = piece && piece < n - off ? piece : n - off;
        lt_sse_feed(s, body + off, k);
        off += k;
    }
    lt_sse_end(s);
}

static void t_stream(void **state)
{
    (void)state;
    const char *body =
        "data: {\"choices\":[{\"text\":\"Hel\"}]}\n\n"
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\n"
        ": comment\nevent: x\nid: 3\n"
        "data: {\"choices\":[{\"text\":\"\"}],\"usage\":{\"completion_tokens\":7}}\n\n"
        "data:[DONE]";
    for (size_t piece = 0; piece < 9; piece++) {
        int n = 0;
        lt_sse s;
        lt_sse_init(&s, count_text, &n);
        feed(&s, body, piece);
        assert_int_equal(n, 2); /* the empty text is not a chunk */
        assert_int_equal(s.usage_tokens, 7);
        assert_true(s.done_seen); /* the last line had no newline */
        assert_string_equal(s.err, "");
        lt_sse_free(&s);
    }
}

static void t_errors(void **state)
{
    (void)state;
    int n = 0;
    lt_sse s;
    lt_sse_init(&s, count_text, &n);
    /* a short data line that is not JSON, assembled from pieces: the message
     * quotes exactly its bytes */
    feed(&s, "data: x\n\ndata: {\"error\": {\"message\": \"overloaded\"}}\n", 1);
    assert_string_equal(s.err, "SSE data is not JSON: x");
    assert_false(s.done_seen);
    assert_int_equal(s.usage_tokens, -1);
    /* the first error is kept; a reset starts a new response */
    lt_sse_reset(&s);
    feed(&s, "data: {\"error\": {\"message\": \"overloaded\"}}\n", 0);
    assert_string_equal(s.err, "error event: overloaded");
    lt_sse_reset(&s);
    feed(&s, "data: {\"error\": \"busy\"}\ndata: [DONE]\n", 3);
    assert_string_equal(s.err, "error event: busy");
    assert_true(s.done_seen);
    assert_int_equal(n, 0);
    lt_sse_free(&s);
    lt_sse_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_stream),
        cmocka_unit_test(t_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Unit tests for loadtest/lt_trace: the BurstGPT (both schemas), Azure and
 * Mooncake readers, malformed rows, filters and time scaling. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "loadtest/lt_trace.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int read_text(const char *text, enum lt_format fmt, const lt_read_opts *o, lt_trace *tr,
                     char *err, size_t errlen)
{
    FILE *fp = fmemopen((void *)text, strlen(text), "r");
    assert_non_null(fp);
    lt_trace_init(tr);
    int rc = lt_trace_read_stream(fp, fmt, o, tr, err, errlen);
    fclose(fp);
    return rc;
}

static const char k_burst6[] =
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n"
    "45,ChatGPT,1087,230,1317,Conversation log\n"
    "118,GPT-4,417,276,693,Conversation log\n"
    "120,ChatGPT,100,0,100,Conversation log\n"
    "185,ChatGPT,1360,647,2007,API log\n";

static void test_burstgpt_6col(void **state)
{
    (void)state;
    lt_trace tr;
    char err[256] = "";
    assert_int_equal(read_text(k_burst6, LT_FMT_BURSTGPT, NULL, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.rows, 5);
    assert_int_equal(tr.n, 4);
    assert_int_equal(tr.failed, 1); /* 0 response tokens: skipped and counted */
    assert_int_equal(tr.reqs[0].t_ns, 0);
    assert_int_equal(tr.reqs[1].t_ns, 40 * TD_NS_PER_S);
    assert_int_equal(tr.reqs[3].t_ns, 180 * TD_NS_PER_S);
    assert_int_equal(tr.reqs[2].input_tokens, 417);
    assert_int_equal(tr.reqs[2].output_tokens, 276);
    assert_int_equal(tr.reqs[2].line, 4);
    assert_true(tr.src_span_s == 180.0);
    lt_trace_free(&tr);

    lt_read_opts o = {.keep_failed = 1};
    assert_int_equal(read_text(k_burst6, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 5);
    assert_int_equal(tr.failed, 0);
    lt_trace_free(&tr);
}

static void test_burstgpt_8col(void **state)
{
    (void)state;
    static const char text[] =
        "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,"
        "Log Type\r\n"
        "10.5,abc,1.25,GPT-4,12,34,46,Conversation log\r\n"
        "11,abc,2.5,GPT-4,56,78,134,Conversation log\r\n"
        "\r\n"
        "12,\"x,y\",3,ChatGPT,9,10,19,API log\r\n";
    lt_trace tr;
    char err[256] = "";
    assert_int_equal(read_text(text, LT_FMT_BURSTGPT, NULL, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 3);
    assert_int_equal(tr.reqs[0].input_tokens, 12);
    assert_int_equal(tr.reqs[0].output_tokens, 34);
    assert_int_equal(tr.reqs[1].t_ns, 500 * TD_NS_PER_MS);
    assert_int_equal(tr.reqs[2].input_tokens, 9);
    assert_int_equal(tr.reqs[2].line, 5);
    lt_trace_free(&tr);
}

static void test_filters(void **state)
{
    (void)state;
    lt_trace tr;
    char err[256] = "";
    lt_read_opts o = {.model = "ChatGPT"};
    assert_int_equal(read_text(k_burst6, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 3);
    assert_int_equal(tr.filtered, 1);
    assert_int_equal(tr.failed, 1);
    lt_trace_free(&tr);

    o = (lt_read_opts){.log_type = "API log"};
    assert_int_equal(read_text(k_burst6, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 1);
    assert_int_equal(tr.reqs[0].input_tokens, 1360);
    lt_trace_free(&tr);

    /* Window [40 s, 150 s) after the first row (t = 5): rows at 45 and 118. */
    o = (lt_read_opts){.start_s = 40, .end_s = 150};
    assert_int_equal(read_text(k_burst6, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 2);
    assert_int_equal(tr.reqs[0].input_tokens, 1087);
    assert_int_equal(tr.reqs[1].t_ns, 73 * TD_NS_PER_S); /* re-based to the first kept */
    lt_trace_free(&tr);

    o = (lt_read_opts){.max_requests = 2};
    assert_int_equal(read_text(k_burst6, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 2);
    assert_int_equal(tr.filtered, 2);
    lt_trace_free(&tr);
}

static void test_malformed_rows(void **state)
{
    (void)state;
    static const char text[] =
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "6,ChatGPT,abc,18,490,Conversation log\n"
        "7,ChatGPT,1,2,3\n"
        "x,ChatGPT,1,2,3,Conversation log\n"
        "9,ChatGPT,-4,2,3,Conversation log\n"
        "10,ChatGPT,4,2,6,Conversation log\n";
    lt_trace tr;
    char err[256] = "";
    assert_int_equal(read_text(text, LT_FMT_BURSTGPT, NULL, &tr, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "line 3"));
    assert_non_null(strstr(err, "Request tokens"));
    assert_int_equal(tr.n, 0);
    assert_null(tr.reqs);

    lt_read_opts o = {.skip_bad = 1};
    assert_int_equal(read_text(text, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.bad, 4);
    assert_int_equal(tr.n, 2);
    assert_int_equal(tr.reqs[1].t_ns, 5 * TD_NS_PER_S);
    lt_trace_free(&tr);

    /* Column count error names the line too. */
    static const char cols[] =
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "7,ChatGPT,1,2,3\n";
    assert_int_equal(read_text(cols, LT_FMT_BURSTGPT, NULL, &tr, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "line 3: expected 6 columns, found 5"));

    assert_int_equal(read_text("a,b,c\n1,2,3\n", LT_FMT_BURSTGPT, NULL, &tr, err, sizeof(err)),
                     TD_EFORMAT);
    assert_non_null(strstr(err, "line 1"));
    assert_int_equal(read_text("", LT_FMT_AZURE, NULL, &tr, err, sizeof(err)), TD_EFORMAT);
}

/* Lines are capped at LT_TRACE_MAX_LINE bytes: a longer one is an error
 * naming it (or a skipped bad row), read with bounded memory; files that are
 * not regular files are refused. */
static void test_long_lines_and_devices(void **state)
{
    (void)state;
    static const char head[] =
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n";
    static const char tail[] = "\n9,ChatGPT,4,2,6,Conversation log\n";
    size_t big = LT_TRACE_MAX_LINE + 10;
    char *text = malloc(sizeof(head) + big + sizeof(tail));
    assert_non_null(text);
    strcpy(text, head);
    memset(text + strlen(head), 'x', big);
    strcpy(text + strlen(head) + big, tail);
    lt_trace tr;
    char err[256] = "";
    assert_int_equal(read_text(text, LT_FMT_BURSTGPT, NULL, &tr, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "line 3: longer than 1048576 bytes"));
    lt_read_opts o = {.skip_bad = 1};
    assert_int_equal(read_text(text, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.bad, 1);
    assert_int_equal(tr.n, 2); /* the rows before and after it */
    lt_trace_free(&tr);
    /* a line exactly at the cap is fine (Mooncake: JSON padded with spaces) */
    static const char obj[] = "{\"timestamp\": 0, \"input_length\": 3, \"output_length\": 4}";
    memset(text, ' ', LT_TRACE_MAX_LINE);
    memcpy(text, obj, strlen(obj));
    text[LT_TRACE_MAX_LINE - 1] = '\n';
    text[LT_TRACE_MAX_LINE] = '\0';
    assert_int_equal(read_text(text, LT_FMT_MOONCAKE, NULL, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 1);
    lt_trace_free(&tr);
    /* megabytes of NUL bytes and no newline (as /dev/zero) */
    memset(text, 0, LT_TRACE_MAX_LINE + 10);
    FILE *fp = fmemopen(text, LT_TRACE_MAX_LINE + 10, "r");
    assert_non_null(fp);
    lt_trace_init(&tr);
    assert_int_equal(lt_trace_read_stream(fp, LT_FMT_AZURE, NULL, &tr, err, sizeof(err)),
                     TD_EFORMAT);
    assert_non_null(strstr(err, "line 1: longer than"));
    fclose(fp);
    free(text);
    lt_trace_init(&tr);
    assert_int_equal(lt_trace_read("/dev/zero", LT_FMT_AZURE, NULL, &tr, err, sizeof(err)),
                     TD_EINVAL);
    assert_non_null(strstr(err, "/dev/zero: not a regular file"));
    assert_int_equal(lt_trace_read("/tmp", LT_FMT_AZURE, NULL, &tr, err, sizeof(err)), TD_EINVAL);
}

static void test_azure(void **state)
{
    (void)state;
    static const char text[] = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                               "2023-11-16 18:15:46.6805900,374,44\n"
                               "2023-11-16 18:15:50.9951690,396,109\n"
                               "2023-11-16 18:16:00.0000000,879,0\n"
                               "2023-11-17 00:00:00,10,20\n";
    lt_trace tr;
    char err[256] = "";
    assert_int_equal(read_text(text, LT_FMT_AZURE, NULL, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 3);
    assert_int_equal(tr.failed, 1);
    assert_int_equal(tr.reqs[0].input_tokens, 374);
    assert_int_equal(tr.reqs[1].t_ns, 4314579000LL);
    /* 18:15:46.68059 -> midnight: 20653.31941 s */
    assert_int_equal(tr.reqs[2].t_ns, 20653319410000LL);
    lt_trace_free(&tr);

    int64_t ns;
    assert_int_equal(lt_parse_datetime("1970-01-02 00:00:01.5", &ns), 0);
    assert_int_equal(ns, 86401500000000LL);
    assert_int_equal(lt_parse_datetime("2024-02-29T12:00:00Z", &ns), 0);
    assert_int_equal(ns, 1709208000LL * TD_NS_PER_S);
    assert_int_equal(lt_parse_datetime("2023-13-01 00:00:00", &ns), TD_EFORMAT);
    assert_int_equal(lt_parse_datetime("2023-11-16", &ns), TD_EFORMAT);
    assert_int_equal(lt_parse_datetime("9999-01-01 00:00:00", &ns), TD_EFORMAT);
    assert_int_equal(lt_parse_datetime("2023-11-16 18:15:46.", &ns), TD_EFORMAT);

    static const char bad[] = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                              "2023-11-16 18:15:46.6805900,374,44\n"
                              "yesterday,1,2\n";
    assert_int_equal(read_text(bad, LT_FMT_AZURE, NULL, &tr, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "line 3: TIMESTAMP"));
}

static void test_mooncake(void **state)
{
    (void)state;
    static const char text[] =
        "{\"timestamp\": 0, \"input_length\": 6955, \"output_length\": 52, \"hash_ids\": [0,1,2]}\n"
        "{\"timestamp\": 2500, \"input_length\": 100, \"output_length\": 7, \"hash_ids\": []}\n"
        "{\"timestamp\": 1000, \"input_length\": 5, \"output_length\": 6}\n";
    lt_trace tr;
    char err[256] = "";
    assert_int_equal(read_text(text, LT_FMT_MOONCAKE, NULL, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 3);
    assert_int_equal(tr.unsorted, 1);
    assert_int_equal(tr.reqs[1].t_ns, 1000 * TD_NS_PER_MS); /* sorted */
    assert_int_equal(tr.reqs[1].line, 3);
    assert_int_equal(tr.reqs[2].input_tokens, 100);
    lt_trace_free(&tr);

    static const char bad[] =
        "{\"timestamp\": 0, \"input_length\": 6955, \"output_length\": 52}\n"
        "{\"timestamp\": 5, \"input_length\": 1.5, \"output_length\": 52}\n"
        "{\"timestamp\": 6, \"input_length\": 1, \"output_length\": 52, \"hash_ids\": 3}\n"
        "not json\n";
    assert_int_equal(read_text(bad, LT_FMT_MOONCAKE, NULL, &tr, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "line 2: input_length"));
    lt_read_opts o = {.skip_bad = 1};
    assert_int_equal(read_text(bad, LT_FMT_MOONCAKE, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.bad, 3);
    assert_int_equal(tr.n, 1);
    lt_trace_free(&tr);
}

/* Scale, then the clips, then the context fit, each counted. */
static void test_fit_lengths(void **state)
{
    (void)state;
    static const struct {
        int32_t in, out;
    } cases[] = {{1000, 200}, {300, 40}, {1, 1}, {3, 0}, {400, 900}};
    const size_t n = sizeof(cases) / sizeof(cases[0]);
    lt_trace tr;
    lt_trace_init(&tr);
    for (size_t i = 0; i < n; i++) {
        lt_req q = {.t_ns = (int64_t)i, .input_tokens = cases[i].in, .output_tokens = cases[i].out};
        assert_int_equal(lt_trace_push(&tr, &q), 0);
    }
    lt_lengths o = {.scale = 0.5, .max_prompt = 256, .max_output = 64, .max_context = 300};
    lt_lengths_stats st;
    assert_int_equal(lt_trace_fit_lengths(&tr, &o, &st), 0);
    /* 0: 500 -> 256 (clipped), 100 -> 64 (clipped): 320 > 300, fit: 256 * 300 / 320 = 240,
     *    64 * 300 / 320 = 60.
     * 1: 150 + 20.  2: 1 + 1 (0.5 rounds to 0, raised to 1).  3: 2 + 0.
     * 4: 200 + 450 -> 200 + 64. */
    assert_int_equal(tr.reqs[0].input_tokens, 240);
    assert_int_equal(tr.reqs[0].output_tokens, 60);
    assert_int_equal(tr.reqs[1].input_tokens, 150);
    assert_int_equal(tr.reqs[1].output_tokens, 20);
    assert_int_equal(tr.reqs[2].input_tokens, 1);
    assert_int_equal(tr.reqs[2].output_tokens, 1);
    assert_int_equal(tr.reqs[3].input_tokens, 2);
    assert_int_equal(tr.reqs[3].output_tokens, 0);
    assert_int_equal(tr.reqs[4].input_tokens, 200);
    assert_int_equal(tr.reqs[4].output_tokens, 64);
    assert_int_equal(st.scaled, 4); /* case 2 unchanged: 1 + 1 */
    assert_int_equal(st.prompt_clipped, 1);
    assert_int_equal(st.output_clipped, 2);
    assert_int_equal(st.context_fitted, 1);
    /* Off: nothing changes. */
    lt_lengths off = {0};
    assert_int_equal(lt_trace_fit_lengths(&tr, &off, &st), 0);
    assert_int_equal(st.scaled + st.prompt_clipped + st.output_clipped + st.context_fitted, 0);
    assert_int_equal(tr.reqs[0].input_tokens, 240);
    /* Bad options leave the trace alone. */
    lt_lengths bad = {.scale = -1};
    assert_int_equal(lt_trace_fit_lengths(&tr, &bad, NULL), TD_EINVAL);
    bad = (lt_lengths){.scale = NAN};
    assert_int_equal(lt_trace_fit_lengths(&tr, &bad, NULL), TD_EINVAL);
    bad = (lt_lengths){.max_context = 1};
    assert_int_equal(lt_trace_fit_lengths(&tr, &bad, NULL), TD_EINVAL);
    assert_int_equal(tr.reqs[0].input_tokens, 240);
    /* Scaling up, capped at INT32_MAX. */
    tr.reqs[1].input_tokens = INT32_MAX / 2 + 10;
    lt_lengths up = {.scale = 4};
    assert_int_equal(lt_trace_fit_lengths(&tr, &up, NULL), 0);
    assert_int_equal(tr.reqs[1].input_tokens, INT32_MAX);
    assert_int_equal(tr.reqs[2].input_tokens, 4);
    lt_trace_free(&tr);
}

static void test_mooncake_hash_ids(void **state)
{
    (void)state;
    static const char text[] =
        "{\"timestamp\": 30, \"input_length\": 1100, \"output_length\": 5, \"hash_ids\": [0, 1, "
        "9]}\n"
        "{\"timestamp\": 10, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [0, 4]}\n"
        "{\"timestamp\": 20, \"input_length\": 10, \"output_length\": 0, \"hash_ids\": [3]}\n"
        "{\"timestamp\": 40, \"input_length\": 10, \"output_length\": 2}\n";
    lt_trace tr;
    char err[256] = "";
    assert_int_equal(read_text(text, LT_FMT_MOONCAKE, NULL, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 3);
    assert_int_equal(tr.failed, 1);
    assert_int_equal(tr.n_hashes, 5); /* the failed row's ids are not kept */
    /* Sorted by time; each request still points at its own ids. */
    assert_int_equal(tr.reqs[0].n_hash, 2);
    assert_int_equal(tr.hashes[tr.reqs[0].hash_off + 1], 4);
    assert_int_equal(tr.reqs[1].n_hash, 3);
    assert_int_equal(tr.hashes[tr.reqs[1].hash_off + 2], 9);
    assert_int_equal(tr.reqs[2].n_hash, 0);

    char buf[1024];
    FILE *fp = fmemopen(buf, sizeof(buf), "w");
    assert_int_equal(lt_trace_write_jsonl(&tr, fp), 0);
    fclose(fp);
    assert_non_null(strstr(buf, "\"hash_ids\": [0, 1, 9]"));
    lt_trace back;
    assert_int_equal(read_text(buf, LT_FMT_MOONCAKE, NULL, &back, err, sizeof(err)), 0);
    assert_int_equal(back.n_hashes, 5);
    assert_int_equal(back.hashes[back.reqs[1].hash_off], 0);
    lt_trace_free(&back);
    lt_trace_free(&tr);

    /* The window counts from the earliest row, not the first line: [15 ms, 35 ms). */
    lt_read_opts o = {.start_s = 0.005, .end_s = 0.025};
    assert_int_equal(read_text(text, LT_FMT_MOONCAKE, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 1);
    assert_int_equal(tr.reqs[0].input_tokens, 1100);
    assert_int_equal(tr.filtered, 2);
    lt_trace_free(&tr);

    static const char bad[] =
        "{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1, -2]}\n";
    assert_int_equal(read_text(bad, LT_FMT_MOONCAKE, NULL, &tr, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "line 1: hash_ids"));
    static const char bad2[] =
        "{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [\"a\"]}\n";
    assert_int_equal(read_text(bad2, LT_FMT_MOONCAKE, NULL, &tr, err, sizeof(err)), TD_EFORMAT);
}

static void test_scaling(void **state)
{
    (void)state;
    lt_trace tr;
    lt_trace_init(&tr);
    for (int i = 0; i < 11; i++) {
        lt_req q = {.t_ns = i * 2 * TD_NS_PER_S, .input_tokens = 1, .output_tokens = 1};
        assert_int_equal(lt_trace_push(&tr, &q), 0);
    }
    assert_true(lt_trace_mean_rate(&tr) == 0.5);
    assert_int_equal(lt_trace_speedup(&tr, 4), 0);
    assert_int_equal(tr.reqs[10].t_ns, 5 * TD_NS_PER_S);
    assert_int_equal(lt_trace_scale_to_rate(&tr, 100), 0);
    assert_int_equal(tr.reqs[10].t_ns, 100 * TD_NS_PER_MS);
    assert_true(lt_trace_mean_rate(&tr) > 99.999 && lt_trace_mean_rate(&tr) < 100.001);
    assert_int_equal(lt_trace_speedup(&tr, 0), TD_EINVAL);
    assert_int_equal(lt_trace_scale_to_rate(&tr, -1), TD_EINVAL);
    lt_trace_free(&tr);
}

/* --max-context: longer requests shrink proportionally, each side at least 1;
 * requests that fit, arrival times and hash ids are untouched. */
static void test_fit_context(void **state)
{
    (void)state;
    static const struct {
        int32_t in, out;           /* as read */
        int32_t want_in, want_out; /* after fitting into 512 */
    } cases[] = {
        {100, 50, 100, 50},     /* fits */
        {462, 50, 462, 50},     /* exactly 512 */
        {1087, 230, 422, 89},   /* 1087 * 512 / 1317 = 422.6, 230 * 512 / 1317 = 89.4 */
        {1360, 647, 346, 165},  /* BurstGPT rows */
        {1024, 1024, 256, 256}, /* halves */
        {100000, 1, 511, 1},    /* output raised to 1 */
        {1, 100000, 1, 511},    /* prompt raised to 1 */
        {0, 600, 1, 511},       /* a prompt of 0 is sent as 1 token */
        {0, 511, 0, 511},       /* ... so 1 + 511 fits */
        {700, 0, 512, 0},       /* failed row kept: output stays 0 */
        {INT32_MAX, INT32_MAX, 256, 256},
    };
    const size_t n = sizeof(cases) / sizeof(cases[0]);
    lt_trace tr;
    lt_trace_init(&tr);
    for (size_t i = 0; i < n; i++) {
        lt_req q = {.t_ns = (int64_t)i * TD_NS_PER_S,
                    .input_tokens = cases[i].in,
                    .output_tokens = cases[i].out,
                    .line = (int64_t)i + 2,
                    .hash_off = i,
                    .n_hash = 3};
        assert_int_equal(lt_trace_push(&tr, &q), 0);
    }
    size_t scaled = 99;
    assert_int_equal(lt_trace_fit_context(&tr, 512, &scaled), 0);
    assert_int_equal(scaled, 8);
    for (size_t i = 0; i < n; i++) {
        const lt_req *q = &tr.reqs[i];
        assert_int_equal(q->input_tokens, cases[i].want_in);
        assert_int_equal(q->output_tokens, cases[i].want_out);
        int32_t sent_in = q->input_tokens > 0 ? q->input_tokens : 1;
        assert_true(sent_in + q->output_tokens <= 512);
        assert_int_equal(q->t_ns, (int64_t)i * TD_NS_PER_S);
        assert_int_equal(q->line, (int64_t)i + 2);
        assert_int_equal(q->hash_off, i);
        assert_int_equal(q->n_hash, 3);
    }
    /* Idempotent: a fitted trace fits. */
    assert_int_equal(lt_trace_fit_context(&tr, 512, &scaled), 0);
    assert_int_equal(scaled, 0);
    /* The smallest context: one prompt and one output token. */
    assert_int_equal(lt_trace_fit_context(&tr, 2, NULL), 0);
    for (size_t i = 0; i < n; i++) {
        int32_t sent_in = tr.reqs[i].input_tokens > 0 ? tr.reqs[i].input_tokens : 1;
        assert_true(sent_in >= 1 && sent_in + tr.reqs[i].output_tokens <= 2);
        if (cases[i].out > 0) assert_int_equal(tr.reqs[i].output_tokens, 1);
    }
    assert_int_equal(lt_trace_fit_context(&tr, 1, &scaled), TD_EINVAL);
    assert_int_equal(scaled, 0);
    assert_int_equal(lt_trace_fit_context(&tr, 0, NULL), TD_EINVAL);
    assert_int_equal(lt_trace_fit_context(&tr, -5, NULL), TD_EINVAL);
    lt_trace_free(&tr);

    /* An empty trace is fine. */
    lt_trace_init(&tr);
    assert_int_equal(lt_trace_fit_context(&tr, 64, &scaled), 0);
    assert_int_equal(scaled, 0);
    lt_trace_free(&tr);
}

static void test_real_burstgpt_head(void **state)
{
    (void)state;
    const char *dir = getenv("TANDEM_SHARED_DIR");
    char path[1024];
    snprintf(path, sizeof(path), "%s/data/burstgpt/BurstGPT_1_head.csv",
             dir ? dir : TANDEM_SHARED_DIR);
    FILE *probe = fopen(path, "r");
    if (!probe) {
        print_message("skip: %s not present\n", path);
        skip();
    }
    fclose(probe);
    lt_trace tr;
    lt_trace_init(&tr);
    char err[256] = "";
    assert_int_equal(lt_trace_read(path, LT_FMT_BURSTGPT, NULL, &tr, err, sizeof(err)), 0);
    /* The data README: 400 rows, 17 failures, 320 ChatGPT, 80 GPT-4, 2 API log. */
    assert_int_equal(tr.rows, 400);
    assert_int_equal(tr.failed, 17);
    assert_int_equal(tr.n, 383);
    assert_int_equal(tr.unsorted, 0);
    lt_trace_free(&tr);

    lt_read_opts o = {.model = "GPT-4", .keep_failed = 1};
    lt_trace_init(&tr);
    assert_int_equal(lt_trace_read(path, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 80);
    lt_trace_free(&tr);
    o = (lt_read_opts){.log_type = "API log", .keep_failed = 1};
    lt_trace_init(&tr);
    assert_int_equal(lt_trace_read(path, LT_FMT_BURSTGPT, &o, &tr, err, sizeof(err)), 0);
    assert_int_equal(tr.n, 2);
    lt_trace_free(&tr);

    lt_trace_init(&tr);
    assert_int_equal(
        lt_trace_read("/nonexistent/x.csv", LT_FMT_BURSTGPT, NULL, &tr, err, sizeof(err)),
        TD_ENOENT);
}

static void test_write_jsonl_roundtrip(void **state)
{
    (void)state;
    lt_trace tr, back;
    lt_trace_init(&tr);
    lt_req a = {.t_ns = 0, .input_tokens = 5, .output_tokens = 6};
    lt_req b = {.t_ns = 1500 * TD_NS_PER_MS, .input_tokens = 7, .output_tokens = 8};
    assert_int_equal(lt_trace_push(&tr, &a), 0);
    assert_int_equal(lt_trace_push(&tr, &b), 0);
    char buf[512];
    FILE *fp = fmemopen(buf, sizeof(buf), "w");
    assert_int_equal(lt_trace_write_jsonl(&tr, fp), 0);
    fclose(fp);
    char err[128];
    assert_int_equal(read_text(buf, LT_FMT_MOONCAKE, NULL, &back, err, sizeof(err)), 0);
    assert_int_equal(back.n, 2);
    assert_int_equal(back.reqs[1].t_ns, b.t_ns);
    assert_int_equal(back.reqs[1].output_tokens, 8);
    lt_trace_free(&back);
    lt_trace_free(&tr);
}

/* Random bytes and mutated rows: every reader either fails cleanly with a line
 * number or, under skip_bad, accounts for every row. */
static void test_readers_survive_garbage(void **state)
{
    (void)state;
    static const char *const seeds[] = {
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n",
        "{\"timestamp\": 1, \"input_length\": 2, \"output_length\": 3}\n"};
    static const char alphabet[] = "0123456789,.-: \"{}[]\n\rTxa\xff";
    uint64_t x = 88172645463325252ULL;
    char buf[600];
    for (int iter = 0; iter < 3000; iter++) {
        int fmt = iter % 3;
        size_t base = strlen(seeds[fmt]);
        memcpy(buf, seeds[fmt], base);
        size_t len = base;
        /* Append up to 200 random bytes of row-like text, then mutate a few bytes. */
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t extra = x % 200;
        for (size_t i = 0; i < extra; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            buf[len++] = alphabet[x % (sizeof(alphabet) - 1)];
        }
        for (int m = 0; m < 3; m++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            buf[(x >> 8) % len] = alphabet[x % (sizeof(alphabet) - 1)];
        }
        buf[len] = '\0';
        lt_trace tr;
        char err[256] = "";
        lt_read_opts o = {.skip_bad = iter & 4 ? 1 : 0, .keep_failed = 1};
        int rc = read_text(buf, (enum lt_format)fmt, &o, &tr, err, sizeof(err));
        if (rc) {
            assert_int_equal(rc, TD_EFORMAT);
            assert_non_null(strstr(err, "line "));
            assert_int_equal(tr.n, 0);
        } else {
            assert_int_equal(tr.n + tr.filtered, tr.rows);
            for (size_t i = 1; i < tr.n; i++)
                assert_true(tr.reqs[i].t_ns >= tr.reqs[i - 1].t_ns);
        }
        lt_trace_free(&tr);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_burstgpt_6col),
        cmocka_unit_test(test_burstgpt_8col),
        cmocka_unit_test(test_filters),
        cmocka_unit_test(test_malformed_rows),
        cmocka_unit_test(test_long_lines_and_devices),
        cmocka_unit_test(test_azure),
        cmocka_unit_test(test_mooncake),
        cmocka_unit_test(test_scaling),
        cmocka_unit_test(test_fit_context),
        cmocka_unit_test(test_fit_lengths),
        cmocka_unit_test(test_mooncake_hash_ids),
        cmocka_unit_test(test_real_burstgpt_head),
        cmocka_unit_test(test_write_jsonl_roundtrip),
        cmocka_unit_test(test_readers_survive_garbage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Tests for router/oai and router/oai_text: request validation (bad inputs
 * with their status, param and OpenAI error shape; every accepted form of
 * every field), chat templates, the exact shapes of responses, chunks and SSE
 * frames, and streamed text with stop strings on real tokenizers (those
 * tests skip when the shared files are absent). */
#include "router/oai.h"
#include "router/oai_text.h"

#include "common/err.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "fail_alloc.h"

/* ---------------------------------------------------------------- helpers */

static const char *shared_path(const char *rel, char *buf, size_t cap)
{
    const char *d = getenv("TANDEM_SHARED_DIR");
    if (d == NULL || d[0] == '\0') d = TANDEM_SHARED_DIR;
    snprintf(buf, cap, "%s/%s", d, rel);
    struct stat st;
    if (stat(buf, &st) != 0) {
        print_message("skipping: %s not found (shared test data absent)\n", buf);
        return NULL;
    }
    return buf;
}

static tok_tokenizer *load_shared(const char *rel)
{
    char buf[1024], err[256];
    if (shared_path(rel, buf, sizeof(buf)) == NULL) return NULL;
    tok_tokenizer *t = NULL;
    int rc = tok_load(buf, &t, err, sizeof(err));
    if (rc) print_message("tok_load(%s): %s\n", buf, err);
    assert_int_equal(rc, 0);
    return t;
}

static char *make_tmpdir(void)
{
    char tmpl[] = "/tmp/tandem_oai_XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
}

static void write_str(const char *dir, const char *name, const char *s)
{
    char p[1024];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(s, 1, strlen(s), f), strlen(s));
    fclose(f);
}

static void remove_tmpdir(char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[1024];
        snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
    free(dir);
}

/* A tokenizer from a shared tokenizer.json with our tokenizer_config.json,
 * in a temporary directory (a link, not a copy). */
static tok_tokenizer *load_with_config(const char *rel_json, const char *config)
{
    char buf[1024];
    if (shared_path(rel_json, buf, sizeof(buf)) == NULL) return NULL;
    char *dir = make_tmpdir();
    char link[1024];
    snprintf(link, sizeof(link), "%s/tokenizer.json", dir);
    assert_int_equal(symlink(buf, link), 0);
    write_str(dir, "tokenizer_config.json", config);
    tok_tokenizer *t = NULL;
    char err[256];
    int rc = tok_load(dir, &t, err, sizeof(err));
    if (rc) print_message("tok_load: %s\n", err);
    assert_int_equal(rc, 0);
    remove_tmpdir(dir);
    return t;
}

static const cJSON *get(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (v == NULL) print_message("missing key '%s'\n", k);
    assert_non_null(v);
    return v;
}

static int n_keys(const cJSON *o)
{
    return cJSON_GetArraySize(o);
}

/* The error body has OpenAI's shape: exactly {"error":{message, type,
 * param, code}}, message and type strings, param and code string or null. */
static void check_error_json(const oai_error *e)
{
    char *s = oai_error_json(e);
    assert_non_null(s);
    cJSON *root = cJSON_Parse(s);
    if (root == NULL) print_message("not JSON: %s\n", s);
    assert_non_null(root);
    assert_int_equal(n_keys(root), 1);
    const cJSON *er = get(root, "error");
    assert_int_equal(n_keys(er), 4);
    assert_true(cJSON_IsString(get(er, "message")));
    assert_true(get(er, "message")->valuestring[0] != '\0');
    assert_true(cJSON_IsString(get(er, "type")));
    const cJSON *p = get(er, "param");
    if (e->param[0]) {
        assert_true(cJSON_IsString(p));
        assert_string_equal(p->valuestring, e->param);
    } else {
        assert_true(cJSON_IsNull(p));
    }
    const cJSON *c = get(er, "code");
    if (e->code) {
        assert_true(cJSON_IsString(c));
        assert_string_equal(c->valuestring, e->code);
    } else {
        assert_true(cJSON_IsNull(c));
    }
    cJSON_Delete(root);
    free(s);
}

static void expect_bad_len(enum oai_kind kind, const char *body, size_t len, const char *param)
{
    oai_request r;
    oai_error e;
    int rc = oai_parse(kind, body, len, &r, &e);
    if (rc != TD_EINVAL) print_message("accepted: %.*s\n", (int)len, body);
    assert_int_equal(rc, TD_EINVAL);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.type, "invalid_request_error");
    if (strcmp(e.param, param ? param : "") != 0)
        print_message("body %.*s: param '%s', want '%s' (%s)\n", (int)len, body, e.param,
                      param ? param : "", e.message);
    assert_string_equal(e.param, param ? param : "");
    assert_null(r.model);
    assert_null(r.messages);
    assert_null(r.prompt);
    check_error_json(&e);
    oai_request_free(&r);
}

static void expect_bad(enum oai_kind kind, const char *body, const char *param)
{
    expect_bad_len(kind, body, strlen(body), param);
}

static void parse_ok(enum oai_kind kind, const char *body, oai_request *r)
{
    oai_error e;
    int rc = oai_parse(kind, body, strlen(body), r, &e);
    if (rc) print_message("refused %s: %s (%s)\n", body, e.message, e.param);
    assert_int_equal(rc, 0);
}

#define C    OAI_COMPLETIONS
#define CHAT OAI_CHAT

/* ------------------------------------------------------------ bad inputs */

static void t_bad_inputs(void **state)
{
    (void)state;
    static const struct {
        enum oai_kind kind;
        const char *body;
        const char *param; /* NULL: none */
    } cases[] = {
        /* the body itself */
        {C, "", NULL},
        {C, "{", NULL},
        {C, "{\"model\": \"m\", \"prompt\": \"x\",}", NULL},
        {C, "[1, 2]", NULL},
        {C, "\"just a string\"", NULL},
        {C, "null", NULL},
        {C, "{\"model\": \"m\", \"prompt\": \"x\"} trailing", NULL},
        {C, "{\"model\": \"m\", \"prompt\": \"a\\u0000b\"}", NULL},
        /* model */
        {C, "{\"prompt\": \"x\"}", "model"},
        {C, "{\"model\": null, \"prompt\": \"x\"}", "model"},
        {C, "{\"model\": 7, \"prompt\": \"x\"}", "model"},
        {C, "{\"model\": \"\", \"prompt\": \"x\"}", "model"},
        /* prompt */
        {C, "{\"model\": \"m\"}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": \"\"}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": []}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": [\"\"]}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": [\"a\", \"b\"]}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": [[1], [2]]}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": [1, -2]}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": [1, 2.5]}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": [1, \"a\"]}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": [[]]}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": 42}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": {\"text\": \"x\"}}", "prompt"},
        {C, "{\"model\": \"m\", \"prompt\": [{}]}", "prompt"},
        /* messages */
        {CHAT, "{\"model\": \"m\"}", "messages"},
        {CHAT, "{\"model\": \"m\", \"messages\": []}", "messages"},
        {CHAT, "{\"model\": \"m\", \"messages\": \"hi\"}", "messages"},
        {CHAT, "{\"model\": \"m\", \"messages\": [\"hi\"]}", "messages[0]"},
        {CHAT, "{\"model\": \"m\", \"messages\": [{\"content\": \"hi\"}]}", "messages[0].role"},
        {CHAT, "{\"model\": \"m\", \"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}",
         "messages[0].role"},
        {CHAT, "{\"model\": \"m\", \"messages\": [{\"role\": 1, \"content\": \"hi\"}]}",
         "messages[0].role"},
        {CHAT, "{\"model\": \"m\", \"messages\": [{\"role\": \"user\"}]}", "messages[0].content"},
        {CHAT, "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": 5}]}",
         "messages[0].content"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}, "
         "{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]}",
         "messages[1].content[0]"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": [{\"type\": "
         "\"text\"}]}]}",
         "messages[0].content[0].text"},
        {CHAT, "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": [7]}]}",
         "messages[0].content[0]"},
        /* sampling parameters */
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"max_tokens\": -1}", "max_tokens"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"max_tokens\": 0}", "max_tokens"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"max_tokens\": 1e12}", "max_tokens"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"max_tokens\": 1.5}", "max_tokens"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"max_tokens\": \"10\"}", "max_tokens"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"max_tokens\": 1e999}", "max_tokens"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}], "
         "\"max_completion_tokens\": -5}",
         "max_completion_tokens"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"temperature\": -0.1}", "temperature"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"temperature\": 2.5}", "temperature"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"temperature\": \"hot\"}", "temperature"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"top_p\": 0}", "top_p"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"top_p\": 1.01}", "top_p"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"top_k\": -2}", "top_k"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"top_k\": 2.5}", "top_k"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"seed\": 1.5}", "seed"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"seed\": \"7\"}", "seed"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"seed\": 1e30}", "seed"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stop\": \"\"}", "stop"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stop\": [\"a\", \"\"]}", "stop"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stop\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}",
         "stop"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stop\": 3}", "stop"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stop\": [3]}", "stop"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stream\": \"yes\"}", "stream"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stream\": 1}", "stream"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stream_options\": true}", "stream_options"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"stream_options\": {\"include_usage\": 1}}",
         "stream_options.include_usage"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"ignore_eos\": \"true\"}", "ignore_eos"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"min_tokens\": -1}", "min_tokens"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"max_tokens\": 4, \"min_tokens\": 5}",
         "min_tokens"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"user\": 12}", "user"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"tandem\": true}", "tandem"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"tandem\": {\"timings\": \"yes\"}}",
         "tandem.timings"},
        /* unsupported parameters, named */
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"n\": 2}", "n"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"n\": 0}", "n"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"logprobs\": 5}", "logprobs"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}], "
         "\"logprobs\": true}",
         "logprobs"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}], "
         "\"top_logprobs\": 3}",
         "top_logprobs"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}], "
         "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]}",
         "tools"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}], "
         "\"tool_choice\": \"required\"}",
         "tool_choice"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}], "
         "\"functions\": [{\"name\": \"f\"}]}",
         "functions"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"logit_bias\": {\"50256\": -100}}",
         "logit_bias"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"best_of\": 3}", "best_of"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"echo\": true}", "echo"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"suffix\": \"end\"}", "suffix"},
        {CHAT,
         "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}], "
         "\"response_format\": {\"type\": \"json_object\"}}",
         "response_format"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"presence_penalty\": 0.5}", "presence_penalty"},
        {C, "{\"model\": \"m\", \"prompt\": \"x\", \"frequency_penalty\": -1}",
         "frequency_penalty"},
    };
    size_t n = sizeof(cases) / sizeof(cases[0]);
    assert_true(n >= 40);
    for (size_t i = 0; i < n; i++)
        expect_bad(cases[i].kind, cases[i].body, cases[i].param);

    /* invalid UTF-8 in strings (cJSON takes it as it is) */
    expect_bad(C, "{\"model\": \"m\", \"prompt\": \"ab\xff\"}", "prompt");
    expect_bad(C, "{\"model\": \"m\", \"prompt\": [\"\xc3\"]}", "prompt");
    expect_bad(C, "{\"model\": \"m\\xc0\\xaf\", \"prompt\": \"x\"}", NULL);  /* escaped: bad JSON */
    expect_bad(C, "{\"model\": \"m\xc0\xaf\", \"prompt\": \"x\"}", "model"); /* overlong */
    expect_bad(C, "{\"model\": \"m\", \"prompt\": \"\xed\xa0\x80\"}", "prompt");     /* surrogate */
    expect_bad(C, "{\"model\": \"m\", \"prompt\": \"\xf4\x90\x80\x80\"}", "prompt"); /* > 10FFFF */
    expect_bad(C, "{\"model\": \"m\", \"prompt\": \"x\", \"stop\": \"\xfe\"}", "stop");
    expect_bad(C, "{\"model\": \"m\", \"prompt\": \"x\", \"user\": \"\xe2\x82\"}", "user");
    expect_bad(CHAT,
               "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"\x80\"}]}",
               "messages[0].content");
    /* a lone escaped surrogate is refused by the JSON parser */
    expect_bad(C, "{\"model\": \"m\", \"prompt\": \"\\ud800\"}", NULL);
    /* an escaped backslash before u0000 is text, not a NUL */
    oai_request r;
    parse_ok(C, "{\"model\": \"m\", \"prompt\": \"a\\\\u0000b\"}", &r);
    assert_string_equal(r.prompt, "a\\u0000b");
    oai_request_free(&r);
    /* a NUL byte inside the body, with an explicit length */
    expect_bad_len(C, "{\"model\": \"m\", \"prompt\": \"a\0b\"}", 30, NULL);
    /* NULL body */
    expect_bad_len(C, NULL, 0, NULL);
    /* a deep nesting bomb fails cleanly */
    char deep[4100];
    memset(deep, '[', 4000);
    deep[4000] = '\0';
    expect_bad(C, deep, NULL);
    assert_int_equal(oai_parse(C, "{}", 2, NULL, NULL), TD_EINVAL);
}

/* ------------------------------------------------------ accepted requests */

static void t_parse_completions(void **state)
{
    (void)state;
    oai_request r;
    parse_ok(C, "{\"model\": \"stories\", \"prompt\": \"Once upon\"}", &r);
    assert_int_equal(r.kind, OAI_COMPLETIONS);
    assert_string_equal(r.model, "stories");
    assert_string_equal(r.prompt, "Once upon");
    assert_int_equal(r.prompt_len, 9);
    assert_null(r.prompt_ids);
    assert_null(r.messages);
    /* defaults */
    assert_false(r.stream);
    assert_false(r.include_usage);
    assert_int_equal(r.max_tokens, 16); /* OpenAI's completions default */
    assert_int_equal(r.min_tokens, 0);
    assert_true(r.temperature == 1.0f);
    assert_true(r.top_p == 1.0f);
    assert_int_equal(r.top_k, 0);
    assert_false(r.has_seed);
    assert_int_equal(r.n_stop, 0);
    assert_false(r.ignore_eos);
    assert_null(r.user);
    assert_false(r.want_timings);
    oai_request_free(&r);

    /* a list of one string; UTF-8 and escapes */
    parse_ok(C, "{\"model\": \"m\", \"prompt\": [\"Grüße \\u00e9\\n\\ud83d\\ude00\"]}", &r);
    assert_string_equal(r.prompt, "Grüße é\n😀");
    oai_request_free(&r);
    /* token ids, flat and nested once */
    parse_ok(C, "{\"model\": \"m\", \"prompt\": [1, 15043, 0, 2147483647]}", &r);
    assert_null(r.prompt);
    assert_int_equal(r.n_prompt_ids, 4);
    assert_int_equal(r.prompt_ids[1], 15043);
    assert_int_equal(r.prompt_ids[3], 2147483647);
    oai_request_free(&r);
    parse_ok(C, "{\"model\": \"m\", \"prompt\": [[5, 6]]}", &r);
    assert_int_equal(r.n_prompt_ids, 2);
    assert_int_equal(r.prompt_ids[0], 5);
    oai_request_free(&r);

    /* every field, in every accepted form */
    parse_ok(C,
             "{\"model\": \"m\", \"prompt\": \"p\", \"stream\": true, \"stream_options\": "
             "{\"include_usage\": true}, \"max_tokens\": 16, \"temperature\": 0, \"top_p\": 0.9, "
             "\"top_k\": 40, \"seed\": 12345, \"stop\": \"\\n\\n\", \"ignore_eos\": true, "
             "\"min_tokens\": 4, \"user\": \"alice\", \"n\": 1, \"tandem\": {\"timings\": true}, "
             "\"some_future_field\": {\"x\": [1]}, \"logprobs\": null, \"echo\": false, "
             "\"best_of\": 1, \"suffix\": null, \"presence_penalty\": 0, \"frequency_penalty\": "
             "0.0, \"logit_bias\": {}}",
             &r);
    assert_true(r.stream);
    assert_true(r.include_usage);
    assert_int_equal(r.max_tokens, 16);
    assert_true(r.temperature == 0.0f);
    assert_true(r.top_p > 0.89f && r.top_p < 0.91f);
    assert_int_equal(r.top_k, 40);
    assert_true(r.has_seed);
    assert_int_equal(r.seed, 12345);
    assert_int_equal(r.n_stop, 1);
    assert_string_equal(r.stop[0], "\n\n");
    assert_true(r.ignore_eos);
    assert_int_equal(r.min_tokens, 4);
    assert_string_equal(r.user, "alice");
    assert_true(r.want_timings);
    oai_request_free(&r);

    /* nulls read as absent; top_k -1 is off; stop as a list; negative and
     * large seeds; bounds */
    parse_ok(C,
             "{\"model\": \"m\", \"prompt\": \"p\", \"stream\": null, \"max_tokens\": null, "
             "\"temperature\": 2, \"top_p\": 1, \"top_k\": -1, \"seed\": -1, \"stop\": [\"a\", "
             "\"END\", \"\\u00e9\", \"x y\"], \"stream_options\": null, \"tandem\": {}}",
             &r);
    assert_false(r.stream);
    assert_int_equal(r.max_tokens, 16);
    assert_true(r.temperature == 2.0f);
    assert_int_equal(r.top_k, 0);
    assert_int_equal(r.seed, UINT64_MAX);
    assert_int_equal(r.n_stop, 4);
    assert_string_equal(r.stop[2], "é");
    assert_false(r.want_timings);
    oai_request_free(&r);
    parse_ok(C, "{\"model\": \"m\", \"prompt\": \"p\", \"seed\": 0, \"stop\": [], \"top_k\": 0}",
             &r);
    assert_true(r.has_seed);
    assert_int_equal(r.seed, 0);
    assert_int_equal(r.n_stop, 0);
    oai_request_free(&r);
    parse_ok(C, "{\"model\": \"m\", \"prompt\": \"p\", \"seed\": 18446744073709549568}", &r);
    assert_int_equal(r.seed, 18446744073709549568ull);
    oai_request_free(&r);
    parse_ok(C, "{\"model\": \"m\", \"prompt\": \"p\", \"max_tokens\": 16777216}", &r);
    assert_int_equal(r.max_tokens, OAI_MAX_TOKENS_LIMIT);
    oai_request_free(&r);
    /* white space around the object; a body without a NUL after it */
    const char body[] = " \n{\"model\": \"m\", \"prompt\": \"p\"}\r\n GARBAGE";
    oai_error e;
    assert_int_equal(oai_parse(C, body, strlen(body) - 8, &r, &e), 0);
    oai_request_free(&r);
    oai_request_free(&r); /* freeing twice is harmless: free zeroes */
    oai_request_free(NULL);
}

static void t_parse_chat(void **state)
{
    (void)state;
    oai_request r;
    parse_ok(
        CHAT,
        "{\"model\": \"m\", \"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, "
        "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"Hello\"}, "
        "{\"type\": \"text\", \"text\": \"there\"}], \"name\": \"bob\"}, {\"role\": "
        "\"assistant\", \"content\": null}, {\"role\": \"developer\", \"content\": \"d\"}, "
        "{\"role\": \"tool\", \"content\": \"42\", \"tool_call_id\": \"c1\"}], "
        "\"max_completion_tokens\": 7, \"max_tokens\": 99, \"tools\": [], \"tool_choice\": "
        "\"none\", \"logprobs\": false, \"top_logprobs\": 0, \"response_format\": {\"type\": "
        "\"text\"}}",
        &r);
    assert_int_equal(r.kind, OAI_CHAT);
    assert_int_equal(r.n_messages, 5);
    assert_string_equal(r.messages[0].role, "system");
    assert_string_equal(r.messages[0].content, "Be brief.");
    assert_string_equal(r.messages[1].role, "user");
    assert_string_equal(r.messages[1].content, "Hello\nthere");
    assert_string_equal(r.messages[2].role, "assistant");
    assert_string_equal(r.messages[2].content, "");
    assert_string_equal(r.messages[3].role, "system"); /* developer reads as system */
    assert_string_equal(r.messages[4].role, "tool");
    assert_int_equal(r.max_tokens, 7); /* max_completion_tokens wins */
    assert_null(r.prompt);
    oai_request_free(&r);
    /* chat: no max_tokens means up to the context; a completion's default
     * grows to min_tokens */
    parse_ok(CHAT, "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
             &r);
    assert_int_equal(r.max_tokens, 0);
    oai_request_free(&r);
    parse_ok(C, "{\"model\": \"m\", \"prompt\": \"x\", \"min_tokens\": 20}", &r);
    assert_int_equal(r.max_tokens, 20);
    assert_int_equal(r.min_tokens, 20);
    oai_request_free(&r);
    /* an empty list of parts and an empty string are allowed content */
    parse_ok(CHAT,
             "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": []}, {\"role\": "
             "\"assistant\", \"content\": \"\"}]}",
             &r);
    assert_string_equal(r.messages[0].content, "");
    oai_request_free(&r);
    /* a chat body's "prompt" and a completion body's "messages" are ignored */
    parse_ok(CHAT,
             "{\"model\": \"m\", \"prompt\": 5, \"messages\": [{\"role\": \"user\", \"content\": "
             "\"x\"}]}",
             &r);
    assert_null(r.prompt);
    oai_request_free(&r);
    parse_ok(C, "{\"model\": \"m\", \"messages\": 5, \"prompt\": \"x\"}", &r);
    oai_request_free(&r);
}

/* --------------------------------------------------------------- errors */

static void t_error_helpers(void **state)
{
    (void)state;
    oai_error e;
    oai_error_auth(&e);
    assert_int_equal(e.status, 401);
    assert_string_equal(e.type, "authentication_error");
    assert_string_equal(e.code, "invalid_api_key");
    check_error_json(&e);
    oai_error_model(&e, "gpt-9");
    assert_int_equal(e.status, 404);
    assert_string_equal(e.code, "model_not_found");
    assert_string_equal(e.param, "model");
    assert_non_null(strstr(e.message, "gpt-9"));
    check_error_json(&e);
    oai_error_path(&e, "GET", "/v2/\xff\"odd");
    assert_int_equal(e.status, 404);
    check_error_json(&e); /* an invalid UTF-8 path still gives valid JSON */
    oai_error_method(&e, "PUT", "/v1/completions");
    assert_int_equal(e.status, 405);
    check_error_json(&e);
    oai_error_too_large(&e, 4u << 20);
    assert_int_equal(e.status, 413);
    assert_non_null(strstr(e.message, "4194304"));
    check_error_json(&e);
    oai_error_busy(&e, 3);
    assert_int_equal(e.status, 429);
    assert_string_equal(e.code, "rate_limit_exceeded");
    check_error_json(&e);
    oai_error_unavailable(&e);
    assert_int_equal(e.status, 503);
    assert_string_equal(e.type, "server_error");
    check_error_json(&e);
    oai_error_timeout(&e);
    assert_int_equal(e.status, 504);
    check_error_json(&e);

    /* the constructor, exact text; a long message is truncated safely */
    oai_error_set(&e, 400, NULL, "stop", NULL, "bad %s \"q\"\n", "x");
    char *s = oai_error_json(&e);
    assert_string_equal(s, "{\"error\":{\"message\":\"bad x \\\"q\\\"\\n\",\"type\":"
                           "\"invalid_request_error\",\"param\":\"stop\",\"code\":null}}");
    free(s);
    char big[600];
    memset(big, 'a', sizeof(big) - 3);
    memcpy(big + sizeof(big) - 3, "\xc3\xa9", 3); /* é lands across the cut */
    oai_error_set(&e, 500, "custom_type", NULL, "c", "%s", big);
    memcpy(e.message + 253, "\xc3", 1); /* an incomplete sequence at the end */
    assert_string_equal(e.type, "custom_type");
    check_error_json(&e);
    assert_null(oai_error_json(NULL));
}

/* ----------------------------------------------------------- responses */

static cJSON *parse_json(char *s)
{
    assert_non_null(s);
    cJSON *j = cJSON_Parse(s);
    if (j == NULL) print_message("not JSON: %s\n", s);
    assert_non_null(j);
    free(s);
    return j;
}

static void check_head(const cJSON *j, const char *id, const char *object)
{
    assert_string_equal(get(j, "id")->valuestring, id);
    assert_string_equal(get(j, "object")->valuestring, object);
    assert_true(cJSON_IsNumber(get(j, "created")));
    assert_int_equal((int64_t)get(j, "created")->valuedouble, 1733450000);
    assert_string_equal(get(j, "model")->valuestring, "stories");
}

static void check_usage(const cJSON *u, int p, int c)
{
    assert_int_equal(n_keys(u), 3);
    assert_int_equal(get(u, "prompt_tokens")->valueint, p);
    assert_int_equal(get(u, "completion_tokens")->valueint, c);
    assert_int_equal(get(u, "total_tokens")->valueint, p + c);
}

static void t_responses(void **state)
{
    (void)state;
    char id[64];
    oai_make_id(OAI_COMPLETIONS, "r-42", id, sizeof(id));
    assert_string_equal(id, "cmpl-r-42");
    char cid[64];
    oai_make_id(OAI_CHAT, "r-42", cid, sizeof(cid));
    assert_string_equal(cid, "chatcmpl-r-42");
    char tiny[6];
    oai_make_id(OAI_CHAT, "r-42", tiny, sizeof(tiny));
    assert_string_equal(tiny, "chatc");
    assert_string_equal(oai_finish_name(OAI_FINISH_STOP), "stop");
    assert_string_equal(oai_finish_name(OAI_FINISH_LENGTH), "length");
    assert_null(oai_finish_name(OAI_FINISH_NONE));

    oai_meta m = {OAI_COMPLETIONS, id, "stories", 1733450000, false};
    oai_usage u = {5, 3};
    const char *text = "Hi \"you\"\n\t\x01 é😀";
    cJSON *j = parse_json(oai_completion_json(&m, text, strlen(text), OAI_FINISH_LENGTH, &u, NULL));
    assert_int_equal(n_keys(j), 6);
    check_head(j, id, "text_completion");
    const cJSON *ch = get(j, "choices");
    assert_int_equal(cJSON_GetArraySize(ch), 1);
    const cJSON *c0 = cJSON_GetArrayItem(ch, 0);
    assert_int_equal(n_keys(c0), 4);
    assert_int_equal(get(c0, "index")->valueint, 0);
    assert_string_equal(get(c0, "text")->valuestring, text);
    assert_true(cJSON_IsNull(get(c0, "logprobs")));
    assert_string_equal(get(c0, "finish_reason")->valuestring, "length");
    check_usage(get(j, "usage"), 5, 3);
    assert_null(cJSON_GetObjectItem(j, "tandem"));
    cJSON_Delete(j);

    /* with timings */
    oai_timings tm = {1, 2, 3, 4, 5, 6, 7, 8};
    j = parse_json(oai_completion_json(&m, "", 0, OAI_FINISH_STOP, &u, &tm));
    const cJSON *t = get(get(j, "tandem"), "timings");
    assert_int_equal(n_keys(t), 8);
    assert_int_equal(get(t, "queue_us")->valueint, 1);
    assert_int_equal(get(t, "tokenize_us")->valueint, 2);
    assert_int_equal(get(t, "prefill_us")->valueint, 3);
    assert_int_equal(get(t, "transfer_us")->valueint, 4);
    assert_int_equal(get(t, "first_token_us")->valueint, 5);
    assert_int_equal(get(t, "decode_us")->valueint, 6);
    assert_int_equal(get(t, "prefill_queue_us")->valueint, 7);
    assert_int_equal(get(t, "e2e_us")->valueint, 8);
    assert_string_equal(get(cJSON_GetArrayItem(get(j, "choices"), 0), "text")->valuestring, "");
    cJSON_Delete(j);

    /* chat */
    oai_meta mc = {OAI_CHAT, cid, "stories", 1733450000, false};
    j = parse_json(oai_chat_json(&mc, "Hello!", 6, OAI_FINISH_STOP, &u, NULL));
    assert_int_equal(n_keys(j), 6);
    check_head(j, cid, "chat.completion");
    c0 = cJSON_GetArrayItem(get(j, "choices"), 0);
    assert_int_equal(n_keys(c0), 4);
    assert_int_equal(get(c0, "index")->valueint, 0);
    const cJSON *msg = get(c0, "message");
    assert_int_equal(n_keys(msg), 2);
    assert_string_equal(get(msg, "role")->valuestring, "assistant");
    assert_string_equal(get(msg, "content")->valuestring, "Hello!");
    assert_string_equal(get(c0, "finish_reason")->valuestring, "stop");
    check_usage(get(j, "usage"), 5, 3);
    cJSON_Delete(j);
    /* bytes that are not UTF-8 still give valid JSON (U+FFFD) */
    j = parse_json(oai_chat_json(&mc, "a\xff", 2, OAI_FINISH_STOP, &u, NULL));
    msg = get(cJSON_GetArrayItem(get(j, "choices"), 0), "message");
    assert_string_equal(get(msg, "content")->valuestring, "a\xef\xbf\xbd");
    cJSON_Delete(j);
    assert_null(oai_chat_json(NULL, "", 0, OAI_FINISH_STOP, &u, NULL));
    assert_null(oai_completion_json(&m, NULL, 3, OAI_FINISH_STOP, &u, NULL));
}

static void t_chunks(void **state)
{
    (void)state;
    oai_meta m = {OAI_COMPLETIONS, "cmpl-1", "stories", 1733450000, false};
    cJSON *j = parse_json(oai_chunk_json(&m, "Once", 4, true, OAI_FINISH_NONE, NULL));
    assert_int_equal(n_keys(j), 5);
    check_head(j, "cmpl-1", "text_completion");
    const cJSON *c0 = cJSON_GetArrayItem(get(j, "choices"), 0);
    assert_int_equal(n_keys(c0), 4);
    assert_string_equal(get(c0, "text")->valuestring, "Once");
    assert_true(cJSON_IsNull(get(c0, "finish_reason")));
    assert_null(cJSON_GetObjectItem(j, "usage"));
    cJSON_Delete(j);
    m.include_usage = true;
    j = parse_json(oai_chunk_json(&m, "", 0, false, OAI_FINISH_STOP, NULL));
    c0 = cJSON_GetArrayItem(get(j, "choices"), 0);
    assert_string_equal(get(c0, "text")->valuestring, "");
    assert_string_equal(get(c0, "finish_reason")->valuestring, "stop");
    assert_true(cJSON_IsNull(get(j, "usage")));
    cJSON_Delete(j);

    /* chat: the first chunk carries the role; later ones only content; the
     * last may have an empty delta */
    oai_meta mc = {OAI_CHAT, "chatcmpl-1", "stories", 1733450000, false};
    j = parse_json(oai_chunk_json(&mc, "", 0, true, OAI_FINISH_NONE, NULL));
    check_head(j, "chatcmpl-1", "chat.completion.chunk");
    c0 = cJSON_GetArrayItem(get(j, "choices"), 0);
    assert_int_equal(n_keys(c0), 4);
    const cJSON *d = get(c0, "delta");
    assert_int_equal(n_keys(d), 2);
    assert_string_equal(get(d, "role")->valuestring, "assistant");
    assert_string_equal(get(d, "content")->valuestring, "");
    assert_true(cJSON_IsNull(get(c0, "finish_reason")));
    cJSON_Delete(j);
    j = parse_json(oai_chunk_json(&mc, " there", 6, false, OAI_FINISH_NONE, NULL));
    d = get(cJSON_GetArrayItem(get(j, "choices"), 0), "delta");
    assert_int_equal(n_keys(d), 1);
    assert_string_equal(get(d, "content")->valuestring, " there");
    cJSON_Delete(j);
    oai_timings tm = {0};
    tm.e2e_us = 99;
    j = parse_json(oai_chunk_json(&mc, NULL, 0, false, OAI_FINISH_LENGTH, &tm));
    c0 = cJSON_GetArrayItem(get(j, "choices"), 0);
    assert_int_equal(n_keys(get(c0, "delta")), 0);
    assert_string_equal(get(c0, "finish_reason")->valuestring, "length");
    assert_int_equal(get(get(get(j, "tandem"), "timings"), "e2e_us")->valueint, 99);
    cJSON_Delete(j);

    /* the usage chunk */
    oai_usage u = {10, 20};
    j = parse_json(oai_usage_chunk_json(&mc, &u, NULL));
    assert_int_equal(n_keys(j), 6);
    check_head(j, "chatcmpl-1", "chat.completion.chunk");
    assert_true(cJSON_IsArray(get(j, "choices")));
    assert_int_equal(cJSON_GetArraySize(get(j, "choices")), 0);
    check_usage(get(j, "usage"), 10, 20);
    cJSON_Delete(j);
    j = parse_json(oai_usage_chunk_json(&m, &u, &tm));
    check_head(j, "cmpl-1", "text_completion");
    assert_non_null(get(j, "tandem"));
    cJSON_Delete(j);

    /* SSE framing */
    char *f = oai_sse_frame("{\"a\":1}");
    assert_string_equal(f, "data: {\"a\":1}\n\n");
    free(f);
    assert_null(oai_sse_frame(NULL));
    assert_string_equal(OAI_SSE_DONE, "data: [DONE]\n\n");
    oai_error e;
    oai_error_set(&e, 500, NULL, NULL, "worker_failed", "the decode worker went away");
    f = oai_sse_error(&e);
    assert_non_null(f);
    assert_true(strncmp(f, "data: {", 7) == 0);
    char *sep = strstr(f, "\n\n");
    assert_non_null(sep);
    assert_string_equal(sep, "\n\n" OAI_SSE_DONE);
    *sep = '\0';
    cJSON *ej = cJSON_Parse(f + 6);
    assert_non_null(ej);
    const cJSON *er = get(ej, "error");
    assert_string_equal(get(er, "type")->valuestring, "server_error");
    assert_string_equal(get(er, "code")->valuestring, "worker_failed");
    cJSON_Delete(ej);
    free(f);
}

/* --------------------------------------------------------- chat rendering */

static const char *const k_chat_body =
    "{\"model\": \"m\", \"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": "
    "\"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}, {\"role\": "
    "\"user\", \"content\": \"Why?\"}]}";

static const char *const k_phi3 = "# Phi-3\n"
                                  "begin: {bos}\n"
                                  "system: <|system|>\\n{content}<|end|>\\n\n"
                                  "user: <|user|>\\n{content}<|end|>\\n\r\n"
                                  "\n"
                                  "assistant: <|assistant|>\\n{content}<|end|>\\n\n"
                                  "generation: <|assistant|>\\n";

static void t_chat_templates(void **state)
{
    (void)state;
    char why[160];
    assert_int_equal(oai_chat_template_check(k_phi3, why, sizeof(why)), 0);
    assert_int_equal(oai_chat_template_check("family: llama3\n", why, sizeof(why)), 0);
    assert_int_equal(oai_chat_template_check("  family :chatml  \n# c\n", why, sizeof(why)), 0);
    assert_int_equal(oai_chat_template_check("message: [{role}] {content}\n", why, sizeof(why)), 0);
    static const char *const bad[] = {
        "",
        "# only a comment\n",
        "family: gpt9\n",
        "family: llama3\nuser: {content}\n",
        "usr: {content}\n",
        "user {content}\n",
        "user: a\nuser: b\n",
        "begin: {bos}\ngeneration: x\n",
        "user: a\\qb\n",
        "user: trailing\\\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        why[0] = '\0';
        assert_int_equal(oai_chat_template_check(bad[i], why, sizeof(why)), TD_EFORMAT);
        assert_true(why[0] != '\0');
    }
    assert_int_equal(oai_chat_template_check(NULL, NULL, 0), TD_EFORMAT);

    /* a model without a template: a clear 400 unless --chat-template */
    tok_tokenizer *tok = load_shared("models/stories260K/tok512.bin");
    if (tok == NULL) return;
    oai_request r;
    parse_ok(CHAT, k_chat_body, &r);
    char *p = NULL;
    oai_error e;
    assert_int_equal(oai_render_chat(tok, NULL, &r, &p, &e), TD_EUNSUPPORTED);
    assert_null(p);
    assert_int_equal(e.status, 400);
    assert_non_null(strstr(e.message, "start the router with --chat-template"));
    check_error_json(&e);
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(oai_prompt_tokens(tok, NULL, &r, &ids, &n, &e), TD_EUNSUPPORTED);
    assert_null(ids);

    /* a template of one's own; {bos} is the vocabulary's spelling of BOS
     * (llama2.c spells it "\n<s>\n") */
    const char *bos_piece;
    size_t bos_len;
    assert_int_equal(tok_piece(tok, tok_bos_id(tok), &bos_piece, &bos_len), 0);
    assert_int_equal(oai_render_chat(tok, k_phi3, &r, &p, &e), 0);
    assert_memory_equal(p, bos_piece, bos_len);
    assert_string_equal(p + bos_len,
                        "<|system|>\nS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n"
                        "<|user|>\nWhy?<|end|>\n<|assistant|>\n");
    free(p);
    assert_int_equal(
        oai_render_chat(tok, "message: [{role}|{eos}|{other}] {content}\\\\\n", &r, &p, &e), 0);
    assert_string_equal(p, "[system|\n</s>\n|{other}] S\\[user|\n</s>\n|{other}] Hi\\"
                           "[assistant|\n</s>\n|{other}] Yo\\[user|\n</s>\n|{other}] Why?\\");
    free(p);
    /* a role the template lacks */
    assert_int_equal(oai_render_chat(tok, "user: U{content}\n", &r, &p, &e), TD_EINVAL);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.param, "messages[0].role");
    check_error_json(&e);
    /* a malformed override is the server's fault */
    assert_int_equal(oai_render_chat(tok, "bogus\n", &r, &p, &e), TD_EINVAL);
    assert_int_equal(e.status, 500);
    check_error_json(&e);
    /* a family by name */
    assert_int_equal(oai_render_chat(tok, "family: chatml", &r, &p, &e), 0);
    assert_string_equal(p, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
                           "<|im_start|>assistant\n");
    free(p);
    assert_int_equal(oai_render_chat(tok, "family: llama2", &r, &p, &e), 0);
    assert_memory_equal(p, bos_piece, bos_len);
    assert_string_equal(p + bos_len,
                        "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Yo \n</s>\n\n<s>\n[INST] "
                        "Why? [/INST]");
    free(p);
    /* the prompt's tokens: the rendered text, encoded without an added BOS */
    assert_int_equal(oai_prompt_tokens(tok, "family: chatml", &r, &ids, &n, &e), 0);
    assert_true(n > 10);
    assert_true(ids[0] != tok_bos_id(tok));
    free(ids);
    oai_request_free(&r);

    /* Llama 2 refuses two user turns in a row; no template has a tool role */
    parse_ok(CHAT,
             "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}, "
             "{\"role\": \"user\", \"content\": \"b\"}]}",
             &r);
    assert_int_equal(oai_render_chat(tok, "family: llama2", &r, &p, &e), TD_EINVAL);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.param, "messages");
    check_error_json(&e);
    oai_request_free(&r);
    parse_ok(CHAT, "{\"model\": \"m\", \"messages\": [{\"role\": \"tool\", \"content\": \"a\"}]}",
             &r);
    assert_int_equal(oai_render_chat(tok, "family: llama3", &r, &p, &e), TD_EINVAL);
    assert_string_equal(e.param, "messages[0].role");
    oai_request_free(&r);

    /* a completion request through oai_prompt_tokens: text and ids */
    parse_ok(C, "{\"model\": \"m\", \"prompt\": \"Once upon a time\"}", &r);
    assert_int_equal(oai_prompt_tokens(tok, NULL, &r, &ids, &n, &e), 0);
    int32_t *ref = NULL;
    size_t n_ref = 0;
    int flags = TOK_PARSE_SPECIAL | (tok_adds_bos(tok) ? TOK_ADD_BOS : 0);
    assert_int_equal(tok_encode(tok, "Once upon a time", 16, flags, &ref, &n_ref), 0);
    assert_int_equal(n, n_ref);
    assert_memory_equal(ids, ref, n * sizeof(*ids));
    free(ref);
    /* limits: vocabulary and context */
    assert_int_equal(oai_check_limits(&r, ids, n, tok_vocab_size(tok), 512, &e), 0);
    assert_int_equal(oai_check_limits(&r, ids, n, tok_vocab_size(tok), (int)n, &e), TD_EINVAL);
    assert_string_equal(e.code, "context_length_exceeded");
    assert_string_equal(e.param, "prompt");
    check_error_json(&e);
    assert_int_equal(oai_check_limits(&r, ids, 0, 0, 0, &e), TD_EINVAL);
    assert_string_equal(e.param, "prompt");
    free(ids);
    oai_request_free(&r);
    parse_ok(C, "{\"model\": \"m\", \"prompt\": [1, 511, 512], \"max_tokens\": 10}", &r);
    assert_int_equal(oai_prompt_tokens(tok, NULL, &r, &ids, &n, &e), 0);
    assert_int_equal(n, 3);
    assert_int_equal(oai_check_limits(&r, ids, n, 512, 0, &e), TD_EINVAL);
    assert_non_null(strstr(e.message, "512"));
    check_error_json(&e);
    assert_int_equal(oai_check_limits(&r, ids, 2, 512, 11, &e), TD_EINVAL);
    assert_string_equal(e.param, "max_tokens");
    assert_string_equal(e.code, "context_length_exceeded");
    assert_int_equal(oai_check_limits(&r, ids, 2, 512, 12, &e), 0);
    free(ids);
    oai_request_free(&r);
    tok_free(tok);
}

/* The tokenizer's own template (Llama 2 here) and a Phi-3 override whose
 * markers are single special tokens of that vocabulary. */
static void t_chat_real_templates(void **state)
{
    (void)state;
    tok_tokenizer *tok = load_with_config(
        "tokenizers/llama2-spm/tokenizer.json",
        "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"chat_template\": \"{% if "
        "messages[0]['role'] == 'system' %}... {{ bos_token + '[INST] ' + content.strip() + ' "
        "[/INST]' }}\"}");
    if (tok == NULL) return;
    oai_request r;
    parse_ok(CHAT, k_chat_body, &r);
    char *p = NULL;
    oai_error e;
    assert_int_equal(oai_render_chat(tok, NULL, &r, &p, &e), 0);
    assert_string_equal(p, "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] Why? "
                           "[/INST]");
    free(p);
    int32_t *ids;
    size_t n;
    assert_int_equal(oai_prompt_tokens(tok, NULL, &r, &ids, &n, &e), 0);
    size_t bos = 0;
    for (size_t i = 0; i < n; i++)
        bos += ids[i] == 1;
    assert_int_equal(bos, 2); /* both <s> parsed as BOS, none added */
    assert_int_equal(ids[0], 1);
    free(ids);
    tok_free(tok);

    /* Phi-3's own tokenizer: its template is not a known family */
    tok = load_shared("tokenizers/llama2-spm");
    if (tok == NULL) {
        oai_request_free(&r);
        return;
    }
    assert_int_equal(oai_render_chat(tok, NULL, &r, &p, &e), TD_EUNSUPPORTED);
    assert_int_equal(oai_prompt_tokens(tok, k_phi3, &r, &ids, &n, &e), 0);
    int32_t user = -1, end = -1, assistant = -1;
    for (int32_t id = 32000; id < tok_vocab_size(tok); id++) {
        const char *piece;
        size_t pl;
        assert_int_equal(tok_piece(tok, id, &piece, &pl), 0);
        if (pl == 8 && !memcmp(piece, "<|user|>", 8)) user = id;
        if (pl == 7 && !memcmp(piece, "<|end|>", 7)) end = id;
        if (pl == 13 && !memcmp(piece, "<|assistant|>", 13)) assistant = id;
    }
    assert_true(user > 0 && end > 0 && assistant > 0);
    size_t n_user = 0, n_end = 0;
    for (size_t i = 0; i < n; i++) {
        n_user += ids[i] == user;
        n_end += ids[i] == end;
    }
    assert_int_equal(n_user, 2);
    assert_int_equal(n_end, 4);
    assert_int_equal(ids[0], tok_bos_id(tok));
    assert_true(ids[n - 1] == assistant || ids[n - 2] == assistant);
    free(ids);
    oai_request_free(&r);
    tok_free(tok);
}

/* ----------------------------------------------------- streamed text */

static bool valid_utf8(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t l = u[i] < 0x80 ? 1 : u[i] >= 0xF0 ? 4 : u[i] >= 0xE0 ? 3 : u[i] >= 0xC2 ? 2 : 0;
        if (l == 0 || i + l > n) return false;
        for (size_t k = 1; k < l; k++)
            if ((u[i + k] & 0xC0) != 0x80) return false;
        i += l;
    }
    return true;
}

typedef struct streamed {
    char *text; /* everything released, in order */
    size_t len;
    size_t stop_at;      /* index of the push that reported stopped, or SIZE_MAX */
    size_t *released_at; /* bytes released after push i (n_ids + 1 entries: then finish) */
} streamed;

/* Pushes ids through an oai_text; checks every piece is valid UTF-8, and
 * that oai_text_all agrees with the pieces. */
static streamed run_stream(const tok_tokenizer *tok, const int32_t *ids, size_t n,
                           const char *const *stops, size_t n_stops, const int32_t *skip,
                           size_t n_skip)
{
    oai_text *t = NULL;
    assert_int_equal(oai_text_create(tok, stops, n_stops, skip, n_skip, &t), 0);
    streamed s = {0};
    s.stop_at = SIZE_MAX;
    s.released_at = calloc(n + 1, sizeof(size_t));
    size_t cap = 64;
    s.text = malloc(cap);
    for (size_t i = 0; i <= n; i++) {
        const char *out;
        size_t len;
        bool stopped = false;
        if (i < n) {
            assert_int_equal(oai_text_push(t, ids[i], &out, &len, &stopped), 0);
        } else {
            assert_int_equal(oai_text_finish(t, &out, &len), 0);
        }
        assert_true(valid_utf8(out, len));
        if (stopped && s.stop_at == SIZE_MAX) s.stop_at = i;
        if (s.stop_at != SIZE_MAX && s.stop_at < i) assert_int_equal(len, 0);
        while (s.len + len + 1 > cap)
            cap *= 2;
        s.text = realloc(s.text, cap);
        memcpy(s.text + s.len, out, len);
        s.len += len;
        s.text[s.len] = '\0';
        s.released_at[i] = s.len;
    }
    size_t all_len;
    const char *all = oai_text_all(t, &all_len);
    assert_int_equal(all_len, s.len);
    assert_memory_equal(all, s.text, s.len);
    assert_int_equal(all[all_len], '\0');
    oai_text_free(t);
    return s;
}

static void streamed_free(streamed *s)
{
    free(s->text);
    free(s->released_at);
}

/* Streams text's tokens with and without stops and checks the stop
 * contract against tok_stop_find on the whole text: the output is the text
 * cut before the earliest stop of the first to complete; at every step the
 * released text is a prefix of it (so no part of a stop string is ever
 * shown); the stop is reported at the token that completes it; without a
 * stop, everything is released by finish. Returns the final output. */
static char *check_stops(const tok_tokenizer *tok, const char *text, const char *const *stops,
                         size_t n_stops)
{
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(tok_encode(tok, text, strlen(text), 0, &ids, &n), 0);
    streamed ref = run_stream(tok, ids, n, NULL, 0, NULL, 0);
    assert_int_equal(ref.stop_at, SIZE_MAX);
    streamed s = run_stream(tok, ids, n, stops, n_stops, NULL, 0);

    /* the push at which the reference text first contains a stop */
    size_t want_stop = SIZE_MAX, want_len = ref.len;
    for (size_t i = 0; i < n && want_stop == SIZE_MAX; i++) {
        size_t cut;
        if (tok_stop_find(ref.text, ref.released_at[i], stops, n_stops, &cut)) {
            want_stop = i;
            want_len = cut;
        }
    }
    if (s.stop_at != want_stop)
        print_message("text '%s': stopped at %zu, want %zu\n", text, s.stop_at, want_stop);
    assert_int_equal(s.stop_at, want_stop);
    assert_int_equal(s.len, want_len);
    assert_memory_equal(s.text, ref.text, want_len);
    for (size_t i = 0; i <= n; i++) {
        assert_true(s.released_at[i] <= want_len);
        /* never hold back more than a stop could need */
        if (i < n && i < want_stop) {
            size_t hold = ref.released_at[i] - s.released_at[i];
            size_t longest = 0;
            for (size_t k = 0; k < n_stops; k++)
                if (strlen(stops[k]) > longest) longest = strlen(stops[k]);
            assert_true(hold < (longest > 0 ? longest : 1));
        }
    }
    char *out = strndup(s.text, s.len);
    streamed_free(&ref);
    streamed_free(&s);
    free(ids);
    return out;
}

static const char *const k_tokenizers[] = {
    "models/stories260K/tok512.bin",
    "tokenizers/llama2c/tokenizer.bin",
    "tokenizers/gpt2/tokenizer.json",
    "tokenizers/llama2-spm/tokenizer.json",
    "tokenizers/llama3-style-tiny/tokenizer.json",
};

static void t_text_stops(void **state)
{
    (void)state;
    const char *story = "Once upon a time, there was a little girl named Lily. She loved to play "
                        "outside.\n\nThe end. Grüße aus Köln 😀 東京 — ok?";
    static const struct {
        const char *stops[4];
        size_t n;
        const char *want; /* the text (after its leading space, if any) up to the stop */
    } cases[] = {
        {{"little girl"}, 1, "Once upon a time, there was a "},
        {{"Lily", "time"}, 2, "Once upon a "}, /* the first to complete */
        {{"ime, th", "upon a"}, 2, "Once "},   /* earliest completion wins */
        {{"\n\n"},
         1,
         "Once upon a time, there was a little girl named Lily. She loved to play "
         "outside."},
        {{"Köln"}, 1, NULL}, /* multi-byte stop */
        {{"😀"}, 1, NULL},    /* a stop inside one code point's bytes */
        {{"東"}, 1, NULL},
        {{"outside!", "Lily?", "ok!"}, 3, NULL}, /* begin but never complete: all released */
        {{"e", "Once"}, 2, NULL},
        {{"?"}, 1, NULL},
        {{"zzz"}, 1, NULL},
    };
    int loaded = 0;
    for (size_t k = 0; k < sizeof(k_tokenizers) / sizeof(k_tokenizers[0]); k++) {
        tok_tokenizer *tok = load_shared(k_tokenizers[k]);
        if (tok == NULL) continue;
        loaded++;
        for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
            char *out = check_stops(tok, story, cases[c].stops, cases[c].n);
            if (cases[c].want != NULL) {
                const char *o = out[0] == ' ' ? out + 1 : out;
                if (strcmp(o, cases[c].want))
                    print_message("%s case %zu: '%s'\n", k_tokenizers[k], c, o);
                assert_string_equal(o, cases[c].want);
            }
            free(out);
        }
        /* no stops: the stream is the decoded text */
        char *out = check_stops(tok, story, NULL, 0);
        const char *o = out[0] == ' ' ? out + 1 : out;
        assert_string_equal(o, story);
        free(out);
        tok_free(tok);
    }
    if (loaded == 0) print_message("skipping: no shared tokenizer found\n");
}

/* UTF-8 split across tokens (byte-fallback tokens in tok512: one per byte)
 * is never released half; held stop prefixes come out at finish. */
static void t_text_utf8_and_finish(void **state)
{
    (void)state;
    tok_tokenizer *tok = load_shared("models/stories260K/tok512.bin");
    if (tok == NULL) return;
    int32_t *ids;
    size_t n;
    const char *text = "é😀";
    assert_int_equal(tok_encode(tok, text, strlen(text), 0, &ids, &n), 0);
    assert_true(n >= 6); /* bytes, one token each */
    oai_text *t;
    assert_int_equal(oai_text_create(tok, NULL, 0, NULL, 0, &t), 0);
    size_t got = 0;
    for (size_t i = 0; i < n; i++) {
        const char *out;
        size_t len;
        bool stopped;
        assert_int_equal(oai_text_push(t, ids[i], &out, &len, &stopped), 0);
        assert_false(stopped);
        assert_true(len == 0 || valid_utf8(out, len));
        got += len;
    }
    const char *out;
    size_t len;
    assert_int_equal(oai_text_finish(t, &out, &len), 0);
    size_t all_len;
    const char *all = oai_text_all(t, &all_len);
    assert_non_null(strstr(all, "é😀"));
    assert_int_equal(oai_text_tokens(t), n);
    oai_text_free(t);

    /* an incomplete sequence at the end comes out as U+FFFD */
    assert_int_equal(oai_text_create(tok, NULL, 0, NULL, 0, &t), 0);
    bool stopped;
    for (size_t i = 0; i < n - 1; i++)
        assert_int_equal(oai_text_push(t, ids[i], &out, &len, &stopped), 0);
    assert_int_equal(oai_text_finish(t, &out, &len), 0);
    assert_true(len >= 3 && !memcmp(out + len - 3, "\xef\xbf\xbd", 3));
    /* after finish nothing more comes out */
    assert_int_equal(oai_text_push(t, ids[0], &out, &len, &stopped), 0);
    assert_int_equal(len, 0);
    oai_text_free(t);
    free(ids);

    /* a held stop prefix: released at finish, not before */
    const char *stops[] = {"Once upon a dragon"};
    assert_int_equal(oai_text_create(tok, stops, 1, NULL, 0, &t), 0);
    assert_int_equal(tok_encode(tok, "Hello. Once upon a", 18, 0, &ids, &n), 0);
    size_t released = 0;
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(oai_text_push(t, ids[i], &out, &len, &stopped), 0);
        released += len;
    }
    all = oai_text_all(t, &all_len);
    assert_int_equal(all_len, released);
    assert_true(all_len <= 8 && !memcmp(all, " Hello. ", all_len)); /* "Once upon a" is held */
    assert_int_equal(oai_text_finish(t, &out, &len), 0);
    assert_true(len >= 11 && !memcmp(out + len - 11, "Once upon a", 11));
    all = oai_text_all(t, &all_len);
    assert_string_equal(all, " Hello. Once upon a");
    oai_text_free(t);
    free(ids);
    tok_free(tok);
}

/* EOS and other ids the router names are not detokenized; ids outside the
 * vocabulary are refused; after a stop nothing more is released. */
static void t_text_skip_and_errors(void **state)
{
    (void)state;
    tok_tokenizer *tok = load_shared("tokenizers/gpt2/tokenizer.json");
    if (tok == NULL) return;
    int32_t *ids;
    size_t n;
    assert_int_equal(tok_encode(tok, "Hello world", 11, 0, &ids, &n), 0);
    int32_t skip[] = {ids[1]}; /* " world" */
    streamed s = run_stream(tok, ids, n, NULL, 0, skip, 1);
    assert_string_equal(s.text, "Hello");
    streamed_free(&s);
    /* EOS (<|endoftext|>, special) produces no text either */
    int32_t with_eos[] = {ids[0], tok_eos_id(tok)};
    s = run_stream(tok, with_eos, 2, NULL, 0, NULL, 0);
    assert_string_equal(s.text, "Hello");
    streamed_free(&s);

    oai_text *t;
    const char *stops[] = {"", "lo"};
    assert_int_equal(oai_text_create(tok, stops, 2, NULL, 0, &t), 0); /* "" ignored */
    const char *out;
    size_t len;
    bool stopped = false;
    assert_int_equal(oai_text_push(t, -1, &out, &len, &stopped), TD_ERANGE);
    assert_int_equal(oai_text_push(t, tok_vocab_size(tok), &out, &len, &stopped), TD_ERANGE);
    assert_int_equal(oai_text_tokens(t), 0);
    assert_int_equal(oai_text_push(t, ids[0], &out, &len, &stopped), 0);
    assert_true(stopped);
    assert_int_equal(len, 3);
    assert_memory_equal(out, "Hel", 3);
    assert_int_equal(oai_text_push(t, ids[1], &out, &len, &stopped), 0);
    assert_true(stopped);
    assert_int_equal(len, 0);
    assert_int_equal(oai_text_finish(t, &out, &len), 0);
    assert_int_equal(len, 0);
    size_t all_len;
    assert_string_equal(oai_text_all(t, &all_len), "Hel");
    assert_int_equal(oai_text_tokens(t), 1);
    oai_text_free(t);
    oai_text_free(NULL);

    assert_int_equal(oai_text_create(NULL, NULL, 0, NULL, 0, &t), TD_EINVAL);
    assert_int_equal(oai_text_create(tok, NULL, 1, NULL, 0, &t), TD_EINVAL);
    const char *null_stop[] = {NULL};
    assert_int_equal(oai_text_create(tok, null_stop, 1, NULL, 0, &t), TD_EINVAL);
    assert_int_equal(oai_text_push(NULL, 0, &out, &len, &stopped), TD_EINVAL);
    assert_int_equal(oai_text_finish(NULL, &out, &len), TD_EINVAL);
    assert_int_equal(oai_text_tokens(NULL), 0);
    free(ids);

    /* a long output grows the buffer */
    assert_int_equal(oai_text_create(tok, NULL, 0, NULL, 0, &t), 0);
    assert_int_equal(tok_encode(tok, " the", 4, 0, &ids, &n), 0);
    assert_int_equal(n, 1);
    for (int i = 0; i < 5000; i++)
        assert_int_equal(oai_text_push(t, ids[0], &out, &len, &stopped), 0);
    assert_int_equal(oai_text_finish(t, &out, &len), 0);
    oai_text_all(t, &all_len);
    assert_int_equal(all_len, 4 * 5000);
    oai_text_free(t);
    free(ids);
    tok_free(tok);
}

/* Every allocation failure gives TD_ENOMEM (a 500) or NULL, never a crash
 * or a leak (ASan checks the leaks). */
static void t_alloc_failures(void **state)
{
    (void)state;
    const char *body =
        "{\"model\": \"m\", \"messages\": [{\"role\": \"system\", \"content\": \"S\"}, "
        "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a\"}, "
        "{\"type\": \"text\", \"text\": \"b\"}]}], \"stop\": [\"x\", \"y\"], \"user\": \"u\"}";
    int failures = 0;
    for (long n = 0;; n++) {
        oai_request r;
        oai_error e;
        fail_alloc_arm(n);
        int rc = oai_parse(OAI_CHAT, body, strlen(body), &r, &e);
        long hits = fail_alloc_disarm();
        if (hits == 0) {
            assert_int_equal(rc, 0);
            oai_request_free(&r);
            break;
        }
        failures++;
        assert_int_equal(rc, TD_ENOMEM);
        assert_int_equal(e.status, 500);
        assert_null(r.model);
        oai_request_free(&r);
    }
    assert_true(failures >= 8);

    oai_meta m = {OAI_CHAT, "chatcmpl-1", "m", 1, true};
    oai_usage u = {1, 2};
    oai_timings tm = {0};
    oai_error e;
    oai_error_model(&e, "x");
    for (long n = 0; n < 4; n++) {
        char *outs[7];
        fail_alloc_arm(n);
        outs[0] = oai_chat_json(&m, "hello", 5, OAI_FINISH_STOP, &u, &tm);
        outs[1] = oai_completion_json(&m, "hello", 5, OAI_FINISH_STOP, &u, NULL);
        outs[2] = oai_chunk_json(&m, "hello", 5, true, OAI_FINISH_NONE, NULL);
        outs[3] = oai_usage_chunk_json(&m, &u, &tm);
        outs[4] = oai_sse_frame("{}");
        outs[5] = oai_sse_error(&e);
        outs[6] = oai_error_json(&e);
        long hits = fail_alloc_disarm();
        int nulls = 0;
        for (int i = 0; i < 7; i++) {
            nulls += outs[i] == NULL;
            free(outs[i]);
        }
        assert_int_equal(nulls, hits);
    }

    tok_tokenizer *tok = load_shared("models/stories260K/tok512.bin");
    if (tok == NULL) return;
    oai_request r;
    parse_ok(OAI_CHAT, body, &r);
    for (long n = 0;; n++) {
        int32_t *ids = NULL;
        size_t n_ids = 0;
        fail_alloc_arm(n);
        int rc = oai_prompt_tokens(tok, "message: {role}: {content}\n", &r, &ids, &n_ids, &e);
        long hits = fail_alloc_disarm();
        free(ids);
        if (hits == 0) {
            assert_int_equal(rc, 0);
            break;
        }
        assert_int_equal(rc, TD_ENOMEM);
        assert_int_equal(e.status, 500);
    }
    for (long n = 0;; n++) {
        char *p = NULL;
        fail_alloc_arm(n);
        int rc = oai_render_chat(tok, "family: chatml", &r, &p, &e);
        long hits = fail_alloc_disarm();
        free(p);
        if (hits == 0) {
            assert_int_equal(rc, 0);
            break;
        }
        assert_int_equal(rc, TD_ENOMEM);
    }
    oai_request_free(&r);

    int32_t *ids;
    size_t n_ids;
    assert_int_equal(tok_encode(tok, "Once upon a time", 16, 0, &ids, &n_ids), 0);
    const char *stops[] = {"a time", "zz"};
    int32_t skip[] = {2};
    for (long n = 0;; n++) {
        oai_text *t = NULL;
        fail_alloc_arm(n);
        int rc = oai_text_create(tok, stops, 2, skip, 1, &t);
        long hits = fail_alloc_disarm();
        if (hits == 0) {
            assert_int_equal(rc, 0);
            oai_text_free(t);
            break;
        }
        assert_int_equal(rc, TD_ENOMEM);
        assert_null(t);
    }
    free(ids);
    tok_free(tok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_bad_inputs),
        cmocka_unit_test(t_parse_completions),
        cmocka_unit_test(t_parse_chat),
        cmocka_unit_test(t_error_helpers),
        cmocka_unit_test(t_responses),
        cmocka_unit_test(t_chunks),
        cmocka_unit_test(t_chat_templates),
        cmocka_unit_test(t_chat_real_templates),
        cmocka_unit_test(t_text_stops),
        cmocka_unit_test(t_text_utf8_and_finish),
        cmocka_unit_test(t_text_skip_and_errors),
        cmocka_unit_test(t_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Tests for engine/tokenizer: golden ids from llama.cpp's tokenizer tests on
 * real vocabularies, round trips, pre-tokenizer regexes, special tokens, chat
 * templates, streaming detokenization and malformed files. Tests that need
 * the shared tokenizer files skip when they are absent. */
#include "engine/tokenizer/tok.h"
#include "engine/tokenizer/tok_internal.h"

#include "common/err.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <pthread.h>
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

/* ---------------------------------------------------------------- helpers */

static char g_shared[512];

static const char *shared(void)
{
    const char *d = getenv("TANDEM_SHARED_DIR");
    if (d == NULL || d[0] == '\0') d = TANDEM_SHARED_DIR;
    snprintf(g_shared, sizeof(g_shared), "%s", d);
    return g_shared;
}

/* Path under the shared directory, or NULL (and a skip message) if absent. */
static const char *shared_path(const char *rel, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/%s", shared(), rel);
    struct stat st;
    if (stat(buf, &st) != 0) {
        print_message("skipping: %s not found (shared test data absent)\n", buf);
        return NULL;
    }
    return buf;
}

static tok_tokenizer *load_shared(const char *rel)
{
    char buf[1024], err[512];
    const char *p = shared_path(rel, buf, sizeof(buf));
    if (p == NULL) return NULL;
    tok_tokenizer *t = NULL;
    int rc = tok_load(p, &t, err, sizeof(err));
    if (rc != 0) print_message("tok_load(%s): %s\n", p, err);
    assert_int_equal(rc, 0);
    assert_non_null(t);
    return t;
}

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    b[n] = '\0';
    fclose(f);
    if (len) *len = (size_t)n;
    return b;
}

static void write_file(const char *path, const char *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
}

static void write_str(const char *dir, const char *name, const char *s)
{
    char p[1024];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    write_file(p, s, strlen(s));
}

static char *make_tmpdir(void)
{
    char tmpl[] = "/tmp/tandem_tok_XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
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

static bool valid_utf8(const char *s, size_t n)
{
    size_t used;
    char *tmp = malloc(n * 3 + 1);
    size_t w = tok__utf8_sanitize((const uint8_t *)s, n, tmp, true, &used);
    bool ok = (w == n && memcmp(tmp, s, n) == 0);
    free(tmp);
    return ok;
}

static void encode(const tok_tokenizer *t, const char *text, int flags, int32_t **ids, size_t *n)
{
    assert_int_equal(tok_encode(t, text, strlen(text), flags, ids, n), 0);
}

static char *decode(const tok_tokenizer *t, const int32_t *ids, size_t n, int skip)
{
    char *s = NULL;
    size_t len = 0;
    assert_int_equal(tok_decode(t, ids, n, skip, &s, &len), 0);
    assert_int_equal(strlen(s), len);
    return s;
}

static void expect_ids(const tok_tokenizer *t, const char *text, int flags, const int32_t *want,
                       size_t n_want)
{
    int32_t *ids;
    size_t n;
    encode(t, text, flags, &ids, &n);
    if (n != n_want || (n > 0 && memcmp(ids, want, n * sizeof(int32_t)) != 0)) {
        print_message("encode(\"%s\"): got", text);
        for (size_t i = 0; i < n; i++)
            print_message(" %d", ids[i]);
        print_message("\n");
    }
    assert_int_equal(n, n_want);
    if (n > 0) assert_memory_equal(ids, want, n * sizeof(int32_t));
    free(ids);
}

static void expect_roundtrip(const tok_tokenizer *t, const char *text, int flags)
{
    int32_t *ids;
    size_t n;
    encode(t, text, flags, &ids, &n);
    char *s = decode(t, ids, n, 1);
    if (strcmp(s, text) != 0) print_message("round trip: \"%s\" -> \"%s\"\n", text, s);
    assert_string_equal(s, text);
    free(s);
    free(ids);
}

/* ------------------------------------------------------- golden id files */

typedef struct golden {
    char *inp_data;
    char *inputs[64];
    size_t n;
    char *out_data;
    char *lines[64];
    size_t n_lines;
} golden;

/* The .inp file is the test strings, each followed by
 * "\n__ggml_vocab_test__\n"; the .out file has one line of space-separated
 * ids per string. */
static bool golden_load(golden *g, const char *out_name)
{
    char buf[1024];
    memset(g, 0, sizeof(*g));
    if (!shared_path("tokenizers/golden/ggml-vocab-llama-spm.gguf.inp", buf, sizeof(buf)))
        return false;
    g->inp_data = read_all(buf, NULL);
    static const char sep[] = "\n__ggml_vocab_test__\n";
    char *p = g->inp_data, *q;
    while ((q = strstr(p, sep)) != NULL) {
        *q = '\0';
        assert_true(g->n < 64);
        g->inputs[g->n++] = p;
        p = q + strlen(sep);
    }
    assert_string_equal(p, ""); /* nothing after the last separator */
    snprintf(buf, sizeof(buf), "%s/tokenizers/golden/%s", shared(), out_name);
    g->out_data = read_all(buf, NULL);
    p = g->out_data;
    while (*p) {
        q = strchr(p, '\n');
        assert_non_null(q);
        *q = '\0';
        assert_true(g->n_lines < 64);
        g->lines[g->n_lines++] = p;
        p = q + 1;
    }
    assert_int_equal(g->n, 46);
    assert_int_equal(g->n_lines, g->n);
    return true;
}

static void golden_free(golden *g)
{
    free(g->inp_data);
    free(g->out_data);
}

static size_t parse_ids(const char *line, int32_t *ids, size_t cap)
{
    size_t n = 0;
    char *end;
    for (const char *p = line;;) {
        long v = strtol(p, &end, 10);
        if (end == p) break;
        assert_true(n < cap);
        ids[n++] = (int32_t)v;
        p = end;
    }
    return n;
}

/* exempt(text): true for inputs whose ids legitimately differ. */
static void check_golden(const tok_tokenizer *t, const char *out_name, bool lossless,
                         bool (*exempt)(const char *), size_t *n_exempt)
{
    golden g;
    if (!golden_load(&g, out_name)) return;
    if (n_exempt) *n_exempt = 0;
    for (size_t i = 0; i < g.n; i++) {
        int32_t want[512];
        size_t n_want = parse_ids(g.lines[i], want, 512);
        int32_t *ids;
        size_t n;
        encode(t, g.inputs[i], 0, &ids, &n);
        bool same = n == n_want && memcmp(ids, want, n * sizeof(int32_t)) == 0;
        if (exempt && exempt(g.inputs[i])) {
            /* must differ, or the exemption hides nothing and is wrong */
            assert_false(same);
            (*n_exempt)++;
        } else {
            if (!same) print_message("%s: case %zu \"%s\" differs\n", out_name, i, g.inputs[i]);
            assert_true(same);
        }
        if (lossless) {
            char *s = decode(t, ids, n, 1);
            if (strcmp(s, g.inputs[i]) != 0)
                print_message("%s: case %zu decodes to \"%s\"\n", out_name, i, s);
            assert_string_equal(s, g.inputs[i]);
            free(s);
        }
        free(ids);
    }
    golden_free(&g);
}

static void t_golden_gpt2_vocab_merges(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/gpt2/vocab.json");
    if (t == NULL) return;
    assert_int_equal(tok_vocab_size(t), 50257);
    assert_int_equal(tok_eos_id(t), 50256);
    check_golden(t, "ggml-vocab-gpt-2.gguf.out", true, NULL, NULL);
    tok_free(t);
}

/* gpt2/tokenizer.json adds tokens for runs of 2-31 spaces and 2-9 tabs;
 * tokenizers splits them out before BPE, so exactly the inputs holding such
 * a run get other (shorter) ids than pure GPT-2. */
static bool has_ws_run(const char *s)
{
    return strstr(s, "  ") != NULL || strstr(s, "\t\t") != NULL;
}

static void t_golden_gpt2_tokenizer_json(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/gpt2");
    if (t == NULL) return;
    size_t n_exempt = 0;
    check_golden(t, "ggml-vocab-gpt-2.gguf.out", true, has_ws_run, &n_exempt);
    assert_int_equal(n_exempt, 7);
    /* the added whitespace tokens are used, and still decode to spaces */
    int32_t want[] = {50286, 15496}; /* "  " + "Hello" */
    expect_ids(t, "  Hello", 0, want, 2);
    int32_t want2[] = {50285, 198, 50287}; /* "   " "\n" and nine tabs */
    expect_ids(t, "   \n\t\t\t\t\t\t\t\t\t", 0, want2, 3);
    expect_roundtrip(t, "   \n\t\t\t\t\t\t\t\t\t", 0);
    tok_free(t);
}

static void t_golden_llama_spm(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/llama2-spm");
    if (t == NULL) return;
    assert_int_equal(tok_vocab_size(t), 32011);
    assert_int_equal(tok_bos_id(t), 1);
    assert_int_equal(tok_eos_id(t), 32000); /* "<|endoftext|>" in this config */
    assert_false(tok_adds_bos(t));
    check_golden(t, "ggml-vocab-llama-spm.gguf.out", true, NULL, NULL);
    check_golden(t, "ggml-vocab-phi-3.gguf.out", true, NULL, NULL);
    tok_free(t);
}

/* The same vocabulary declared the older way: no normalizer, a Metaspace
 * pre-tokenizer (prepend at the start only, no split) and a Metaspace
 * decoder. Same ids; with split=true runs of spaces split apart. */
static char *metaspace_variant(bool split)
{
    char buf[1024];
    if (!shared_path("tokenizers/llama2-spm/tokenizer.json", buf, sizeof(buf))) return NULL;
    char *json = read_all(buf, NULL);
    cJSON *root = cJSON_Parse(json);
    free(json);
    assert_non_null(root);
    cJSON_ReplaceItemInObject(root, "normalizer", cJSON_CreateNull());
    cJSON *pre = cJSON_CreateObject();
    cJSON_AddStringToObject(pre, "type", "Metaspace");
    cJSON_AddStringToObject(pre, "replacement", "\xE2\x96\x81");
    cJSON_AddStringToObject(pre, "prepend_scheme", "first");
    cJSON_AddBoolToObject(pre, "split", split);
    cJSON_ReplaceItemInObject(root, "pre_tokenizer", pre);
    cJSON *dec = cJSON_CreateObject();
    cJSON_AddStringToObject(dec, "type", "Metaspace");
    cJSON_AddStringToObject(dec, "replacement", "\xE2\x96\x81");
    cJSON_AddStringToObject(dec, "prepend_scheme", "first");
    cJSON *seq = cJSON_CreateObject();
    cJSON_AddStringToObject(seq, "type", "Sequence");
    cJSON *decs = cJSON_AddArrayToObject(seq, "decoders");
    cJSON *bf = cJSON_CreateObject();
    cJSON_AddStringToObject(bf, "type", "ByteFallback");
    cJSON_AddItemToArray(decs, bf);
    cJSON_AddItemToArray(decs, dec);
    cJSON_ReplaceItemInObject(root, "decoder", seq);
    char *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    char *dir = make_tmpdir();
    write_str(dir, "tokenizer.json", out);
    free(out);
    return dir;
}

static void t_metaspace(void **state)
{
    char *dir = metaspace_variant(false);
    if (dir == NULL) return;
    tok_tokenizer *t = NULL;
    assert_int_equal(tok_load(dir, &t, NULL, 0), 0);
    check_golden(t, "ggml-vocab-llama-spm.gguf.out", true, NULL, NULL);
    tok_free(t);
    remove_tmpdir(dir);

    dir = metaspace_variant(true);
    assert_int_equal(tok_load(dir, &t, NULL, 0), 0);
    int32_t split[] = {29871, 29871, 15043}; /* "▁" "▁" "▁Hello", not "▁▁" "▁Hello" */
    expect_ids(t, "  Hello", 0, split, 3);
    expect_roundtrip(t, "  Hello   world \xE6\x88\x91", 0);
    tok_free(t);
    remove_tmpdir(dir);
}

/* llama2.c's score-driven merges give SentencePiece's ids on the same
 * Llama 2 vocabulary. */
static void t_golden_llama2c_bin(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/llama2c/tokenizer.bin");
    if (t == NULL) return;
    check_golden(t, "ggml-vocab-llama-spm.gguf.out", false, NULL, NULL);
    tok_free(t);
}

/* -------------------------------------------------------------- llama2.c */

static void t_l2c_tok512(void **state)
{
    tok_tokenizer *t = load_shared("models/stories260K/tok512.bin");
    if (t == NULL) return;
    assert_int_equal(tok_vocab_size(t), 512);
    assert_int_equal(tok_bos_id(t), 1);
    assert_int_equal(tok_eos_id(t), 2);
    assert_true(tok_adds_bos(t));
    assert_int_equal(tok_chat_family_of(t), TOK_CHAT_NONE);
    const char *text = "Once upon a time, there was a little girl named Lily. She loved to play "
                       "outside in the park.\nLily's mom said, \"Lily, let's go!\"";
    int32_t *ids;
    size_t n;
    encode(t, text, TOK_ADD_BOS, &ids, &n);
    assert_int_equal(ids[0], 1);
    assert_true(n > 10 && n < strlen(text));
    char *s = decode(t, ids, n, 1);
    assert_string_equal(s, text);
    free(s);
    /* without skipping, BOS shows as its piece and the next space is still
     * dropped, as llama2.c prints it */
    s = decode(t, ids, n, 0);
    assert_true(strncmp(s, "\n<s>\nOnce upon", 14) == 0);
    free(s);
    free(ids);
    /* "ж" is not among the 512 pieces: byte fallback, ids 3 + byte, after
     * the dummy-prefix space (410) */
    int32_t want[] = {1, 410, 3 + 0xD0, 3 + 0xB6};
    expect_ids(t, "\xD0\xB6", TOK_ADD_BOS, want, 4);
    encode(t, "\xD0\xB6", TOK_ADD_BOS, &ids, &n);
    s = decode(t, ids, n, 1);
    assert_string_equal(s, "\xD0\xB6");
    free(s);
    free(ids);
    tok_free(t);
}

static void t_l2c_32000(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/llama2c/tokenizer.bin");
    if (t == NULL) return;
    assert_int_equal(tok_vocab_size(t), 32000);
    int32_t hello[] = {1, 15043, 3186};
    expect_ids(t, "Hello world", TOK_ADD_BOS, hello, 3);
    int32_t once[] = {1, 9038, 2501, 263, 931};
    expect_ids(t, "Once upon a time", TOK_ADD_BOS, once, 5);
    expect_ids(t, "", 0, NULL, 0);
    int32_t bos_only[] = {1};
    expect_ids(t, "", TOK_ADD_BOS, bos_only, 1);
    char *s = decode(t, once, 5, 1);
    assert_string_equal(s, "Once upon a time");
    free(s);
    /* without BOS before it the dummy-prefix space stays (llama2.c) */
    s = decode(t, once + 1, 4, 1);
    assert_string_equal(s, " Once upon a time");
    free(s);
    /* <0x0A> decodes to a raw newline; 🦙 is four byte tokens */
    int32_t nl[] = {1, 15043, 13, 243, 162, 169, 156};
    s = decode(t, nl, 7, 1);
    assert_string_equal(s, "Hello\n\xF0\x9F\xA6\x99");
    free(s);
    expect_roundtrip(t, "", TOK_ADD_BOS);
    expect_roundtrip(t, "Grüße aus Köln 東京 🦙\tdone\n", TOK_ADD_BOS);
    tok_free(t);
}

/* --------------------------------------------------- pre-tokenizer regexes */

static void expect_split(enum tok__split k, const char *text, const char *const *want, size_t n)
{
    const uint8_t *u = (const uint8_t *)text;
    size_t len = strlen(text), i = 0, got = 0;
    while (i < len) {
        size_t l = tok__split_next(k, u, len, i);
        assert_true(l > 0);
        if (got >= n || strlen(want[got]) != l || memcmp(want[got], text + i, l) != 0) {
            print_message("split %d of \"%s\": piece %zu is \"%.*s\", want \"%s\"\n", (int)k, text,
                          got, (int)l, text + i, got < n ? want[got] : "(none)");
            fail();
        }
        got++;
        i += l;
    }
    assert_int_equal(got, n);
}

static void t_split_gpt2(void **state)
{
    const char *a[] = {"Hello", " world", " ", " foo", "'s", " 123", " !!", "\n\n", " x"};
    expect_split(TOK__SPLIT_GPT2, "Hello world  foo's 123 !!\n\n x", a, 9);
    const char *b[] = {"na\xC3\xAFve", " caf\xC3\xA9", " \xE6\x9D\xB1\xE4\xBA\xAC", "123", "   "};
    expect_split(TOK__SPLIT_GPT2,
                 "na\xC3\xAFve caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC"
                 "123   ",
                 b, 5);
    const char *c[] = {"I", "'", "M", " don", "'t"}; /* contractions are case-sensitive */
    expect_split(TOK__SPLIT_GPT2, "I'M don't", c, 5);
}

static void t_split_llama3(void **state)
{
    const char *a[] = {"Hello", " world", " ", " foo",    "'s", " ",
                       "123",   "456",    "7", " !!\n\n", " x", "\tabc"};
    expect_split(TOK__SPLIT_LLAMA3, "Hello world  foo's 1234567 !!\n\n x\tabc", a, 12);
    const char *b[] = {"I", "'M", " don", "'T"}; /* (?i:...) */
    expect_split(TOK__SPLIT_LLAMA3, "I'M don'T", b, 4);
    const char *c[] = {"\n\n\n", "foo", "  \n", " ", " x"};
    expect_split(TOK__SPLIT_LLAMA3, "\n\n\nfoo  \n  x", c, 5);
    const char *d[] = {"\xC2\xBFQu\xC3\xA9", "?", "  "}; /* ¿Qué? then trailing spaces */
    expect_split(TOK__SPLIT_LLAMA3, "\xC2\xBFQu\xC3\xA9?  ", d, 3);
    const char *e[] = {"1", "2", "3", "4", " ab"};
    expect_split(TOK__SPLIT_QWEN2, "1234 ab", e, 5);
    /* invalid bytes are "other" characters, never lost */
    const char *f[] = {"a", "\xFF\xFE", " b"};
    expect_split(TOK__SPLIT_LLAMA3, "a\xFF\xFE b", f, 3);
}

static void t_unicode_classes(void **state)
{
    assert_true(tok__is_letter('a') && tok__is_letter(0x00E9) && tok__is_letter(0x6771));
    assert_true(tok__is_letter(0x0416) && tok__is_letter(0x1780)); /* Ж, ក */
    assert_false(tok__is_letter('1') || tok__is_letter(' ') || tok__is_letter(0x1F600));
    assert_false(tok__is_letter(0x0301)); /* combining acute: Mn, not L */
    assert_true(tok__is_number('7') && tok__is_number(0x0663) && tok__is_number(0x00BD));
    assert_false(tok__is_number('a'));
    assert_true(tok__is_space('\n') && tok__is_space(0x3000) && tok__is_space(0x00A0));
    assert_false(tok__is_space(0x200B) || tok__is_space('x'));
    /* added in Unicode 15.0-16.0 (the tables' version is TOK__UNICODE_VERSION) */
    assert_string_equal(tok__unicode_version(), "16.0.0");
    assert_true(tok__is_letter(0x323AF) && tok__is_letter(0x2EE5D) && tok__is_letter(0x105C0));
    assert_true(tok__is_number(0x1E4F0) && !tok__is_letter(0x1E4F0));
    /* a letter, so "'s" after it is the contraction (GPT-2, as tokenizers 0.23) */
    tok_tokenizer *t = load_shared("tokenizers/gpt2");
    if (t == NULL) return;
    int32_t want[] = {172, 110, 236, 107, 338};
    expect_ids(t, "\xF0\xB2\x8E\xAF's", 0, want, 5);
    tok_free(t);
}

/* ------------------------------------------------ llama3-style tokenizer */

static void t_llama3_tiny(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/llama3-style-tiny");
    if (t == NULL) return;
    assert_int_equal(tok_vocab_size(t), 2000);
    /* tokenizer_config names "<|begin_of_sentence|>", which this vocabulary
     * lacks: no BOS, although generation_config.json's bos_token_id is 0
     * (the byte piece for 0x00, not a BOS token) */
    assert_int_equal(tok_bos_id(t), -1);
    assert_int_equal(tok_eos_id(t), -1);
    assert_false(tok_adds_bos(t));
    /* "Ġthe" (262) is one token; digits go in threes, spaces split as in
     * the Llama 3 regex */
    int32_t *ids;
    size_t n;
    encode(t, " the", 0, &ids, &n);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 262);
    free(ids);
    /* digits are pre-tokenized in threes: no token spans 123|456|7 */
    int32_t *parts;
    size_t n_parts, k = 0;
    encode(t, "1234567", 0, &ids, &n);
    const char *const groups[] = {"123", "456", "7"};
    for (int g = 0; g < 3; g++) {
        encode(t, groups[g], 0, &parts, &n_parts);
        assert_true(k + n_parts <= n);
        assert_memory_equal(ids + k, parts, n_parts * sizeof(int32_t));
        k += n_parts;
        free(parts);
    }
    assert_int_equal(k, n);
    free(ids);
    expect_roundtrip(t, "Hello world  foo's 1234567 !!\n\n x\tabc", 0);
    expect_roundtrip(t, "Grüße, 東京! 😶‍🌫️ e\xCC\x81 \xD9\xA3", 0);
    tok_free(t);
}

/* A copy of llama3-style-tiny with Llama 3's special tokens and chat
 * template, written to a temporary directory. */
static char *make_llama3_dir(void)
{
    char buf[1024];
    if (!shared_path("tokenizers/llama3-style-tiny/tokenizer.json", buf, sizeof(buf))) return NULL;
    char *json = read_all(buf, NULL);
    cJSON *root = cJSON_Parse(json);
    free(json);
    assert_non_null(root);
    cJSON *added = cJSON_GetObjectItem(root, "added_tokens");
    static const char *const names[] = {"<|begin_of_text|>", "<|end_of_text|>",
                                        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"};
    for (int i = 0; i < 5; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", 2000 + i);
        cJSON_AddStringToObject(a, "content", names[i]);
        cJSON_AddTrueToObject(a, "special");
        cJSON_AddItemToArray(added, a);
    }
    char *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    char *dir = make_tmpdir();
    write_str(dir, "tokenizer.json", out);
    free(out);
    write_str(dir, "tokenizer_config.json",
              "{\"add_bos_token\": true, \"bos_token\": \"<|begin_of_text|>\","
              "\"eos_token\": \"<|eot_id|>\", \"chat_template\": \"{% set loop_messages = "
              "messages %}{% for message in loop_messages %}{% set content = "
              "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
              "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set "
              "content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
              "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' "
              "}}{% endif %}\"}");
    write_str(dir, "generation_config.json",
              "{\"bos_token_id\": 2000, \"eos_token_id\": [2001, 2004]}");
    return dir;
}

static void t_llama3_special_and_chat(void **state)
{
    char *dir = make_llama3_dir();
    if (dir == NULL) return;
    char err[512];
    tok_tokenizer *t = NULL;
    int rc = tok_load(dir, &t, err, sizeof(err));
    if (rc) print_message("%s\n", err);
    assert_int_equal(rc, 0);
    assert_int_equal(tok_vocab_size(t), 2005);
    assert_int_equal(tok_bos_id(t), 2000);
    assert_int_equal(tok_eos_id(t), 2004);
    assert_true(tok_adds_bos(t));
    assert_true(tok_is_eog(t, 2004) && tok_is_eog(t, 2001));
    assert_false(tok_is_eog(t, 2000) || tok_is_eog(t, 262));
    assert_true(tok_is_special(t, 2002) && !tok_is_special(t, 262));
    assert_int_equal(tok_chat_family_of(t), TOK_CHAT_LLAMA3);

    const char *text = "<|start_header_id|>user<|end_header_id|>\n\nHi the<|eot_id|>";
    int32_t *ids;
    size_t n;
    encode(t, text, TOK_ADD_BOS | TOK_PARSE_SPECIAL, &ids, &n);
    assert_int_equal(ids[0], 2000);
    assert_int_equal(ids[1], 2002);
    assert_int_equal(ids[n - 1], 2004);
    size_t n_special = 0;
    for (size_t i = 0; i < n; i++)
        n_special += ids[i] >= 2000;
    assert_int_equal(n_special, 4);
    char *s = decode(t, ids, n, 0);
    assert_string_equal(
        s, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi the<|eot_id|>");
    free(s);
    s = decode(t, ids, n, 1);
    assert_string_equal(s, "user\n\nHi the");
    free(s);
    free(ids);
    /* without TOK_PARSE_SPECIAL the markers are plain text */
    encode(t, text, 0, &ids, &n);
    for (size_t i = 0; i < n; i++)
        assert_true(ids[i] < 2000);
    s = decode(t, ids, n, 1);
    assert_string_equal(s, text);
    free(s);
    free(ids);

    tok_chat_msg msgs[] = {{"system", "You are helpful. "}, {"user", " Hi"}};
    char *p = NULL;
    assert_int_equal(tok_chat_render(t, msgs, 2, 1, &p), 0);
    assert_string_equal(p, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are "
                           "helpful.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_"
                           "id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    /* the rendered prompt tokenizes with the markers as single ids */
    encode(t, p, TOK_PARSE_SPECIAL, &ids, &n);
    int count[5] = {0};
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 2000) count[ids[i] - 2000]++;
    assert_int_equal(ids[0], 2000);
    assert_int_equal(count[0], 1);
    assert_int_equal(count[1], 0);
    assert_int_equal(count[2], 3);
    assert_int_equal(count[3], 3);
    assert_int_equal(count[4], 2);
    free(ids);
    free(p);
    assert_int_equal(tok_chat_render(t, msgs, 2, 0, &p), 0);
    assert_non_null(strstr(p, "Hi<|eot_id|>"));
    assert_null(strstr(p, "assistant"));
    free(p);
    tok_chat_msg bad[] = {{"wizard", "x"}};
    assert_int_equal(tok_chat_render(t, bad, 1, 1, &p), TD_EINVAL);
    tok_free(t);
    remove_tmpdir(dir);
}

/* A directory holding a link to a shared tokenizer.json plus our config. */
static char *dir_with_config(const char *rel_json, const char *config)
{
    char buf[1024];
    if (!shared_path(rel_json, buf, sizeof(buf))) return NULL;
    char *dir = make_tmpdir();
    char link[1024];
    snprintf(link, sizeof(link), "%s/tokenizer.json", dir);
    assert_int_equal(symlink(buf, link), 0);
    write_str(dir, "tokenizer_config.json", config);
    return dir;
}

static void t_chat_llama2(void **state)
{
    char *dir = dir_with_config("tokenizers/llama2-spm/tokenizer.json",
                                "{\"bos_token\": {\"content\": \"<s>\"}, \"eos_token\": \"</s>\", "
                                "\"chat_template\": \"{% if messages[0]['role'] == 'system' %}... "
                                "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}\"}");
    if (dir == NULL) return;
    tok_tokenizer *t = NULL;
    assert_int_equal(tok_load(dir, &t, NULL, 0), 0);
    assert_int_equal(tok_chat_family_of(t), TOK_CHAT_LLAMA2);
    assert_false(tok_adds_bos(t)); /* no add_bos_token; this post-processor adds none */
    tok_chat_msg msgs[] = {
        {"system", "SYS"}, {"user", "Hi "}, {"assistant", " Hello!"}, {"user", "How?"}};
    char *p = NULL;
    assert_int_equal(tok_chat_render(t, msgs, 4, 1, &p), 0);
    assert_string_equal(p, "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] "
                           "How? [/INST]");
    free(p);
    assert_int_equal(tok_chat_render(t, msgs + 1, 1, 1, &p), 0);
    assert_string_equal(p, "<s>[INST] Hi [/INST]");
    free(p);
    tok_chat_msg bad[] = {{"user", "a"}, {"user", "b"}};
    assert_int_equal(tok_chat_render(t, bad, 2, 1, &p), TD_EINVAL);
    tok_free(t);
    remove_tmpdir(dir);
}

static void t_chat_chatml(void **state)
{
    char *dir = dir_with_config(
        "tokenizers/gpt2/tokenizer.json",
        "{\"chat_template\": [{\"name\": \"default\", \"template\": \"{% for message in messages "
        "%}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
        "are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
        "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\"}]}");
    if (dir == NULL) return;
    tok_tokenizer *t = NULL;
    assert_int_equal(tok_load(dir, &t, NULL, 0), 0);
    assert_int_equal(tok_chat_family_of(t), TOK_CHAT_CHATML);
    tok_chat_msg msgs[] = {{"user", " Hi "}};
    char *p = NULL;
    assert_int_equal(tok_chat_render(t, msgs, 1, 1, &p), 0);
    assert_string_equal(p, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n");
    free(p);
    tok_chat_msg sys[] = {{"system", "S"}, {"user", "U"}};
    assert_int_equal(tok_chat_render(t, sys, 2, 0, &p), 0);
    assert_string_equal(p, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
    free(p);
    tok_free(t);
    remove_tmpdir(dir);

    /* Qwen2.5's default system text, written with backslash-n escapes, and
     * a plain ChatML template without a default */
    static const struct {
        const char *config, *want;
    } cases[] = {
        {"{\"chat_template\": \"{%- if messages[0]['role'] == 'system' %}{%- else %}{{- "
         "'<|im_start|>system\\\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
         "assistant.<|im_end|>\\\\n' }}{%- endif %}\"}",
         "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
         "assistant.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"},
        {"{\"chat_template\": \"{% for message in messages %}{{'<|im_start|>' + message['role'] "
         "+ '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\"}",
         "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"},
    };
    for (size_t i = 0; i < 2; i++) {
        dir = dir_with_config("tokenizers/gpt2/tokenizer.json", cases[i].config);
        assert_int_equal(tok_load(dir, &t, NULL, 0), 0);
        assert_int_equal(tok_chat_family_of(t), TOK_CHAT_CHATML);
        assert_int_equal(tok_chat_render(t, msgs, 1, 1, &p), 0);
        assert_string_equal(p, cases[i].want);
        free(p);
        tok_free(t);
        remove_tmpdir(dir);
    }

    /* no chat template at all */
    t = load_shared("tokenizers/gpt2/vocab.json");
    if (t == NULL) return;
    assert_int_equal(tok_chat_family_of(t), TOK_CHAT_NONE);
    assert_int_equal(tok_chat_render(t, msgs, 1, 1, &p), TD_EUNSUPPORTED);
    tok_free(t);
}

/* ------------------------------------------------------ unicode, streams */

static const char *const unicode_texts[] = {
    "\xE6\x88\x91\xE6\x83\xB3\xE5\x9C\xA8\xE5\xB7\xA5\xE4\xBD\x9C",                    /* CJK */
    "emoji \xF0\x9F\xA6\x99\xF0\x9F\x98\xB6\xE2\x80\x8D\xF0\x9F\x8C\xAB\xEF\xB8\x8F!", /* ZWJ */
    "combining e\xCC\x81\xCC\x81 a\xCC\x8A and Hangul \xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB",
    "\xD0\xBD\xD0\xB5\xD1\x89\xD0\xBE \xE1\x9E\x80\xE1\x9E\xB6 \xD9\xA3\xD9\xA4 \xF0\x90\x8D\x88",
    "\t tabs\r\n and  runs   of    spaces     \n",
};

static void t_unicode_roundtrips(void **state)
{
    const char *paths[] = {"tokenizers/gpt2/vocab.json", "tokenizers/gpt2", "tokenizers/llama2-spm",
                           "tokenizers/llama3-style-tiny", "tokenizers/llama2c/tokenizer.bin"};
    for (size_t k = 0; k < 5; k++) {
        tok_tokenizer *t = load_shared(paths[k]);
        if (t == NULL) return;
        int flags = k == 4 ? TOK_ADD_BOS : 0;
        for (size_t i = 0; i < sizeof(unicode_texts) / sizeof(unicode_texts[0]); i++)
            expect_roundtrip(t, unicode_texts[i], flags);
        tok_free(t);
    }
}

/* Invalid UTF-8 is encoded through byte tokens, then decodes to U+FFFD. */
static void t_invalid_bytes(void **state)
{
    const char *paths[] = {"tokenizers/gpt2/vocab.json", "tokenizers/llama2-spm",
                           "tokenizers/llama2c/tokenizer.bin"};
    for (size_t k = 0; k < 3; k++) {
        tok_tokenizer *t = load_shared(paths[k]);
        if (t == NULL) return;
        int flags = k == 2 ? TOK_ADD_BOS : 0;
        const char text[] = "a\xFF"
                            "b\xE6\x88"
                            "c\xC0\xAF";
        int32_t *ids;
        size_t n;
        assert_int_equal(tok_encode(t, text, sizeof(text) - 1, flags, &ids, &n), 0);
        char *s = decode(t, ids, n, 1);
        /* U+FFFD for FF, for the truncated E6 88, and for C0 and AF each;
         * byte-fallback decoding (llama2-spm) gives one per byte of an
         * invalid run of <0xNN> tokens, as Hugging Face tokenizers does */
        if (k == 1)
            assert_string_equal(s, "a\xEF\xBF\xBD"
                                   "b\xEF\xBF\xBD\xEF\xBF\xBD"
                                   "c\xEF\xBF\xBD\xEF\xBF\xBD");
        else
            assert_string_equal(s, "a\xEF\xBF\xBD"
                                   "b\xEF\xBF\xBD"
                                   "c\xEF\xBF\xBD\xEF\xBF\xBD");
        free(s);
        free(ids);
        tok_free(t);
    }
}

/* A run of <0xNN> tokens that is not valid UTF-8 as a whole decodes to one
 * U+FFFD per byte, valid ASCII bytes of the run included; a valid run is
 * kept. Golden strings from Hugging Face tokenizers 0.23 (llama2-spm: <0xNN>
 * is id 3 + NN). */
static void t_byte_fallback_runs(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/llama2-spm");
    if (t == NULL) return;
    int32_t a[] = {258, 130}; /* FF 7F */
    char *s = decode(t, a, 2, 1);
    assert_string_equal(s, "\xEF\xBF\xBD\xEF\xBF\xBD");
    free(s);
    /* "▁a" FF 7F "b" E6 88 AF (valid: 戯) "c" E4 B8 80 C1 (invalid: 4 x U+FFFD) */
    int32_t b[] = {263, 258, 130, 29890, 233, 139, 178, 29883, 231, 187, 131, 196};
    s = decode(t, b, 12, 1);
    assert_string_equal(s, "a\xEF\xBF\xBD\xEF\xBF\xBD"
                           "b\xE6\x88\xAF"
                           "c\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
    free(s);
    /* a skipped special token does not break a run; a kept one does */
    int32_t c[] = {231, 32007, 187, 131};
    s = decode(t, c, 4, 1);
    assert_string_equal(s, "\xE4\xB8\x80");
    free(s);
    s = decode(t, c, 4, 0);
    assert_string_equal(s, "\xEF\xBF\xBD<|end|>\xEF\xBF\xBD\xEF\xBF\xBD");
    free(s);
    tok_free(t);
}

/* The decoding of ids under a byte-fallback decoder, written apart from
 * tok_decode to check it: pieces with U+2581 as a space, runs of <0xNN>
 * pieces kept when valid UTF-8 as a whole, else one U+FFFD per byte, one
 * leading space stripped, special tokens skipped. Returns a malloc'd string. */
static char *byte_runs_decode(const tok_tokenizer *t, const int32_t *ids, size_t n, size_t *len)
{
    char *raw = malloc(n * 64 + 1), run[256];
    size_t rn = 0, m = 0;
    assert_non_null(raw);
    for (size_t i = 0; i <= n; i++) {
        const char *p = NULL;
        size_t pl = 0;
        int byte = -1;
        if (i < n) {
            if (tok_is_special(t, ids[i])) continue;
            assert_int_equal(tok_piece(t, ids[i], &p, &pl), 0);
            byte = tok__parse_byte_piece(p, pl);
        }
        if (byte >= 0) {
            run[rn++] = (char)byte;
            continue;
        }
        if (valid_utf8(run, rn)) {
            memcpy(raw + m, run, rn);
            m += rn;
        } else {
            for (size_t k = 0; k < rn; k++, m += 3)
                memcpy(raw + m, "\xEF\xBF\xBD", 3);
        }
        rn = 0;
        for (size_t k = 0; k < pl;) {
            if (k + 3 <= pl && memcmp(p + k, "\xE2\x96\x81", 3) == 0) {
                raw[m++] = ' ';
                k += 3;
            } else {
                raw[m++] = p[k++];
            }
        }
    }
    size_t off = m > 0 && raw[0] == ' ' ? 1 : 0, used;
    char *out = malloc(3 * m + 1);
    assert_non_null(out);
    *len = tok__utf8_sanitize((const uint8_t *)raw + off, m - off, out, true, &used);
    out[*len] = '\0';
    free(raw);
    return out;
}

/* Pushes ids one by one; checks every chunk is valid UTF-8 and that the
 * whole equals expect. */
static void stream_all(const tok_tokenizer *t, const int32_t *ids, size_t n, const char *expect)
{
    tok_stream *st = NULL;
    assert_int_equal(tok_stream_create(t, &st), 0);
    char acc[4096], out[256];
    size_t acc_n = 0, w;
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(tok_stream_push(st, ids[i], out, sizeof(out), &w), 0);
        assert_int_equal(strlen(out), w);
        assert_true(valid_utf8(out, w));
        memcpy(acc + acc_n, out, w);
        acc_n += w;
    }
    assert_int_equal(tok_stream_flush(st, out, sizeof(out), &w), 0);
    memcpy(acc + acc_n, out, w);
    acc_n += w;
    acc[acc_n] = '\0';
    assert_string_equal(acc, expect);
    tok_stream_free(st);
}

static void t_stream(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/llama2-spm");
    if (t == NULL) return;
    const char *text = "A\xF0\x9F\x98\x81 B \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\xA6\x99!";
    int32_t *ids;
    size_t n;
    encode(t, text, TOK_ADD_BOS, &ids, &n);
    /* the emoji are spelled with byte tokens: a multi-byte char split across
     * ids */
    size_t n_bytes = 0;
    for (size_t i = 0; i < n; i++)
        n_bytes += ids[i] >= 3 && ids[i] <= 258;
    assert_true(n_bytes >= 8);
    /* after BOS the leading "▁" of the first piece is dropped */
    stream_all(t, ids, n, text);
    char *s = decode(t, ids, n, 1);
    assert_string_equal(s, text);
    free(s);

    /* nothing comes out until the 4th byte of 😁 arrives */
    tok_stream *st = NULL;
    assert_int_equal(tok_stream_create(t, &st), 0);
    int32_t emoji[] = {3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x81};
    char out[64];
    size_t w;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(tok_stream_push(st, emoji[i], out, sizeof(out), &w), 0);
        assert_int_equal(w, 0);
    }
    /* too small a buffer: TD_ERANGE and the id is not consumed */
    assert_int_equal(tok_stream_push(st, emoji[3], out, 4, &w), TD_ERANGE);
    assert_int_equal(tok_stream_push(st, emoji[3], out, 5, &w), 0);
    assert_string_equal(out, "\xF0\x9F\x98\x81");
    /* a sequence cut short by a new start is replaced, then a lone prefix is
     * flushed as U+FFFD */
    assert_int_equal(tok_stream_push(st, 3 + 0xE4, out, sizeof(out), &w), 0);
    assert_int_equal(w, 0);
    assert_int_equal(tok_stream_push(st, 3 + 0xE4, out, sizeof(out), &w), 0);
    assert_string_equal(out, "\xEF\xBF\xBD");
    assert_int_equal(tok_stream_push(st, 3 + 0xFF, out, sizeof(out), &w), 0);
    assert_string_equal(out, "\xEF\xBF\xBD\xEF\xBF\xBD"); /* E4 then FF */
    assert_int_equal(tok_stream_flush(st, out, sizeof(out), &w), 0);
    assert_int_equal(w, 0);
    assert_int_equal(tok_stream_push(st, 3 + 0xE4, out, sizeof(out), &w), 0);
    assert_int_equal(tok_stream_flush(st, out, sizeof(out), &w), 0);
    assert_string_equal(out, "\xEF\xBF\xBD");
    /* mid-text, a piece keeps its leading space */
    int32_t hello = 15043; /* "▁Hello" */
    assert_int_equal(tok_stream_push(st, hello, out, sizeof(out), &w), 0);
    assert_string_equal(out, " Hello");
    assert_int_equal(tok_stream_push(st, 99999, out, sizeof(out), &w), TD_ERANGE);
    tok_stream_free(st);
    tok_stream_free(NULL);
    free(ids);
    tok_free(t);

    /* byte-level: a CJK char split across byte-level symbols */
    t = load_shared("tokenizers/gpt2/vocab.json");
    if (t == NULL) return;
    text = "\xE6\x88\x91\xE6\x83\xB3\xE5\x9C\xA8 apple \xF0\x9F\x98\x81";
    encode(t, text, 0, &ids, &n);
    stream_all(t, ids, n, text);
    free(ids);
    tok_free(t);

    /* llama2.c: a stream starting at BOS drops the dummy-prefix space */
    t = load_shared("tokenizers/llama2c/tokenizer.bin");
    if (t == NULL) return;
    encode(t, "Once upon a time \xF0\x9F\xA6\x99", TOK_ADD_BOS, &ids, &n);
    stream_all(t, ids, n, "Once upon a time \xF0\x9F\xA6\x99");
    free(ids);
    tok_free(t);
}

/* Property test on random byte strings (letters, spaces, newlines, valid
 * multi-byte characters, stray continuation and lead bytes, NUL): decode of
 * encode is the input with invalid sequences replaced by U+FFFD, and a
 * stream of the same ids yields the same text in valid UTF-8 chunks. (Not
 * "</s>" of llama2-spm: a non-special added token with rstrip, which
 * swallows the white space after it, by design; nor U+2581 itself there,
 * which decodes to a space.) */
static void t_random_roundtrips(void **state)
{
    static const char *const units[] = {"a",
                                        "Z",
                                        "q",
                                        " ",
                                        "  ",
                                        "\n",
                                        "\t",
                                        "'s",
                                        "7",
                                        "42",
                                        "\xC3\xA9",
                                        "\xE6\x88\x91",
                                        "\xF0\x9F\x98\x81",
                                        "\xCC\x81",
                                        "\x80",
                                        "\xFF",
                                        "\xE6",
                                        "\xF0\x9F",
                                        ".",
                                        "<s>",
                                        "<|end|>",
                                        "\xE2\x96\x81",
                                        "<0x41>",
                                        "\0"};
    const size_t n_units = sizeof(units) / sizeof(units[0]);
    const char *paths[] = {"tokenizers/gpt2/vocab.json", "tokenizers/gpt2", "tokenizers/llama2-spm",
                           "tokenizers/llama3-style-tiny", "tokenizers/llama2c/tokenizer.bin"};
    const int flags[] = {0, 0, TOK_ADD_BOS, 0, TOK_ADD_BOS};
    uint64_t rng = 0x9E3779B97F4A7C15ULL;
    for (size_t k = 0; k < 5; k++) {
        tok_tokenizer *t = load_shared(paths[k]);
        if (t == NULL) return;
        for (int iter = 0; iter < 150; iter++) {
            char text[256];
            size_t len = 0;
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            size_t n = (rng >> 33) % 40;
            for (size_t u = 0; u < n; u++) {
                rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
                const char *x = units[(rng >> 33) % n_units];
                if (k == 2 && !strcmp(x, "\xE2\x96\x81")) x = "b";
                size_t xl = x[0] ? strlen(x) : 1; /* "\0" is one NUL byte */
                memcpy(text + len, x, xl);
                len += xl;
            }
            char want[1024];
            size_t used;
            size_t want_len = tok__utf8_sanitize((const uint8_t *)text, len, want, true, &used);
            int32_t *ids;
            size_t n_ids;
            assert_int_equal(tok_encode(t, text, len, flags[k], &ids, &n_ids), 0);
            char *got;
            size_t got_len;
            assert_int_equal(tok_decode(t, ids, n_ids, 1, &got, &got_len), 0);
            if (got_len != want_len || memcmp(got, want, want_len) != 0) {
                print_message("%s: random case %d (%zu bytes) does not round-trip\n", paths[k],
                              iter, len);
                for (size_t i = 0; i < len; i++)
                    print_message("%02x ", (uint8_t)text[i]);
                print_message("\n");
                for (size_t i = 0; i < n_ids; i++)
                    print_message("%d ", ids[i]);
                print_message("\n");
                for (size_t i = 0; i < got_len; i++)
                    print_message("%02x ", (uint8_t)got[i]);
                print_message("\n");
            }
            if (k == 2) { /* byte-fallback runs: see t_byte_fallback_runs */
                size_t twin_len;
                char *twin = byte_runs_decode(t, ids, n_ids, &twin_len);
                assert_int_equal(got_len, twin_len);
                assert_memory_equal(got, twin, twin_len);
                free(twin);
            } else {
                assert_int_equal(got_len, want_len);
                assert_memory_equal(got, want, want_len);
            }
            /* the stream emits each character once complete, so invalid
             * bytes follow the maximal-subpart rule there */
            tok_stream *st;
            assert_int_equal(tok_stream_create(t, &st), 0);
            char acc[1024], out[128];
            size_t acc_n = 0, w;
            for (size_t i = 0; i < n_ids; i++) {
                assert_int_equal(tok_stream_push(st, ids[i], out, sizeof(out), &w), 0);
                assert_true(valid_utf8(out, w));
                memcpy(acc + acc_n, out, w);
                acc_n += w;
            }
            assert_int_equal(tok_stream_flush(st, out, sizeof(out), &w), 0);
            memcpy(acc + acc_n, out, w);
            acc_n += w;
            assert_int_equal(acc_n, want_len);
            assert_memory_equal(acc, want, want_len);
            tok_stream_free(st);
            free(got);
            free(ids);
        }
        tok_free(t);
    }
}

/* ------------------------------------------------------- malformed input */

static void expect_load_error(const char *path, int want, const char *msg_part)
{
    char err[512] = "";
    tok_tokenizer *t = (tok_tokenizer *)0x1;
    int rc = tok_load(path, &t, err, sizeof(err));
    if (rc != want || strstr(err, msg_part) == NULL)
        print_message("tok_load(%s) = %d \"%s\", want %d \"...%s...\"\n", path, rc, err, want,
                      msg_part);
    assert_int_equal(rc, want);
    assert_null(t);
    assert_non_null(strstr(err, msg_part));
}

static void expect_json_error(const char *json, int want, const char *msg_part)
{
    char *dir = make_tmpdir();
    write_str(dir, "tokenizer.json", json);
    expect_load_error(dir, want, msg_part);
    remove_tmpdir(dir);
}

static void t_malformed_json(void **state)
{
    expect_json_error("{\"version\": \"1.0\"}", TD_EFORMAT, "no \"model\"");
    expect_json_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}}}", TD_EFORMAT,
                      "merges");
    expect_json_error("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", TD_EUNSUPPORTED,
                      "Unigram");
    expect_json_error("{\"model\": {\"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a c\"]}}",
                      TD_EFORMAT, "right part");
    expect_json_error("{\"model\": {\"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}}",
                      TD_EFORMAT, "merged piece");
    expect_json_error("{\"model\": {\"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"ab\"]}}",
                      TD_EFORMAT, "not two pieces");
    expect_json_error("{\"model\": {\"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [[\"a\"]]}}",
                      TD_EFORMAT, "merge 0");
    expect_json_error("{\"model\": {\"vocab\": {\"a\": -1}, \"merges\": []}}", TD_EFORMAT,
                      "no valid id");
    expect_json_error("{\"model\": {\"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []}}", TD_EFORMAT,
                      "twice");
    expect_json_error("{\"model\": {\"vocab\": {}, \"merges\": []}}", TD_EFORMAT, "empty");
    expect_json_error("{\"added_tokens\": [{\"id\": 5}], \"model\": {\"vocab\": {\"a\": 0}, "
                      "\"merges\": []}}",
                      TD_EFORMAT, "added token 0");
    expect_json_error("{\"pre_tokenizer\": {\"type\": \"Whitespace\"}, \"model\": {\"vocab\": "
                      "{\"a\": 0}, \"merges\": []}}",
                      TD_EUNSUPPORTED, "Whitespace");
    expect_json_error("{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": "
                      "\"\\\\w+\"}, \"behavior\": \"Isolated\"}, \"model\": {\"vocab\": "
                      "{\"a\": 0}, \"merges\": []}}",
                      TD_EUNSUPPORTED, "Split regex");
    expect_json_error("{\"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"model\": {\"vocab\": "
                      "{\"a\": 0}, \"merges\": []}}",
                      TD_EFORMAT, "byte 0x00");
    expect_json_error("{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": [], "
                      "\"continuing_subword_prefix\": \"##\"}}",
                      TD_EUNSUPPORTED, "##");

    /* a real tokenizer.json cut short */
    char buf[1024];
    if (!shared_path("tokenizers/llama3-style-tiny/tokenizer.json", buf, sizeof(buf))) return;
    size_t len;
    char *json = read_all(buf, &len);
    char *dir = make_tmpdir();
    char p[1024];
    snprintf(p, sizeof(p), "%s/tokenizer.json", dir);
    size_t cuts[] = {0, 1, 100, len / 2, len - 2};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        write_file(p, json, cuts[i]);
        /* an empty file is not sniffed as JSON: it reads as a bad tokenizer.bin */
        expect_load_error(p, TD_EFORMAT, cuts[i] == 0 ? "too short" : "not valid JSON");
    }
    /* a valid tokenizer.json beside a broken tokenizer_config.json */
    write_file(p, json, len);
    write_str(dir, "tokenizer_config.json", "{\"bos_token\": ");
    expect_load_error(dir, TD_EFORMAT, "tokenizer_config.json");
    free(json);
    remove_tmpdir(dir);
}

static void t_minimal_json(void **state)
{
    /* a hand-written vocabulary: unk for unknown characters, fused */
    char *dir = make_tmpdir();
    write_str(dir, "tokenizer.json",
              "{\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"fuse_unk\": true, "
              "\"vocab\": {\"<unk>\": 0, \"a\": 1, \"b\": 2, \"ab\": 3, \"aba\": 4},"
              " \"merges\": [\"a b\", \"ab a\"]}}");
    tok_tokenizer *t = NULL;
    assert_int_equal(tok_load(dir, &t, NULL, 0), 0);
    int32_t w0[] = {4};
    expect_ids(t, "aba", 0, w0, 1);
    int32_t w1[] = {3, 3}; /* rank 0 "a b" twice before "ab a" can apply */
    expect_ids(t, "abab", 0, w1, 2);
    int32_t w2[] = {3, 0, 1};
    expect_ids(t, "abxyza", 0, w2, 3);
    assert_int_equal(tok_bos_id(t), -1);
    int32_t with_bos[] = {1};
    expect_ids(t, "a", TOK_ADD_BOS, with_bos, 1); /* no BOS to add */
    tok_free(t);
    /* a post-processor that prepends <s> means add BOS by default */
    write_str(dir, "tokenizer.json",
              "{\"added_tokens\": [{\"id\": 5, \"content\": \"<s>\", \"special\": true}],"
              "\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": "
              "[{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": "
              "{\"id\": \"A\", \"type_id\": 0}}]},"
              "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2},"
              " \"merges\": [[\"a\", \"b\"]]}}");
    assert_int_equal(tok_load(dir, &t, NULL, 0), 0);
    assert_int_equal(tok_bos_id(t), 5);
    assert_true(tok_adds_bos(t));
    assert_int_equal(tok_vocab_size(t), 6);
    int32_t w3[] = {5, 2, 0};
    expect_ids(t, "aba", TOK_ADD_BOS, w3, 3);
    tok_free(t);
    remove_tmpdir(dir);
}

/* Words are merged one "▁word" at a time only when no piece could cross a
 * word start; a vocabulary with such a piece keeps whole-text merging. */
static void t_split_words(void **state)
{
    char *dir = make_tmpdir();
    write_str(dir, "tokenizer.json",
              "{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": "
              "\"Prepend\", \"prepend\": \"\xE2\x96\x81\"}, {\"type\": \"Replace\", \"pattern\": "
              "{\"String\": \" \"}, \"content\": \"\xE2\x96\x81\"}]},"
              "\"model\": {\"type\": \"BPE\", \"vocab\": {\"\xE2\x96\x81\": 0, \"a\": 1, "
              "\"b\": 2, \"a\xE2\x96\x81\": 3}, \"merges\": [\"a \xE2\x96\x81\"]}}");
    tok_tokenizer *t = NULL;
    assert_int_equal(tok_load(dir, &t, NULL, 0), 0);
    assert_false(t->split_words);
    int32_t want[] = {0, 3, 2}; /* "▁" "a▁" "b": the merge crosses "▁b" */
    expect_ids(t, "a b", 0, want, 3);
    tok_free(t);
    remove_tmpdir(dir);

    t = load_shared("tokenizers/llama2-spm");
    if (t == NULL) return;
    assert_true(t->split_words);
    tok_free(t);
    t = load_shared("tokenizers/llama2c/tokenizer.bin");
    if (t == NULL) return;
    assert_true(t->split_words);
    tok_free(t);
}

static void t_malformed_bin(void **state)
{
    char buf[1024];
    if (!shared_path("models/stories260K/tok512.bin", buf, sizeof(buf))) return;
    size_t len;
    char *bin = read_all(buf, &len);
    char *dir = make_tmpdir();
    char p[1024];
    snprintf(p, sizeof(p), "%s/tokenizer.bin", dir);
    size_t cuts[] = {2, 4, 10, 17, 20, 28, len / 2, len - 1};
    const char *msgs[] = {
        "too short", "at least", "truncated record", "at least", "truncated record", "has length",
        "",          ""};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        write_file(p, bin, cuts[i]);
        expect_load_error(p, TD_EFORMAT, msgs[i]);
    }
    /* a negative max_token_length */
    char bad[16] = {(char)0xff, (char)0xff, (char)0xff, (char)0xff};
    write_file(p, bad, sizeof(bad));
    expect_load_error(p, TD_EFORMAT, "max_token_length");
    free(bin);
    remove_tmpdir(dir);
}

/* Corrupted files load or fail cleanly; whatever loads encodes and decodes
 * without touching memory it should not (run under ASan). */
static void exercise(const tok_tokenizer *t)
{
    const char text[] = "Hello, world! \xE6\x88\x91 \xFF 123 <s>";
    int32_t *ids;
    size_t n;
    if (tok_encode(t, text, sizeof(text) - 1, TOK_ADD_BOS | TOK_PARSE_SPECIAL, &ids, &n) == 0) {
        char *s;
        size_t len;
        if (tok_decode(t, ids, n, 0, &s, &len) == 0) free(s);
        free(ids);
    }
}

static void t_fuzz_load(void **state)
{
    const char *files[] = {"tokenizers/llama3-style-tiny/tokenizer.json",
                           "models/stories260K/tok512.bin"};
    uint64_t rng = 12345;
    for (int f = 0; f < 2; f++) {
        char buf[1024];
        if (!shared_path(files[f], buf, sizeof(buf))) return;
        size_t len;
        char *orig = read_all(buf, &len);
        char *dir = make_tmpdir();
        char p[1024];
        snprintf(p, sizeof(p), "%s/%s", dir, f == 0 ? "tokenizer.json" : "tokenizer.bin");
        char *mut = malloc(len);
        assert_non_null(mut);
        int loaded = 0;
        for (int iter = 0; iter < 40; iter++) {
            memcpy(mut, orig, len);
            for (int k = 0; k < 1 + iter % 4; k++) {
                rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
                size_t at = (rng >> 20) % len;
                if (f == 1) {
                    mut[at] = (char)(rng >> 8);
                    continue;
                }
                /* JSON: letter for letter, so the file stays JSON but names,
                 * pieces and merges go wrong */
                while (at < len && !((mut[at] | 0x20) >= 'a' && (mut[at] | 0x20) <= 'z'))
                    at++;
                if (at < len) mut[at] = (char)('a' + (rng >> 8) % 26);
            }
            write_file(p, mut, len);
            tok_tokenizer *t = NULL;
            char err[256];
            int rc = tok_load(p, &t, err, sizeof(err));
            if (rc == 0) {
                loaded++;
                exercise(t);
                tok_free(t);
            } else {
                assert_true(rc < 0);
                assert_null(t);
                assert_true(err[0] != '\0');
            }
        }
        print_message("%s: %d of 40 mutants loaded\n", files[f], loaded);
        assert_true(loaded < 40); /* the mutations must reach the checks */
        free(mut);
        free(orig);
        remove_tmpdir(dir);
    }
}

/* One tokenizer, two threads encoding at once: same ids as alone. */
struct enc_job {
    const tok_tokenizer *t;
    const char *text;
    int32_t *ids;
    size_t n;
    int rc;
};

static void *enc_thread(void *arg)
{
    struct enc_job *j = arg;
    for (int i = 0; i < 20 && j->rc == 0; i++) {
        free(j->ids);
        j->rc = tok_encode(j->t, j->text, strlen(j->text), 0, &j->ids, &j->n);
    }
    return NULL;
}

static void t_threads(void **state)
{
    tok_tokenizer *t = load_shared("tokenizers/llama2-spm");
    if (t == NULL) return;
    const char *texts[2] = {"The quick brown fox \xE6\x88\x91 jumps over the lazy dog. ",
                            "Lorem ipsum dolor sit amet, \xF0\x9F\xA6\x99 consectetur."};
    struct enc_job jobs[2] = {{t, texts[0], NULL, 0, 0}, {t, texts[1], NULL, 0, 0}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, enc_thread, &jobs[i]), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(jobs[i].rc, 0);
        int32_t *ids;
        size_t n;
        encode(t, texts[i], 0, &ids, &n);
        assert_int_equal(n, jobs[i].n);
        assert_memory_equal(ids, jobs[i].ids, n * sizeof(int32_t));
        free(ids);
        free(jobs[i].ids);
    }
    tok_free(t);
}

static void t_api_errors(void **state)
{
    tok_tokenizer *t = NULL;
    char err[256];
    assert_int_equal(tok_load(NULL, &t, err, sizeof(err)), TD_EINVAL);
    expect_load_error("/nonexistent/tokenizer.json", TD_ENOENT, "no such");
    char *dir = make_tmpdir();
    expect_load_error(dir, TD_ENOENT, "no tokenizer.json");
    remove_tmpdir(dir);
    tok_free(NULL);
    assert_int_equal(tok_vocab_size(NULL), 0);
    assert_int_equal(tok_bos_id(NULL), -1);

    t = load_shared("tokenizers/llama2-spm");
    if (t == NULL) return;
    int32_t *ids;
    size_t n;
    assert_int_equal(tok_encode(t, NULL, 3, 0, &ids, &n), TD_EINVAL);
    assert_int_equal(tok_encode(t, NULL, 0, 0, &ids, &n), 0);
    assert_int_equal(n, 0);
    free(ids);
    int32_t bad[] = {15043, 40000};
    char *s;
    size_t len;
    assert_int_equal(tok_decode(t, bad, 2, 1, &s, &len), TD_ERANGE);
    bad[1] = -1;
    assert_int_equal(tok_decode(t, bad, 2, 1, &s, &len), TD_ERANGE);
    assert_int_equal(tok_decode(t, NULL, 0, 1, &s, &len), 0);
    assert_string_equal(s, "");
    free(s);
    const char *piece;
    assert_int_equal(tok_piece(t, 15043, &piece, &len), 0);
    assert_int_equal(len, 8);
    assert_memory_equal(piece, "\xE2\x96\x81Hello", 8);
    assert_int_equal(tok_piece(t, 32011, &piece, &len), TD_ERANGE);
    /* "</s>" is a non-special added token here: always split out; "<s>" is
     * special: only with TOK_PARSE_SPECIAL */
    int32_t w1[] = {15043, 2};
    expect_ids(t, "Hello</s>", 0, w1, 2);
    int32_t w2[] = {1, 15043};
    expect_ids(t, "<s>Hello", TOK_PARSE_SPECIAL, w2, 2);
    /* rstrip: <|end|> swallows the white space after it */
    int32_t w3[] = {32007, 15043};
    expect_ids(t, "<|end|>  \nHello", TOK_PARSE_SPECIAL, w3, 2);
    /* any Unicode white space, as Hugging Face tokenizers (golden ids) */
    expect_ids(t, "<|end|>\xC2\xA0\xE3\x80\x80Hello", TOK_PARSE_SPECIAL, w3, 2);
    int32_t w4[] = {2};
    expect_ids(t, "</s>\xC2\xA0", 0, w4, 1);
    int32_t w5[] = {2, 921};
    expect_ids(t, "</s>\xC2\x85\xE2\x80\xA8x", 0, w5, 2);
    /* U+200B is not white space */
    int32_t w6[] = {2, 29871, 30166};
    expect_ids(t, "</s>\xE2\x80\x8B", 0, w6, 3);
    tok_free(t);
}

static void t_check_model_vocab(void **state)
{
    tok_tokenizer *t = load_shared("models/stories260K/tok512.bin");
    if (t == NULL) return;
    char err[256] = "";
    assert_int_equal(tok_check_model_vocab(t, 512, 1, err, sizeof(err)), 0);
    assert_int_equal(tok_check_model_vocab(t, 512, 0, err, sizeof(err)), 0);
    /* a model larger than the tokenizer: refused when exact, else allowed */
    assert_int_equal(tok_check_model_vocab(t, 32000, 1, err, sizeof(err)), TD_EMISMATCH);
    assert_non_null(strstr(err, "the tokenizer has 512 tokens but the model 32000"));
    assert_int_equal(tok_check_model_vocab(t, 32000, 0, err, sizeof(err)), 0);
    /* a tokenizer larger than the model: always refused */
    assert_int_equal(tok_check_model_vocab(t, 256, 0, err, sizeof(err)), TD_EMISMATCH);
    assert_non_null(strstr(err, "512 tokens but the model only 256"));
    assert_int_equal(tok_check_model_vocab(NULL, 256, 0, err, sizeof(err)), TD_EINVAL);
    tok_free(t);
}

/* A little GGUF metadata writer for hand-made files. */
static size_t gg_put(char *b, size_t o, const void *p, size_t n)
{
    memcpy(b + o, p, n);
    return o + n;
}

static size_t gg_put_str(char *b, size_t o, const char *s)
{
    uint64_t l = strlen(s);
    o = gg_put(b, o, &l, 8);
    return gg_put(b, o, s, l);
}

/* Header with n_kv pairs, then one string pair KEY = VALUE (when key). */
static size_t gg_head(char *b, uint64_t n_kv, const char *key, const char *value)
{
    uint32_t v3 = 3, ts = 8;
    uint64_t nt = 0;
    size_t o = gg_put(b, 0, "GGUF", 4);
    o = gg_put(b, o, &v3, 4);
    o = gg_put(b, o, &nt, 8);
    o = gg_put(b, o, &n_kv, 8);
    if (key) {
        o = gg_put_str(b, o, key);
        o = gg_put(b, o, &ts, 4);
        o = gg_put_str(b, o, value);
    }
    return o;
}

/* The tokenizer inside a GGUF file: the shared stories260K.gguf holds the
 * same vocabulary as tok512.bin, so the ids must be the same; other models,
 * files without a vocabulary, truncated and mutated metadata are refused
 * cleanly. */
static void t_gguf(void **state)
{
    char gp[1024];
    if (!shared_path("models/stories260K-gguf/stories260K.gguf", gp, sizeof(gp))) return;
    tok_tokenizer *g = load_shared("models/stories260K-gguf/stories260K.gguf");
    tok_tokenizer *l = load_shared("models/stories260K/tok512.bin");
    if (l == NULL) {
        tok_free(g);
        return;
    }
    assert_int_equal(tok_vocab_size(g), 512);
    assert_int_equal(tok_bos_id(g), 1);
    assert_int_equal(tok_eos_id(g), 2);
    assert_true(tok_adds_bos(g));
    assert_true(tok_is_special(g, 0) && tok_is_special(g, 1) && tok_is_special(g, 2));
    assert_false(tok_is_special(g, 3) || tok_is_special(g, 403));
    const char *texts[] = {"Once upon a time, there was a little girl.", "", " two  spaces",
                           "\xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\xA6\x99\n\ttab"};
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        int32_t *a, *b;
        size_t na, nb;
        encode(g, texts[i], TOK_ADD_BOS, &a, &na);
        encode(l, texts[i], TOK_ADD_BOS, &b, &nb);
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, na * sizeof(int32_t));
        char *sa = decode(g, a, na, 1), *sb = decode(l, b, nb, 1);
        assert_string_equal(sa, sb);
        free(sa);
        free(sb);
        free(a);
        free(b);
    }
    tok_free(l);
    tok_free(g);

    char *dir = make_tmpdir();
    char p[1024], err[256];
    snprintf(p, sizeof(p), "%s/x.gguf", dir);
    char b[512];
    size_t n = gg_head(b, 1, "tokenizer.ggml.model", "gpt2");
    write_file(p, b, n);
    tok_tokenizer *t = NULL;
    assert_int_equal(tok_load(p, &t, err, sizeof(err)), TD_EUNSUPPORTED);
    assert_non_null(strstr(err, "'gpt2' is not supported"));
    n = gg_head(b, 1, "general.name", "no tokenizer here");
    write_file(p, b, n);
    assert_int_equal(tok_load(p, &t, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "no tokenizer.ggml"));
    n = gg_head(b, 2, "tokenizer.ggml.model", "llama"); /* a pair missing */
    write_file(p, b, n);
    assert_int_equal(tok_load(p, &t, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "past the file's end"));
    /* truncations and mutations of the real metadata (the first 8 KiB hold
     * the vocabulary) */
    size_t len;
    char *orig = read_all(gp, &len);
    size_t span = len < 8192 ? len : 8192;
    for (size_t cut = 0; cut < span; cut += 61) {
        write_file(p, orig, cut);
        assert_true(tok_load(p, &t, err, sizeof(err)) < 0);
        assert_null(t);
    }
    char *mut = malloc(len);
    assert_non_null(mut);
    uint64_t rng = 777;
    int loaded = 0;
    for (int iter = 0; iter < 60; iter++) {
        memcpy(mut, orig, len);
        for (int k = 0; k < 1 + iter % 3; k++) {
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            mut[(rng >> 20) % span] = (char)(rng >> 8);
        }
        write_file(p, mut, len);
        int rc = tok_load(p, &t, err, sizeof(err));
        if (rc == 0) {
            loaded++;
            exercise(t);
            tok_free(t);
            t = NULL;
        } else {
            assert_true(rc < 0);
            assert_true(err[0] != '\0');
        }
    }
    print_message("stories260K.gguf: %d of 60 mutants loaded\n", loaded);
    free(mut);
    free(orig);
    remove_tmpdir(dir);
}

static void t_parse_id(void **state)
{
    int32_t id = -1;
    assert_int_equal(tok_parse_id("403", 3, 512, &id), 0);
    assert_int_equal(id, 403);
    assert_int_equal(tok_parse_id("0", 1, 1, &id), 0);
    assert_int_equal(id, 0);
    assert_int_equal(tok_parse_id("0007", 4, 512, &id), 0);
    assert_int_equal(id, 7);
    /* only whole decimals: no trailing text, sign, space, fraction */
    const char *bad[] = {"12abc", "1.5", "-1", "+3", " 4", "4 ", "", "0x10", "abc", "1e3"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        id = -7;
        assert_int_equal(tok_parse_id(bad[i], strlen(bad[i]), 512, &id), TD_EINVAL);
        assert_int_equal(id, -7);
    }
    /* in range: below n_vocab, and no overflow on long numbers */
    assert_int_equal(tok_parse_id("512", 3, 512, &id), TD_ERANGE);
    assert_int_equal(tok_parse_id("99999999999999999999999", 23, 512, &id), TD_ERANGE);
    assert_int_equal(tok_parse_id("4294967296", 10, INT32_MAX, &id), TD_ERANGE);
    assert_int_equal(tok_parse_id("2147483646", 10, INT32_MAX, &id), 0);
    assert_int_equal(id, 2147483646);
    assert_int_equal(tok_parse_id("12,13", 2, 512, &id), 0); /* len bounds the text */
    assert_int_equal(id, 12);
    assert_int_equal(tok_parse_id(NULL, 0, 512, &id), TD_EINVAL);
}

/* lstrip: an added token swallows the Unicode white space before it. The
 * llama2-spm vocabulary with lstrip set on <|end|>; golden ids from Hugging
 * Face tokenizers 0.23 on the same file. */
static void t_added_lstrip(void **state)
{
    char buf[1024];
    if (!shared_path("tokenizers/llama2-spm/tokenizer.json", buf, sizeof(buf))) return;
    char *json = read_all(buf, NULL);
    cJSON *root = cJSON_Parse(json);
    free(json);
    assert_non_null(root);
    cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(root, "added_tokens"))
    {
        if (cJSON_GetObjectItem(it, "id")->valueint == 32007)
            cJSON_ReplaceItemInObject(it, "lstrip", cJSON_CreateTrue());
    }
    char *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    char *dir = make_tmpdir();
    write_str(dir, "tokenizer.json", out);
    free(out);
    tok_tokenizer *t = NULL;
    char err[512];
    assert_int_equal(tok_load(dir, &t, err, sizeof(err)), 0);
    int32_t w1[] = {6324, 32007, 921};
    expect_ids(t, "Hi\xE2\x80\x83\xC2\xA0 <|end|>x", TOK_PARSE_SPECIAL, w1, 3);
    expect_ids(t, "Hi \xE3\x80\x80<|end|>\xC2\xA0x", TOK_PARSE_SPECIAL, w1, 3);
    int32_t w2[] = {263, 30166, 32007};
    expect_ids(t, "a\xE2\x80\x8B<|end|>", TOK_PARSE_SPECIAL, w2, 3);
    tok_free(t);
    remove_tmpdir(dir);
}

/* Stop strings on text: the earliest match wins; a streaming caller holds
 * back a possible start of a stop string. */
static void t_stop_strings(void **state)
{
    (void)state;
    const char *stops[2] = {"\n\n", "The end"};
    const char *text = "Once upon a time.\n\nThe end";
    size_t cut = 99;
    assert_int_equal(tok_stop_find(text, strlen(text), stops, 2, &cut), 1);
    assert_int_equal(cut, 17);
    assert_int_equal(tok_stop_find("abc", 3, stops, 2, &cut), 0);
    const char *t2 = "Happy. The end";
    assert_int_equal(tok_stop_find(t2, strlen(t2), stops, 2, &cut), 1);
    assert_int_equal(cut, 7);
    /* the earlier of two overlapping matches, whatever their order in stops */
    const char *ov[3] = {"cd", "", "bc"};
    assert_int_equal(tok_stop_find("abcde", 5, ov, 3, &cut), 1);
    assert_int_equal(cut, 1);
    assert_int_equal(tok_stop_find("abcde", 5, ov + 1, 1, &cut), 0); /* empty never matches */
    assert_int_equal(tok_stop_find("", 0, stops, 2, &cut), 0);
    /* Hold back a possible start of a stop string. */
    assert_int_equal(tok_stop_holdback("so The e", 8, stops, 2), 5);
    assert_int_equal(tok_stop_holdback("line\n", 5, stops, 2), 1);
    assert_int_equal(tok_stop_holdback("plain", 5, stops, 2), 0);
    assert_int_equal(tok_stop_holdback("", 0, stops, 2), 0);
    assert_int_equal(tok_stop_holdback("Th", 2, stops, 2), 2); /* text shorter than the stop */
    assert_int_equal(tok_stop_holdback("The end", 7, stops, 2),
                     0); /* complete: not a proper prefix */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_unicode_classes),
        cmocka_unit_test(t_split_gpt2),
        cmocka_unit_test(t_split_llama3),
        cmocka_unit_test(t_l2c_tok512),
        cmocka_unit_test(t_l2c_32000),
        cmocka_unit_test(t_golden_gpt2_vocab_merges),
        cmocka_unit_test(t_golden_gpt2_tokenizer_json),
        cmocka_unit_test(t_golden_llama_spm),
        cmocka_unit_test(t_golden_llama2c_bin),
        cmocka_unit_test(t_metaspace),
        cmocka_unit_test(t_llama3_tiny),
        cmocka_unit_test(t_llama3_special_and_chat),
        cmocka_unit_test(t_chat_llama2),
        cmocka_unit_test(t_chat_chatml),
        cmocka_unit_test(t_unicode_roundtrips),
        cmocka_unit_test(t_byte_fallback_runs),
        cmocka_unit_test(t_invalid_bytes),
        cmocka_unit_test(t_stream),
        cmocka_unit_test(t_random_roundtrips),
        cmocka_unit_test(t_malformed_json),
        cmocka_unit_test(t_minimal_json),
        cmocka_unit_test(t_split_words),
        cmocka_unit_test(t_malformed_bin),
        cmocka_unit_test(t_fuzz_load),
        cmocka_unit_test(t_threads),
        cmocka_unit_test(t_api_errors),
        cmocka_unit_test(t_added_lstrip),
        cmocka_unit_test(t_parse_id),
        cmocka_unit_test(t_check_model_vocab),
        cmocka_unit_test(t_gguf),
        cmocka_unit_test(t_stop_strings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Unit tests for loadtest/lt_prompt: token-id prompts, and exact token counts
 * with the real tokenizers in the shared folder (when the tokenizer library is
 * built in and the files are present). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/err.h"
#include "loadtest/lt_prompt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef TANDEM_LT_HAVE_TOKENIZER
#include "engine/tokenizer/tok.h"
#endif

static void test_id_prompts(void **state)
{
    (void)state;
    lt_prompt *p;
    assert_int_equal(lt_prompt_create_ids(-1, 10, &p), TD_EINVAL);
    assert_int_equal(lt_prompt_create_ids(INT32_MAX - 3, 10, &p), TD_EINVAL);
    assert_int_equal(lt_prompt_create_ids(100, 10, &p), 0);
    assert_false(lt_prompt_is_text(p));
    char *t;
    size_t len;
    assert_int_equal(lt_prompt_text(p, 1, 0, NULL, &t, &len), 0);
    assert_string_equal(t, "100");
    free(t);
    /* Variant 0x3f2 in base 16, first digit first: 2, 15, 3, 0, 0, 0. */
    assert_int_equal(lt_prompt_text(p, 9, 0x3f2, NULL, &t, &len), 0);
    assert_string_equal(t, "102,115,103,100,100,100,100,100,100");
    assert_int_equal(len, strlen(t));
    free(t);
    assert_int_equal(lt_prompt_text(p, 0, 5, NULL, &t, &len), 0); /* at least one token */
    assert_string_equal(t, "105");
    free(t);
    assert_int_equal(lt_prompt_text(p, 50, 0, NULL, &t, &len), 0); /* capped at the maximum */
    assert_int_equal(len, 10 * 4 - 1);
    free(t);
    uint32_t ids[16];
    assert_int_equal(lt_prompt_ids(p, 8, 17, NULL, ids, 16), 8);
    assert_int_equal(ids[0], 101);
    assert_int_equal(ids[1], 101);
    assert_int_equal(ids[2], 100);
    assert_int_equal(ids[7], 100);
    assert_int_equal(lt_prompt_ids(p, 8, 17, NULL, ids, 4), 0); /* too small */
    lt_prompt_parts parts;
    lt_prompt_get(p, 9, 0x3f2, &parts);
    assert_int_equal(parts.head_len, 23);
    assert_int_equal(parts.tail_len, 12);
    assert_memory_equal(parts.tail, ",100,100,100", 12);
    int32_t count;
    assert_int_equal(lt_prompt_count(p, 3, 0, NULL, &count), TD_EUNSUPPORTED);
    lt_prompt_free(p);
    lt_prompt_free(NULL);
}

/* Requests with hash ids [7, 9] and [7, 10]: the first block is the same,
 * the second differs, the part past the ids is per request. */
static void test_shared_blocks_ids(void **state)
{
    (void)state;
    lt_prompt *p;
    assert_int_equal(lt_prompt_create_ids(100, 64, &p), 0);
    uint64_t ha[2] = {7, 9}, hb[2] = {7, 10};
    lt_prompt_shape sa = {.hashes = ha, .n_hash = 2, .block_tokens = 8};
    lt_prompt_shape sb = {.hashes = hb, .n_hash = 2, .block_tokens = 8};
    uint32_t a[20], b[20];
    assert_int_equal(lt_prompt_ids(p, 20, 1, &sa, a, 20), 20);
    assert_int_equal(lt_prompt_ids(p, 20, 2, &sb, b, 20), 20);
    assert_memory_equal(a, b, 8 * sizeof(uint32_t)); /* block 0: hash 7 */
    assert_int_equal(a[0], 107);
    assert_int_equal(a[1], 100);
    assert_int_equal(a[8], 109); /* block 1: hash 9 vs 10 */
    assert_int_equal(b[8], 110);
    assert_int_equal(a[16], 101); /* past the ids: the request's own variant */
    assert_int_equal(b[16], 102);
    char *t;
    size_t len;
    assert_int_equal(lt_prompt_text(p, 20, 1, &sa, &t, &len), 0);
    assert_string_equal(t, "107,100,100,100,100,100,100,100,109,100,100,100,100,100,100,100,"
                           "101,100,100,100");
    free(t);
    lt_prompt_free(p);
}

static const char *shared_dir(void)
{
    const char *d = getenv("TANDEM_SHARED_DIR");
    return d ? d : TANDEM_SHARED_DIR;
}

/* Builds prompts for many lengths and checks every count by encoding it
 * independently with the tokenizer library. */
static void check_tokenizer(const char *rel)
{
#ifdef TANDEM_LT_HAVE_TOKENIZER
    char path[1024];
    snprintf(path, sizeof(path), "%s/tokenizers/%s", shared_dir(), rel);
    if (access(path, R_OK) != 0) {
        print_message("skip: %s not present\n", path);
        return;
    }
    lt_prompt *p;
    char err[256] = "";
    int rc = lt_prompt_create_text(path, 3000, &p, err, sizeof(err));
    if (rc) print_message("%s: %s\n", path, err);
    assert_int_equal(rc, 0);
    assert_true(lt_prompt_is_text(p));
    tok_tokenizer *tok;
    assert_int_equal(tok_load(path, &tok, err, sizeof(err)), 0);
    int flags = tok_adds_bos(tok) && tok_bos_id(tok) >= 0 ? TOK_ADD_BOS : 0;
    static const int32_t lens[] = {1, 2, 3, 4, 6, 7, 16, 31, 100, 257, 472, 1087, 2048, 3000};
    static const uint64_t variants[] = {0, 1, 15, 16, 255, 4095, 123456789};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        for (size_t v = 0; v < sizeof(variants) / sizeof(variants[0]); v++) {
            char *t;
            size_t len;
            assert_int_equal(lt_prompt_text(p, lens[i], variants[v], NULL, &t, &len), 0);
            int32_t *ids = NULL;
            size_t n = 0;
            assert_int_equal(tok_encode(tok, t, len, flags, &ids, &n), 0);
            free(ids);
            if (!(flags && lens[i] == 1)) /* with BOS, one token is BOS plus a word */
                assert_int_equal((int32_t)n, lens[i]);
            int32_t count;
            assert_int_equal(lt_prompt_count(p, lens[i], variants[v], NULL, &count), 0);
            assert_int_equal(count, (int32_t)n);
            for (size_t k = 0; k < len; k++)
                assert_true(t[k] != '"' && t[k] != '\\' && (unsigned char)t[k] >= 0x20);
            free(t);
        }
    }
    /* Different requests get different first tokens (no shared KV prefix). */
    char *a, *b;
    size_t la, lb;
    assert_int_equal(lt_prompt_text(p, 100, 0, NULL, &a, &la), 0);
    assert_int_equal(lt_prompt_text(p, 100, 1, NULL, &b, &lb), 0);
    int32_t *ia = NULL, *ib = NULL;
    size_t na = 0, nb = 0;
    assert_int_equal(tok_encode(tok, a, la, flags, &ia, &na), 0);
    assert_int_equal(tok_encode(tok, b, lb, flags, &ib, &nb), 0);
    assert_true(lt_prompt_n_alt(p) >= 2);
    assert_true(ia[flags ? 1 : 0] != ib[flags ? 1 : 0]);
    free(ia);
    free(ib);
    free(a);
    free(b);
    /* Shared blocks with the real tokenizer: exact counts, and two requests
     * that share their first hash id share exactly that block's tokens. */
    uint64_t ha[3] = {5, 6, 70000}, hb[3] = {5, 8, 70000};
    lt_prompt_shape sa = {.hashes = ha, .n_hash = 3, .block_tokens = 16};
    lt_prompt_shape sb = {.hashes = hb, .n_hash = 3, .block_tokens = 16};
    char *ta, *tb;
    size_t lta, ltb;
    assert_int_equal(lt_prompt_text(p, 60, 1, &sa, &ta, &lta), 0);
    assert_int_equal(lt_prompt_text(p, 60, 2, &sb, &tb, &ltb), 0);
    int32_t *xa = NULL, *xb = NULL;
    size_t nxa = 0, nxb = 0;
    assert_int_equal(tok_encode(tok, ta, lta, flags, &xa, &nxa), 0);
    assert_int_equal(tok_encode(tok, tb, ltb, flags, &xb, &nxb), 0);
    assert_int_equal(nxa, 60);
    assert_int_equal(nxb, 60);
    assert_memory_equal(xa, xb, 16 * sizeof(int32_t));
    assert_true(xa[16] != xb[16]);
    int32_t cnt;
    assert_int_equal(lt_prompt_count(p, 60, 1, &sa, &cnt), 0);
    assert_int_equal(cnt, 60);
    free(xa);
    free(xb);
    free(ta);
    free(tb);
    print_message("%s: filler word '%s', %d head words, bos %s\n", rel, lt_prompt_word(p),
                  lt_prompt_n_alt(p), flags ? "yes" : "no");
    tok_free(tok);
    lt_prompt_free(p);
#else
    (void)rel;
#endif
}

static void test_text_prompts_real_tokenizers(void **state)
{
    (void)state;
#ifndef TANDEM_LT_HAVE_TOKENIZER
    lt_prompt *p = NULL;
    char err[128];
    assert_int_equal(lt_prompt_create_text("x", 10, &p, err, sizeof(err)), TD_EUNSUPPORTED);
    print_message("skip: built without the tokenizer library\n");
    skip();
#else
    check_tokenizer("gpt2/tokenizer.json");
    check_tokenizer("llama2-spm");
    check_tokenizer("llama3-style-tiny/tokenizer.json");
    check_tokenizer("llama2c/tokenizer.bin");
    lt_prompt *p = NULL;
    char err[256] = "";
    assert_true(lt_prompt_create_text("/nonexistent/tokenizer.json", 10, &p, err, sizeof(err)) < 0);
    assert_non_null(strstr(err, "/nonexistent"));
    assert_null(p);
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_id_prompts),
        cmocka_unit_test(test_shared_blocks_ids),
        cmocka_unit_test(test_text_prompts_real_tokenizers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

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
    assert_int_equal(lt_prompt_create_ids(100, 10, &p), 0);
    assert_false(lt_prompt_is_text(p));
    const char *t;
    size_t len;
    lt_prompt_get(p, 1, &t, &len);
    assert_int_equal(len, 3);
    assert_memory_equal(t, "100", 3);
    lt_prompt_get(p, 3, &t, &len);
    assert_int_equal(len, 11);
    assert_memory_equal(t, "100,100,100", 11);
    lt_prompt_get(p, 0, &t, &len); /* at least one token */
    assert_int_equal(len, 3);
    lt_prompt_get(p, 50, &t, &len); /* capped at the maximum */
    assert_int_equal(len, 10 * 4 - 1);
    int32_t count;
    assert_int_equal(lt_prompt_count(p, 3, &count), TD_EUNSUPPORTED);
    lt_prompt_free(p);
    lt_prompt_free(NULL);
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
    static const int32_t lens[] = {1, 2, 3, 4, 7, 16, 31, 100, 257, 472, 1087, 2048, 3000};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        const char *t;
        size_t len;
        lt_prompt_get(p, lens[i], &t, &len);
        int32_t *ids = NULL;
        size_t n = 0;
        assert_int_equal(tok_encode(tok, t, len, flags, &ids, &n), 0);
        free(ids);
        if (!(flags && lens[i] == 1)) /* with BOS, one token is BOS plus a word */
            assert_int_equal((int32_t)n, lens[i]);
        int32_t count;
        assert_int_equal(lt_prompt_count(p, lens[i], &count), 0);
        assert_int_equal(count, (int32_t)n);
        for (size_t k = 0; k < len; k++)
            assert_true(t[k] != '"' && t[k] != '\\' && (unsigned char)t[k] >= 0x20);
    }
    print_message("%s: filler word '%s', bos %s\n", rel, lt_prompt_word(p), flags ? "yes" : "no");
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
        cmocka_unit_test(test_text_prompts_real_tokenizers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

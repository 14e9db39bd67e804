/* mtm_formats: writers for Hugging Face directories and llama2.c files. */
#include "tools/mtm.h"

#include "common/err.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int mtm_fwrite(FILE *f, const void *p, size_t n, const char *path)
{
    if (n != 0 && fwrite(p, 1, n, f) != n) {
        fprintf(stderr, "make-test-model: write error on %s: %s\n", path, strerror(errno));
        return TD_EIO;
    }
    return 0;
}

/* mkdir -p for path (modifies a copy). */
static int make_dirs(const char *path)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) {
        fprintf(stderr, "make-test-model: bad directory path '%s'\n", path);
        return TD_EINVAL;
    }
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0') continue;
        char saved = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "make-test-model: cannot create %s: %s\n", buf, strerror(errno));
            return TD_EIO;
        }
        buf[i] = saved;
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "make-test-model: %s exists and is not a directory\n", path);
        return TD_EEXIST;
    }
    return 0;
}

static int join(char *out, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) {
        fprintf(stderr, "make-test-model: path too long: %s/%s\n", dir, name);
        return TD_ETOOLONG;
    }
    return 0;
}

/* ---- Hugging Face ---- */

typedef struct hf_tensor {
    char name[96];
    enum mtm_tensor kind;
    int layer;
    int permute_heads; /* > 0: permute rows to half-split RoPE order over this many heads */
    size_t rows, cols;
    size_t begin, end; /* byte offsets inside the shard's data section */
    int shard;
} hf_tensor;

static const char *dtype_name(enum mtm_dtype dt)
{
    return dt == MTM_F32 ? "F32" : dt == MTM_F16 ? "F16" : "BF16";
}

static size_t dtype_size(enum mtm_dtype dt)
{
    return dt == MTM_F32 ? 4 : 2;
}

/* The HF tensor list in file order. Returns the count (<= cap). */
static int hf_tensor_list(const mtm_shape *s, hf_tensor *t, int cap)
{
    int n = 0;
#define ADD(kind_, layer_, perm_, ...)                                                             \
    do {                                                                                           \
        if (n < cap) {                                                                             \
            memset(&t[n], 0, sizeof t[n]);                                                         \
            snprintf(t[n].name, sizeof t[n].name, __VA_ARGS__);                                    \
            t[n].kind = (kind_);                                                                   \
            t[n].layer = (layer_);                                                                 \
            t[n].permute_heads = (perm_);                                                          \
            mtm_tensor_dims(s, (kind_), &t[n].rows, &t[n].cols);                                   \
        }                                                                                          \
        n++;                                                                                       \
    } while (0)
    ADD(MTM_T_EMBED, -1, 0, "model.embed_tokens.weight");
    for (int l = 0; l < s->n_layers; l++) {
        const char *p = "model.layers";
        ADD(MTM_T_ATTN_NORM, l, 0, "%s.%d.input_layernorm.weight", p, l);
        ADD(MTM_T_WQ, l, s->n_heads, "%s.%d.self_attn.q_proj.weight", p, l);
        if (s->qkv_bias) ADD(MTM_T_BQ, l, s->n_heads, "%s.%d.self_attn.q_proj.bias", p, l);
        ADD(MTM_T_WK, l, s->n_kv_heads, "%s.%d.self_attn.k_proj.weight", p, l);
        if (s->qkv_bias) ADD(MTM_T_BK, l, s->n_kv_heads, "%s.%d.self_attn.k_proj.bias", p, l);
        ADD(MTM_T_WV, l, 0, "%s.%d.self_attn.v_proj.weight", p, l);
        if (s->qkv_bias) ADD(MTM_T_BV, l, 0, "%s.%d.self_attn.v_proj.bias", p, l);
        ADD(MTM_T_WO, l, 0, "%s.%d.self_attn.o_proj.weight", p, l);
        ADD(MTM_T_FFN_NORM, l, 0, "%s.%d.post_attention_layernorm.weight", p, l);
        ADD(MTM_T_W1, l, 0, "%s.%d.mlp.gate_proj.weight", p, l);
        ADD(MTM_T_W3, l, 0, "%s.%d.mlp.up_proj.weight", p, l);
        ADD(MTM_T_W2, l, 0, "%s.%d.mlp.down_proj.weight", p, l);
    }
    ADD(MTM_T_FINAL_NORM, -1, 0, "model.norm.weight");
    if (!s->tied) ADD(MTM_T_LM_HEAD, -1, 0, "lm_head.weight");
#undef ADD
    return n;
}

static void shard_name(char *out, size_t cap, int shard, int n_shards)
{
    if (n_shards == 1)
        snprintf(out, cap, "model.safetensors");
    else
        snprintf(out, cap, "model-%05d-of-%05d.safetensors", shard + 1, n_shards);
}

/* Appends printf output to buf[*pos..cap); TD_EINTERNAL when it does not fit. */
static int append(char *buf, size_t cap, size_t *pos, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int append(char *buf, size_t cap, size_t *pos, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *pos, cap - *pos, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= cap - *pos) {
        fprintf(stderr, "make-test-model: safetensors header overflow\n");
        return TD_EINTERNAL;
    }
    *pos += (size_t)n;
    return 0;
}

/* Builds shard's safetensors header: JSON padded with spaces so the data
 * section starts 64-byte aligned (the format allows trailing spaces; its
 * own writer aligns to 8), so a tensor whose offset is a multiple of 64
 * (all of them at the 15m shape) starts on a cache line when a loader uses
 * it in place in the mapping: 8-aligned F32 rows made half of the matmul's
 * 32-byte weight loads (every 64-byte one) straddle two lines.
 * *out malloc'd (caller frees), *len its length in bytes. */
static int st_header(const hf_tensor *t, int n, int shard, enum mtm_dtype dt, char **out,
                     size_t *len)
{
    /* Per entry: name (< 96) plus fixed text and four numbers of <= 20 digits. */
    size_t cap = 64 + (size_t)n * 256, pos = 0;
    char *h = malloc(cap + 64);
    if (!h) return TD_ENOMEM;
    int rc = append(h, cap, &pos, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n && rc == 0; i++) {
        if (t[i].shard != shard) continue;
        rc = append(h, cap, &pos, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%zu", t[i].name,
                    dtype_name(dt), t[i].rows);
        if (rc == 0 && t[i].cols != 1) rc = append(h, cap, &pos, ",%zu", t[i].cols);
        if (rc == 0)
            rc = append(h, cap, &pos, "],\"data_offsets\":[%zu,%zu]}", t[i].begin, t[i].end);
    }
    if (rc == 0) rc = append(h, cap, &pos, "}");
    if (rc != 0) {
        free(h);
        return rc;
    }
    while ((8 + pos) % 64 != 0)
        h[pos++] = ' ';
    *out = h;
    *len = pos;
    return 0;
}

/* config.json, written by hand so every field is under our control (floats
 * keep a decimal point, as transformers writes them). */
static int write_config(const mtm_shape *s, enum mtm_dtype dt, const char *path)
{
    static const char *arch[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
    static const char *type[] = {"llama", "mistral", "qwen2"};
    static const char *torch[] = {"float32", "float16", "bfloat16"};
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return TD_EIO;
    }
    fprintf(f, "{\n  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n", arch[s->arch],
            type[s->arch]);
    fprintf(f, "  \"hidden_size\": %d,\n  \"intermediate_size\": %d,\n", s->dim, s->hidden);
    fprintf(f, "  \"num_hidden_layers\": %d,\n  \"num_attention_heads\": %d,\n", s->n_layers,
            s->n_heads);
    fprintf(f, "  \"num_key_value_heads\": %d,\n", s->n_kv_heads);
    if (s->head_dim * s->n_heads != s->dim) fprintf(f, "  \"head_dim\": %d,\n", s->head_dim);
    fprintf(f, "  \"vocab_size\": %d,\n  \"max_position_embeddings\": %d,\n", s->vocab, s->seq_len);
    fprintf(f, "  \"rms_norm_eps\": %g,\n  \"rope_theta\": %.1f,\n", s->rms_eps, s->rope_theta);
    fprintf(f, "  \"tie_word_embeddings\": %s,\n  \"hidden_act\": \"silu\",\n",
            s->tied ? "true" : "false");
    if (s->arch == MTM_ARCH_LLAMA)
        fprintf(f, "  \"attention_bias\": %s,\n", s->qkv_bias ? "true" : "false");
    if (s->arch == MTM_ARCH_MISTRAL) fprintf(f, "  \"sliding_window\": null,\n");
    if (s->arch == MTM_ARCH_QWEN2) fprintf(f, "  \"use_sliding_window\": false,\n");
    fprintf(f, "  \"bos_token_id\": 1,\n  \"eos_token_id\": 2,\n  \"torch_dtype\": \"%s\"\n}\n",
            torch[dt]);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        fprintf(stderr, "make-test-model: write error on %s\n", path);
        return TD_EIO;
    }
    return 0;
}

static int write_small_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return TD_EIO;
    }
    int rc = mtm_fwrite(f, text, strlen(text), path);
    if (fclose(f) != 0 && rc == 0) rc = TD_EIO;
    return rc;
}

static int write_index(const hf_tensor *t, int n, int n_shards, size_t total, const char *path)
{
    char fname[64];
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return TD_EIO;
    }
    fprintf(f, "{\n  \"metadata\": {\"total_size\": %zu},\n  \"weight_map\": {\n", total);
    for (int i = 0; i < n; i++) {
        shard_name(fname, sizeof fname, t[i].shard, n_shards);
        fprintf(f, "    \"%s\": \"%s\"%s\n", t[i].name, fname, i + 1 < n ? "," : "");
    }
    fputs("  }\n}\n", f);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        fprintf(stderr, "make-test-model: write error on %s\n", path);
        return TD_EIO;
    }
    return 0;
}

/* Writes one tensor's bytes: canonical values, Q/K row permutation, dtype. */
static int write_tensor(FILE *f, const mtm_shape *s, uint64_t seed, enum mtm_dtype dt,
                        const hf_tensor *t, float *a, float *b, uint16_t *h, const char *path)
{
    size_t n = t->rows * t->cols;
    mtm_tensor_fill(s, seed, t->kind, t->layer, a);
    const float *src = a;
    if (t->permute_heads > 0) {
        mtm_permute_rope_rows(a, b, t->permute_heads, s->head_dim, t->cols);
        src = b;
    }
    if (dt == MTM_F32) return mtm_fwrite(f, src, n * sizeof(float), path);
    for (size_t i = 0; i < n; i++)
        h[i] = dt == MTM_F16 ? mtm_f32_to_f16(src[i]) : mtm_f32_to_bf16(src[i]);
    return mtm_fwrite(f, h, n * sizeof(uint16_t), path);
}

int mtm_write_hf(const mtm_shape *s, uint64_t seed, enum mtm_dtype dt, int n_shards,
                 const char *dir)
{
    int rc;
    hf_tensor *t = NULL;
    float *a = NULL, *b = NULL;
    uint16_t *h = NULL;
    char *hdr = NULL;
    FILE *f = NULL;
    mtm_vocab vocab = {0};
    char path[4096], fname[64];

    int n = hf_tensor_list(s, NULL, 0);
    if (n_shards < 1 || n_shards > n) {
        fprintf(stderr, "make-test-model: --shards must be in [1, %d] for shape %s\n", n, s->name);
        return TD_EINVAL;
    }
    if ((rc = make_dirs(dir)) != 0) return rc;
    rc = TD_ENOMEM;
    t = calloc((size_t)n, sizeof *t);
    if (!t) goto out;
    hf_tensor_list(s, t, n);

    /* Assign tensors to shards in order, cutting where the running byte count
     * passes k/n_shards of the total, and never leaving a shard empty. */
    size_t total = 0, max_elems = 0, esz = dtype_size(dt);
    for (int i = 0; i < n; i++) {
        total += t[i].rows * t[i].cols * esz;
        if (t[i].rows * t[i].cols > max_elems) max_elems = t[i].rows * t[i].cols;
    }
    size_t run = 0;
    int shard = 0;
    for (int i = 0; i < n; i++) {
        t[i].shard = shard;
        run += t[i].rows * t[i].cols * esz;
        int tensors_left = n - i - 1, shards_left = n_shards - shard - 1;
        if (shards_left > 0 &&
            ((double)run >= (double)total * (shard + 1) / n_shards || tensors_left == shards_left))
            shard++;
    }
    /* Offsets inside each shard's data section. */
    for (int sh = 0; sh < n_shards; sh++) {
        size_t off = 0;
        for (int i = 0; i < n; i++) {
            if (t[i].shard != sh) continue;
            t[i].begin = off;
            off += t[i].rows * t[i].cols * esz;
            t[i].end = off;
        }
    }

    a = malloc(max_elems * sizeof *a);
    b = malloc(max_elems * sizeof *b);
    h = malloc(max_elems * sizeof *h);
    if (!a || !b || !h) goto out;
    for (int sh = 0; sh < n_shards; sh++) {
        size_t hlen;
        if ((rc = st_header(t, n, sh, dt, &hdr, &hlen)) != 0) goto out;
        shard_name(fname, sizeof fname, sh, n_shards);
        if ((rc = join(path, sizeof path, dir, fname)) != 0) goto out;
        f = fopen(path, "wb");
        if (!f) {
            perror(path);
            rc = TD_EIO;
            goto out;
        }
        uint64_t len64 = hlen;
        if ((rc = mtm_fwrite(f, &len64, 8, path)) != 0 ||
            (rc = mtm_fwrite(f, hdr, hlen, path)) != 0)
            goto out;
        free(hdr);
        hdr = NULL;
        for (int i = 0; i < n; i++)
            if (t[i].shard == sh && (rc = write_tensor(f, s, seed, dt, &t[i], a, b, h, path)) != 0)
                goto out;
        int closed = fclose(f);
        f = NULL;
        if (closed != 0) {
            fprintf(stderr, "make-test-model: write error on %s\n", path);
            rc = TD_EIO;
            goto out;
        }
    }
    /* Rewriting a directory must not leave a stale weight file that a loader
     * would prefer (an old index) or find (an old single file). */
    if ((rc = join(path, sizeof path, dir, "model.safetensors.index.json")) != 0) goto out;
    if (n_shards > 1) {
        if ((rc = write_index(t, n, n_shards, total, path)) != 0) goto out;
        if ((rc = join(path, sizeof path, dir, "model.safetensors")) != 0) goto out;
    }
    if (unlink(path) != 0 && errno != ENOENT) {
        fprintf(stderr, "make-test-model: cannot remove stale %s: %s\n", path, strerror(errno));
        rc = TD_EIO;
        goto out;
    }
    if ((rc = join(path, sizeof path, dir, "config.json")) != 0 ||
        (rc = write_config(s, dt, path)) != 0)
        goto out;
    if ((rc = join(path, sizeof path, dir, "generation_config.json")) != 0 ||
        (rc = write_small_file(path, "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n")) != 0)
        goto out;
    if ((rc = mtm_vocab_build(s->vocab, seed, &vocab)) != 0) goto out;
    if ((rc = join(path, sizeof path, dir, "tokenizer.json")) != 0 ||
        (rc = mtm_write_tokenizer_json(&vocab, path)) != 0)
        goto out;
    if ((rc = join(path, sizeof path, dir, "tokenizer_config.json")) != 0 ||
        (rc = mtm_write_tokenizer_config(s, path)) != 0)
        goto out;
    rc = 0;
out:
    if (rc == TD_ENOMEM) fprintf(stderr, "make-test-model: out of memory\n");
    if (f) fclose(f);
    mtm_vocab_free(&vocab);
    free(hdr);
    free(h);
    free(b);
    free(a);
    free(t);
    return rc;
}

/* ---- llama2.c ---- */

int mtm_write_llama2c(const mtm_shape *s, uint64_t seed, const char *path)
{
    /* llama2.c fixes RoPE theta at 10000, eps at 1e-5, head size at
     * dim / n_heads, and has no biases: refuse what it cannot express. */
    const char *why = NULL;
    if (s->qkv_bias)
        why = "has q/k/v biases";
    else if (s->rope_theta != 10000.0)
        why = "has rope_theta other than 10000";
    else if (s->rms_eps != 1e-5)
        why = "has rms_norm_eps other than 1e-5";
    else if (s->head_dim * s->n_heads != s->dim)
        why = "has head_dim other than dim / n_heads";
    if (why) {
        fprintf(stderr, "make-test-model: shape %s %s, which the llama2c format cannot hold\n",
                s->name, why);
        return TD_EUNSUPPORTED;
    }

    int rc;
    char dir[4096], tokpath[4096];
    const char *slash = strrchr(path, '/');
    if (slash) {
        size_t dl = (size_t)(slash - path);
        if (dl >= sizeof dir) {
            fprintf(stderr, "make-test-model: path too long: %s\n", path);
            return TD_ETOOLONG;
        }
        memcpy(dir, path, dl);
        dir[dl] = '\0';
        if (dl == 0)
            snprintf(dir, sizeof dir, "/");
        else if ((rc = make_dirs(dir)) != 0)
            return rc;
    } else {
        snprintf(dir, sizeof dir, ".");
    }
    if ((rc = join(tokpath, sizeof tokpath, dir, "tokenizer.bin")) != 0) return rc;
    if (strcmp(tokpath, path) == 0) {
        fprintf(stderr, "make-test-model: --out must not be named tokenizer.bin\n");
        return TD_EINVAL;
    }

    size_t max_elems = 0;
    for (int k = 0; k < MTM_T_COUNT; k++) {
        size_t r, c;
        mtm_tensor_dims(s, (enum mtm_tensor)k, &r, &c);
        if (r * c > max_elems) max_elems = r * c;
    }
    size_t hd = (size_t)s->head_dim, freq_n = (size_t)s->seq_len * hd / 2;
    if (freq_n > max_elems) max_elems = freq_n;
    float *buf = malloc(max_elems * sizeof *buf);
    mtm_vocab vocab = {0};
    if (!buf) {
        fprintf(stderr, "make-test-model: out of memory\n");
        return TD_ENOMEM;
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        free(buf);
        return TD_EIO;
    }
    int32_t header[7] = {s->dim,     s->hidden,     s->n_layers,
                         s->n_heads, s->n_kv_heads, s->tied ? s->vocab : -s->vocab,
                         s->seq_len};
    if ((rc = mtm_fwrite(f, header, sizeof header, path)) != 0) goto out;

    /* Tensor order of llama2.c's checkpoint: per-layer kinds are stored as
     * one block each, layer after layer. */
    static const enum mtm_tensor order[] = {
        MTM_T_EMBED,    MTM_T_ATTN_NORM, MTM_T_WQ, MTM_T_WK, MTM_T_WV,         MTM_T_WO,
        MTM_T_FFN_NORM, MTM_T_W1,        MTM_T_W2, MTM_T_W3, MTM_T_FINAL_NORM,
    };
    for (size_t k = 0; k < sizeof order / sizeof order[0]; k++) {
        enum mtm_tensor kind = order[k];
        int per_layer = kind != MTM_T_EMBED && kind != MTM_T_FINAL_NORM;
        size_t r, c;
        mtm_tensor_dims(s, kind, &r, &c);
        for (int l = 0; l < (per_layer ? s->n_layers : 1); l++) {
            mtm_tensor_fill(s, seed, kind, per_layer ? l : -1, buf);
            if ((rc = mtm_fwrite(f, buf, r * c * sizeof *buf, path)) != 0) goto out;
        }
    }
    /* Legacy RoPE tables, [seq_len][hd/2] cos then sin. Readers ignore them
     * (they recompute), but the format has them. */
    for (int part = 0; part < 2; part++) {
        for (size_t p = 0; p < (size_t)s->seq_len; p++) {
            for (size_t i = 0; i < hd / 2; i++) {
                double freq = 1.0 / pow(10000.0, (double)(2 * i) / (double)hd);
                double ang = (double)p * freq;
                buf[p * (hd / 2) + i] = (float)(part == 0 ? cos(ang) : sin(ang));
            }
        }
        if ((rc = mtm_fwrite(f, buf, freq_n * sizeof *buf, path)) != 0) goto out;
    }
    if (!s->tied) {
        mtm_tensor_fill(s, seed, MTM_T_LM_HEAD, -1, buf);
        if ((rc = mtm_fwrite(f, buf, (size_t)s->vocab * (size_t)s->dim * sizeof *buf, path)) != 0)
            goto out;
    }
    int closed = fclose(f);
    f = NULL;
    if (closed != 0) {
        fprintf(stderr, "make-test-model: write error on %s\n", path);
        rc = TD_EIO;
        goto out;
    }
    if ((rc = mtm_vocab_build(s->vocab, seed, &vocab)) != 0) goto out;
    rc = mtm_write_tokenizer_bin(&vocab, tokpath);
out:
    if (f) fclose(f);
    mtm_vocab_free(&vocab);
    free(buf);
    return rc;
}

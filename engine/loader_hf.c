/* Hugging Face model directories: config.json + model.safetensors, or shards
 * listed in model.safetensors.index.json ("weight_map": {tensor: file}). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "engine/model_internal.h"

#define HF_MAX_JSON (64u << 20) /* bytes: config.json / index.json size limit */

static int hf__read_file(const char *path, char **out, size_t *len, char *err, size_t errlen)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        return td_err_fail(err, errlen, td_err_from_errno(e), "cannot open %s: %s", path,
                           strerror(e));
    }
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            if (cap >= HF_MAX_JSON) {
                free(buf);
                fclose(f);
                return td_err_fail(err, errlen, TD_EFORMAT, "%s is larger than %u bytes", path,
                                   HF_MAX_JSON);
            }
            cap = cap ? 2 * cap : 4096;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                return td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return td_err_fail(err, errlen, TD_EIO, "read error on %s", path);
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 0;
}

/* Integer field: *out keeps its value when absent; TD_EFORMAT when not an integer. */
static int hf__int(const cJSON *root, const char *key, int *out, int required, char *err,
                   size_t errlen)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) {
        if (required)
            return td_err_fail(err, errlen, TD_EFORMAT, "config.json: missing \"%s\"", key);
        return 0;
    }
    /* Range first: converting an out-of-range double to int is undefined. */
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= INT_MIN && v->valuedouble <= INT_MAX) ||
        v->valuedouble != (double)(int)v->valuedouble)
        return td_err_fail(err, errlen, TD_EFORMAT, "config.json: \"%s\" is not an integer", key);
    *out = (int)v->valuedouble;
    return 0;
}

static int hf__float(const cJSON *root, const char *key, float *out, char *err, size_t errlen)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v))
        return td_err_fail(err, errlen, TD_EFORMAT, "config.json: \"%s\" is not a number", key);
    *out = (float)v->valuedouble;
    return 0;
}

/* A token id field that may be an integer or a list of integers (first one kept). */
static void hf__token_id(const cJSON *root, const char *key, int32_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (cJSON_IsArray(v)) v = cJSON_GetArrayItem(v, 0);
    if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= INT32_MAX)
        *out = (int32_t)v->valuedouble;
}

/* rope_scaling: null, {"rope_type"|"type": "linear", "factor"} or "llama3"
 * with its frequency factors; anything else is refused rather than ignored
 * (ignoring it would silently change the model's output). */
static int hf__parse_rope_scaling(const cJSON *root, mdl_config *c, const char *path, char *err,
                                  size_t errlen)
{
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if (!rs || cJSON_IsNull(rs)) return 0;
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!cJSON_IsString(ty)) ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
    const char *type = cJSON_IsString(ty) ? ty->valuestring : "(none)";
    c->rope_factor = 1.0f;
    int rc = hf__float(rs, "factor", &c->rope_factor, err, errlen);
    if (rc != 0) return rc;
    if (strcmp(type, "default") == 0) return 0;
    if (!(c->rope_factor > 0.0f))
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: rope_scaling factor must be > 0", path);
    if (strcmp(type, "linear") == 0) {
        c->rope_scaling = MDL_ROPE_SCALING_LINEAR;
        return 0;
    }
    if (strcmp(type, "llama3") == 0) {
        c->rope_scaling = MDL_ROPE_SCALING_LLAMA3;
        c->rope_low_freq_factor = 1.0f;
        c->rope_high_freq_factor = 4.0f;
        c->rope_orig_max_pos = 8192;
        if ((rc = hf__float(rs, "low_freq_factor", &c->rope_low_freq_factor, err, errlen)) ||
            (rc = hf__float(rs, "high_freq_factor", &c->rope_high_freq_factor, err, errlen)) ||
            (rc = hf__int(rs, "original_max_position_embeddings", &c->rope_orig_max_pos, 0, err,
                          errlen)))
            return rc;
        if (!(c->rope_high_freq_factor > c->rope_low_freq_factor) ||
            !(c->rope_low_freq_factor > 0.0f) || c->rope_orig_max_pos <= 0)
            return td_err_fail(err, errlen, TD_EFORMAT, "%s: bad llama3 rope_scaling parameters",
                               path);
        return 0;
    }
    return td_err_fail(err, errlen, TD_EUNSUPPORTED,
                       "%s: rope_scaling type \"%s\" is not supported (linear, llama3 are)", path,
                       type);
}

static int hf__parse_config(const char *dir, mdl_config *c, char *err, size_t errlen)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    char *text = NULL;
    size_t len = 0;
    int rc = hf__read_file(path, &text, &len, err, errlen);
    if (rc != 0) return rc;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return td_err_fail(err, errlen, TD_EFORMAT, "%s is not a JSON object", path);
    }
    c->format = MDL_FORMAT_HF;
    c->rope_layout = MDL_ROPE_HALF;
    c->norm_eps = 1e-6f;
    c->max_seq_len = 2048;

    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    const cJSON *a0 = cJSON_IsArray(archs) ? cJSON_GetArrayItem(archs, 0) : NULL;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    const char *arch = cJSON_IsString(a0) ? a0->valuestring : NULL;
    const char *mtype = cJSON_IsString(mt) ? mt->valuestring : "";
    if (!arch) {
        if (strcmp(mtype, "llama") == 0)
            arch = "LlamaForCausalLM";
        else if (strcmp(mtype, "mistral") == 0)
            arch = "MistralForCausalLM";
        else if (strcmp(mtype, "qwen2") == 0)
            arch = "Qwen2ForCausalLM";
        else
            arch = mtype[0] ? mtype : "(none)";
    }
    snprintf(c->arch, sizeof(c->arch), "%s", arch);
    int is_qwen2 = strcmp(arch, "Qwen2ForCausalLM") == 0;
    if (strcmp(arch, "LlamaForCausalLM") != 0 && strcmp(arch, "MistralForCausalLM") != 0 &&
        !is_qwen2) {
        rc = td_err_fail(err, errlen, TD_EUNSUPPORTED,
                         "%s: unsupported architecture \"%s\" (supported: LlamaForCausalLM, "
                         "MistralForCausalLM, Qwen2ForCausalLM)",
                         path, arch);
        goto out;
    }
    c->qkv_bias = is_qwen2;
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (cJSON_IsString(act) && strcmp(act->valuestring, "silu") != 0) {
        rc = td_err_fail(err, errlen, TD_EUNSUPPORTED, "%s: unsupported hidden_act \"%s\"", path,
                         act->valuestring);
        goto out;
    }
    if ((rc = hf__parse_rope_scaling(root, c, path, err, errlen)) != 0) goto out;
    if ((rc = hf__int(root, "hidden_size", &c->dim, 1, err, errlen)) ||
        (rc = hf__int(root, "intermediate_size", &c->hidden_dim, 1, err, errlen)) ||
        (rc = hf__int(root, "num_hidden_layers", &c->n_layers, 1, err, errlen)) ||
        (rc = hf__int(root, "num_attention_heads", &c->n_heads, 1, err, errlen)) ||
        (rc = hf__int(root, "vocab_size", &c->vocab_size, 1, err, errlen)))
        goto out;
    c->n_kv_heads = c->n_heads;
    c->head_dim = (c->n_heads > 0) ? c->dim / c->n_heads : 0;
    if ((rc = hf__int(root, "num_key_value_heads", &c->n_kv_heads, 0, err, errlen)) ||
        (rc = hf__int(root, "head_dim", &c->head_dim, 0, err, errlen)) ||
        (rc = hf__int(root, "max_position_embeddings", &c->max_seq_len, 0, err, errlen)) ||
        (rc = hf__float(root, "rms_norm_eps", &c->norm_eps, err, errlen)) ||
        (rc = hf__float(root, "rope_theta", &c->rope_theta, err, errlen)))
        goto out;
    /* A sliding window shorter than the context changes attention; we do not
     * implement it, so we cap the context at the window instead. */
    const cJSON *sw = cJSON_GetObjectItemCaseSensitive(root, "sliding_window");
    const cJSON *usw = cJSON_GetObjectItemCaseSensitive(root, "use_sliding_window");
    if (cJSON_IsNumber(sw) && !cJSON_IsFalse(usw) && sw->valuedouble >= 1 &&
        sw->valuedouble < c->max_seq_len) {
        td_log_warn("model", "sliding_window_cap", "window=%d max_seq_len=%d", (int)sw->valuedouble,
                    c->max_seq_len);
        c->max_seq_len = (int)sw->valuedouble;
    }
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
    c->tied_output = cJSON_IsTrue(tie);
    hf__token_id(root, "bos_token_id", &c->bos_id);
    hf__token_id(root, "eos_token_id", &c->eos_id);
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    if (cJSON_IsArray(eos)) {
        for (const cJSON *it = eos->child ? eos->child->next : NULL;
             it && c->n_eos_extra < MDL_MAX_EOS; it = it->next)
            if (cJSON_IsNumber(it) && it->valuedouble >= 0 && it->valuedouble <= INT32_MAX)
                c->eos_extra[c->n_eos_extra++] = (int32_t)it->valuedouble;
    }
    rc = mdl__check_config(c, err, errlen);
out:
    cJSON_Delete(root);
    return rc;
}

static int hf__add_file(mdl_model *m, const char *path, char *err, size_t errlen)
{
    struct mdl__storage *s = m->storage;
    sft_file **nf = realloc(s->files, (s->n_files + 1) * sizeof(*nf));
    if (!nf) return td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
    s->files = nf;
    sft_file *f = NULL;
    int rc = sft_open(path, &f, err, errlen);
    if (rc != 0) return rc;
    s->files[s->n_files++] = f;
    return 0;
}

static int hf__open_weights(const char *dir, mdl_model *m, char *err, size_t errlen)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    FILE *probe = fopen(path, "rb");
    if (!probe) {
        snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        return hf__add_file(m, path, err, errlen);
    }
    fclose(probe);
    char *text = NULL;
    size_t len = 0;
    int rc = hf__read_file(path, &text, &len, err, errlen);
    if (rc != 0) return rc;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        cJSON_Delete(root);
        return td_err_fail(err, errlen, TD_EFORMAT, "%s: no \"weight_map\" object", path);
    }
    /* Open each distinct shard once, in order of first mention. A shard is
     * looked up among the distinct ones opened so far, not among all entries
     * before it: an index of n entries costs n x shards, not n^2. */
    int n_entries = cJSON_GetArraySize(wm);
    const char **opened = malloc(sizeof(*opened) * (size_t)(n_entries > 0 ? n_entries : 1));
    if (!opened) {
        cJSON_Delete(root);
        return td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
    }
    size_t n_opened = 0;
    rc = 0;
    for (const cJSON *it = wm->child; it && rc == 0; it = it->next) {
        if (!cJSON_IsString(it) || strchr(it->valuestring, '/') || it->valuestring[0] == '.') {
            /* before cJSON_Delete: it->string lives in root */
            rc = td_err_fail(err, errlen, TD_EFORMAT, "%s: bad shard name for \"%s\"", path,
                             it->string);
            break;
        }
        int seen = 0;
        for (size_t k = 0; k < n_opened && !seen; k++)
            seen = strcmp(opened[k], it->valuestring) == 0;
        if (seen) continue;
        opened[n_opened++] = it->valuestring;
        char shard[4096];
        snprintf(shard, sizeof(shard), "%s/%s", dir, it->valuestring);
        rc = hf__add_file(m, shard, err, errlen);
    }
    free(opened);
    cJSON_Delete(root);
    return rc;
}

static const sft_tensor *hf__find(const mdl_model *m, const char *name)
{
    for (size_t i = 0; i < m->storage->n_files; i++) {
        const sft_tensor *t = sft_find(m->storage->files[i], name);
        if (t) return t;
    }
    return NULL;
}

/* Returns the tensor as F32 of shape [rows][cols] (cols 0: a vector of rows),
 * in place when it is already aligned F32, else converted into a model buffer.
 * mat (matrices; NULL for vectors): the tensor in its stored dtype, see
 * mdl__to_mat. *out stays NULL when the tensor is absent and optional. */
static int hf__get(mdl_model *m, const char *name, int64_t rows, int64_t cols, int required,
                   const float **out, mdl_mat *mat, char *err, size_t errlen)
{
    *out = NULL;
    const sft_tensor *t = hf__find(m, name);
    if (!t) {
        if (!required) return 0;
        return td_err_fail(err, errlen, TD_EFORMAT, "missing tensor \"%s\"", name);
    }
    int want_nd = cols ? 2 : 1;
    if (t->ndim != want_nd || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
        char got[128] = "";
        size_t n = 0;
        for (int i = 0; i < t->ndim && n < sizeof(got) - 24; i++)
            n += (size_t)snprintf(got + n, sizeof(got) - n, "%s%lld", i ? ", " : "",
                                  (long long)t->shape[i]);
        if (cols)
            return td_err_fail(err, errlen, TD_EFORMAT,
                               "tensor \"%s\" has shape [%s], expected [%lld, %lld]", name, got,
                               (long long)rows, (long long)cols);
        return td_err_fail(err, errlen, TD_EFORMAT, "tensor \"%s\" has shape [%s], expected [%lld]",
                           name, got, (long long)rows);
    }
    size_t n = (size_t)rows * (size_t)(cols ? cols : 1);
    if (t->dtype == SFT_OTHER)
        return td_err_fail(err, errlen, TD_EUNSUPPORTED, "tensor \"%s\" has unsupported dtype %s",
                           name, t->dtype_name);
    if ((mat ? mdl__to_mat(m, t->data, t->dtype, n, out, mat)
             : mdl__to_f32(m, t->data, t->dtype, n, out)) != 0)
        return td_err_fail(err, errlen, TD_ENOMEM, "out of memory converting \"%s\"", name);
    return 0;
}

int mdl__load_hf(const char *dir, const char *weights, mdl_model *m, char *err, size_t errlen)
{
    mdl_config *c = &m->cfg;
    int rc = hf__parse_config(dir, c, err, errlen);
    if (rc != 0) return rc;
    rc = weights ? hf__add_file(m, weights, err, errlen) : hf__open_weights(dir, m, err, errlen);
    if (rc != 0) return rc;
    m->layers = calloc((size_t)c->n_layers, sizeof(*m->layers));
    if (!m->layers) return td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
    int64_t d = c->dim, hd = c->hidden_dim, V = c->vocab_size;
    int64_t qd = (int64_t)c->n_heads * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim;
    if ((rc = hf__get(m, "model.embed_tokens.weight", V, d, 1, &m->tok_embed, &m->tok_embed_mat,
                      err, errlen)) ||
        (rc = hf__get(m, "model.norm.weight", d, 0, 1, &m->final_norm, NULL, err, errlen)))
        return rc;
    char name[256];
#define HF_GETM(field, mat, suffix, r, cc, req)                                                    \
    do {                                                                                           \
        snprintf(name, sizeof(name), "model.layers.%d.%s", l, suffix);                             \
        if ((rc = hf__get(m, name, r, cc, req, &ly->field, mat, err, errlen)) != 0) return rc;     \
    } while (0)
#define HF_GET(field, suffix, r, cc, req) HF_GETM(field, NULL, suffix, r, cc, req)
#define HF_MAT(field, suffix, r, cc)      HF_GETM(field, &ly->mat.field, suffix, r, cc, 1)
    for (int l = 0; l < c->n_layers; l++) {
        mdl_layer *ly = &m->layers[l];
        HF_GET(attn_norm, "input_layernorm.weight", d, 0, 1);
        HF_MAT(wq, "self_attn.q_proj.weight", qd, d);
        HF_MAT(wk, "self_attn.k_proj.weight", kvd, d);
        HF_MAT(wv, "self_attn.v_proj.weight", kvd, d);
        HF_GET(bq, "self_attn.q_proj.bias", qd, 0, c->qkv_bias);
        HF_GET(bk, "self_attn.k_proj.bias", kvd, 0, c->qkv_bias);
        HF_GET(bv, "self_attn.v_proj.bias", kvd, 0, c->qkv_bias);
        HF_MAT(wo, "self_attn.o_proj.weight", d, qd);
        HF_GET(ffn_norm, "post_attention_layernorm.weight", d, 0, 1);
        HF_MAT(w_gate, "mlp.gate_proj.weight", hd, d);
        HF_MAT(w_up, "mlp.up_proj.weight", hd, d);
        HF_MAT(w_down, "mlp.down_proj.weight", d, hd);
        if ((ly->bq != NULL) != (ly->bk != NULL) || (ly->bq != NULL) != (ly->bv != NULL))
            return td_err_fail(err, errlen, TD_EFORMAT,
                               "layer %d has some but not all of the q/k/v biases", l);
        if (ly->bq) c->qkv_bias = 1;
    }
#undef HF_GET
#undef HF_MAT
#undef HF_GETM
    if (!c->tied_output) {
        if ((rc = hf__get(m, "lm_head.weight", V, d, 0, &m->output, &m->output_mat, err, errlen)) !=
            0)
            return rc;
        if (!m->output_mat.data) c->tied_output = 1; /* no lm_head: the embedding classifies */
    }
    if (c->tied_output) {
        m->output = m->tok_embed;
        m->output_mat = m->tok_embed_mat;
    }
    return 0;
}

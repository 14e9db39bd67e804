/* Hugging Face tokenizer.json BPE (and GPT-2's vocab.json + merges.txt):
 * loading the declared pipeline and encoding through it.
 *
 * Pipeline per input: split out added tokens -> per remaining segment:
 * normalizer (Prepend / Replace with U+2581) -> pre-tokenizer (regex split,
 * ByteLevel byte-to-code-point mapping, Metaspace) -> BPE by merge rank with
 * byte fallback -> ids. */
#include "engine/tokenizer/tok_internal.h"

#include "common/err.h"
#include "common/log.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOK__MAX_JSON ((size_t)512 << 20)

static const char META[] = "\xE2\x96\x81"; /* U+2581, SentencePiece's space */

/* The regexes of the Split pre-tokenizers we implement, as tokenizer.json
 * spells them (after JSON unescaping). */
static const struct {
    const char *pattern;
    enum tok__split kind;
} known_splits[] = {
    {"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
     TOK__SPLIT_GPT2},
    {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
     "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
     TOK__SPLIT_LLAMA3},
    {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
     "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
     TOK__SPLIT_QWEN2},
};

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the
 * other 68 bytes to U+0100 upwards in byte order. */
static void byte_to_cp_table(uint32_t cp[256])
{
    uint32_t next = 256;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        cp[b] = keep ? (uint32_t)b : next++;
    }
}

static size_t put_utf8(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Load-time state that does not outlive tok__hf_load. */
typedef struct hf_load {
    tok_tokenizer *t;
    char *err;
    size_t errlen;
    const char *path;
    bool dec_byte_level, dec_replace_meta, dec_byte_fallback;
    bool post_adds_bos;
    char *post_bos; /* content of the SpecialToken the post-processor prepends */
} hf_load;

static const char *jstr(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static bool jbool(const cJSON *o, const char *key, bool dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsBool(v)) return cJSON_IsTrue(v);
    return dflt;
}

static int unsupported(hf_load *L, const char *what, const char *type)
{
    td_err_set(L->err, L->errlen, "%s: unsupported %s \"%s\"", L->path, what,
               type ? type : "(no type)");
    return TD_EUNSUPPORTED;
}

static int parse_normalizer(hf_load *L, const cJSON *n)
{
    if (n == NULL || cJSON_IsNull(n)) return 0;
    const char *type = jstr(n, "type");
    if (type == NULL) return unsupported(L, "normalizer", NULL);
    if (!strcmp(type, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(n, "normalizers"))
        {
            int rc = parse_normalizer(L, it);
            if (rc < 0) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "Prepend")) {
        const char *p = jstr(n, "prepend");
        if (p == NULL || strcmp(p, META) != 0) return unsupported(L, "Prepend normalizer", p);
        L->t->norm_prepend = true;
        return 0;
    }
    if (!strcmp(type, "Replace")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(n, "pattern");
        const char *from = jstr(pat, "String"), *to = jstr(n, "content");
        if (from == NULL || to == NULL || strcmp(from, " ") != 0 || strcmp(to, META) != 0)
            return unsupported(L, "Replace normalizer", from);
        L->t->norm_space_meta = true;
        return 0;
    }
    if (!strcmp(type, "NFC")) {
        /* Text arriving through the API is NFC in practice; composing it
         * here would need the full Unicode decomposition tables. */
        td_log_warn("tok", "nfc_not_applied", "path=%s", L->path);
        return 0;
    }
    return unsupported(L, "normalizer", type);
}

static int add_split(hf_load *L, enum tok__split k)
{
    if (L->t->n_splits >= TOK__MAX_SPLITS) return unsupported(L, "pre-tokenizer chain", "too long");
    L->t->splits[L->t->n_splits++] = k;
    return 0;
}

static int parse_pretok(hf_load *L, const cJSON *p)
{
    if (p == NULL || cJSON_IsNull(p)) return 0;
    const char *type = jstr(p, "type");
    tok_tokenizer *t = L->t;
    if (type == NULL) return unsupported(L, "pre_tokenizer", NULL);
    if (!strcmp(type, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(p, "pretokenizers"))
        {
            int rc = parse_pretok(L, it);
            if (rc < 0) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) {
        t->byte_level = true;
        t->prefix_space = jbool(p, "add_prefix_space", false);
        if (jbool(p, "use_regex", true)) return add_split(L, TOK__SPLIT_GPT2);
        return 0;
    }
    if (!strcmp(type, "Split")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const char *re = jstr(pat, "Regex");
        const char *behavior = jstr(p, "behavior");
        if (re == NULL) return unsupported(L, "Split pattern", jstr(pat, "String"));
        if (behavior == NULL || strcmp(behavior, "Isolated") != 0 || jbool(p, "invert", false))
            return unsupported(L, "Split behavior", behavior);
        for (size_t i = 0; i < sizeof(known_splits) / sizeof(known_splits[0]); i++)
            if (!strcmp(re, known_splits[i].pattern)) return add_split(L, known_splits[i].kind);
        return unsupported(L, "Split regex", re);
    }
    if (!strcmp(type, "Metaspace")) {
        const char *rep = jstr(p, "replacement");
        if (rep == NULL || strcmp(rep, META) != 0)
            return unsupported(L, "Metaspace replacement", rep);
        t->norm_space_meta = true;
        const char *scheme = jstr(p, "prepend_scheme");
        if (scheme == NULL)
            t->norm_prepend = jbool(p, "add_prefix_space", true);
        else if (!strcmp(scheme, "always"))
            t->norm_prepend = true;
        else if (!strcmp(scheme, "first"))
            t->norm_prepend_first = true;
        else if (strcmp(scheme, "never") != 0)
            return unsupported(L, "Metaspace prepend_scheme", scheme);
        if (jbool(p, "split", true)) return add_split(L, TOK__SPLIT_METASPACE);
        return 0;
    }
    return unsupported(L, "pre_tokenizer", type);
}

static int parse_decoder(hf_load *L, const cJSON *d)
{
    if (d == NULL || cJSON_IsNull(d)) return 0;
    const char *type = jstr(d, "type");
    if (type == NULL) return unsupported(L, "decoder", NULL);
    if (!strcmp(type, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(d, "decoders"))
        {
            int rc = parse_decoder(L, it);
            if (rc < 0) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) {
        L->dec_byte_level = true;
        return 0;
    }
    if (!strcmp(type, "Replace")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(d, "pattern");
        const char *from = jstr(pat, "String"), *to = jstr(d, "content");
        if (from == NULL || to == NULL || strcmp(from, META) != 0 || strcmp(to, " ") != 0)
            return unsupported(L, "Replace decoder", from);
        L->dec_replace_meta = true;
        return 0;
    }
    if (!strcmp(type, "ByteFallback")) {
        L->dec_byte_fallback = true;
        return 0;
    }
    if (!strcmp(type, "Fuse")) return 0; /* we always concatenate */
    if (!strcmp(type, "Strip")) {
        const char *c = jstr(d, "content");
        const cJSON *start = cJSON_GetObjectItemCaseSensitive(d, "start");
        const cJSON *stop = cJSON_GetObjectItemCaseSensitive(d, "stop");
        if (c == NULL || strcmp(c, " ") != 0 || !cJSON_IsNumber(start) || start->valueint > 1 ||
            (cJSON_IsNumber(stop) && stop->valueint != 0))
            return unsupported(L, "Strip decoder", c);
        L->t->dec_strip_space = start->valueint == 1;
        return 0;
    }
    if (!strcmp(type, "Metaspace")) {
        L->dec_replace_meta = true;
        const char *scheme = jstr(d, "prepend_scheme");
        L->t->dec_strip_space =
            scheme ? strcmp(scheme, "never") != 0 : jbool(d, "add_prefix_space", true);
        return 0;
    }
    return unsupported(L, "decoder", type);
}

/* Notes whether the post-processor prepends a special token (BOS). */
static void parse_post(hf_load *L, const cJSON *p)
{
    if (p == NULL || cJSON_IsNull(p)) return;
    const char *type = jstr(p, "type");
    if (type == NULL) return;
    if (!strcmp(type, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(p, "processors")) parse_post(L, it);
        return;
    }
    if (strcmp(type, "TemplateProcessing") != 0) return;
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single");
    const cJSON *first = cJSON_GetArrayItem(single, 0);
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(first, "SpecialToken");
    const char *id = jstr(sp, "id");
    if (id != NULL) {
        free(L->post_bos);
        L->post_bos = strdup(id);
        L->post_adds_bos = L->post_bos != NULL;
    }
}

/* Fills the decoded bytes of every id from the declared decoder. */
static int build_decoded(hf_load *L)
{
    tok_tokenizer *t = L->t;
    uint32_t b2c[256];
    int16_t c2b[512]; /* the mapped code points are all below U+0200 */
    byte_to_cp_table(b2c);
    memset(c2b, 0xff, sizeof(c2b));
    for (int b = 0; b < 256; b++)
        c2b[b2c[b]] = (int16_t)b;
    char *tmp = NULL;
    size_t tmp_cap = 0;
    int rc = 0;
    for (int32_t id = 0; id < t->n_vocab && rc == 0; id++) {
        const char *p = t->arena + t->piece_off[id];
        size_t n = t->piece_len[id];
        if (n + 1 > tmp_cap) {
            free(tmp);
            tmp_cap = n + 64;
            tmp = malloc(tmp_cap);
            if (tmp == NULL) return TD_ENOMEM;
        }
        size_t w = 0;
        bool raw = true;
        if (L->dec_byte_level) {
            /* all code points must be mapped bytes, else the piece is kept
             * as it is (added tokens such as "<|im_start|>" or "  ") */
            const uint8_t *u = (const uint8_t *)p;
            raw = false;
            for (size_t i = 0; i < n;) {
                uint32_t cp;
                size_t l = tok__utf8_next(u, n, i, &cp);
                if (cp >= 512 || c2b[cp] < 0 || (cp == 0xFFFD && l == 1)) {
                    raw = true;
                    break;
                }
                tmp[w++] = (char)c2b[cp];
                i += l;
            }
        } else {
            int b = L->dec_byte_fallback ? tok__parse_byte_piece(p, n) : -1;
            if (b >= 0) {
                tmp[w++] = (char)b;
                raw = false;
                t->attr[id] |= TOK__ATTR_BYTE;
                t->dec_byte_runs = true;
            } else if (L->dec_replace_meta) {
                raw = false;
                for (size_t i = 0; i < n;) {
                    if (i + 3 <= n && memcmp(p + i, META, 3) == 0) {
                        tmp[w++] = ' ';
                        i += 3;
                    } else {
                        tmp[w++] = p[i++];
                    }
                }
            }
        }
        if (raw) {
            t->dec_off[id] = t->piece_off[id];
            t->dec_len[id] = (uint32_t)n;
        } else {
            rc = tok__arena_put(t, tmp, w, &t->dec_off[id]);
            t->dec_len[id] = (uint32_t)w;
        }
    }
    free(tmp);
    return rc;
}

/* Orders added tokens by first byte, then longest first, so the first hit
 * at a position is the longest match (leftmost-longest, as the added
 * vocabulary of tokenizers matches). */
static bool added_before(const tok_tokenizer *t, const tok__added *x, const tok__added *y)
{
    uint8_t fx = (uint8_t)t->arena[x->off], fy = (uint8_t)t->arena[y->off];
    if (fx != fy) return fx < fy;
    if (x->len != y->len) return x->len > y->len;
    return x->id < y->id;
}

static void index_added(tok_tokenizer *t)
{
    /* insertion sort: a few hundred entries, once per load */
    for (size_t i = 1; i < t->n_added; i++) {
        tok__added x = t->added[i];
        size_t j = i;
        while (j > 0 && added_before(t, &x, &t->added[j - 1])) {
            t->added[j] = t->added[j - 1];
            j--;
        }
        t->added[j] = x;
    }
    size_t k = 0;
    for (int b = 0; b < 256; b++) {
        while (k < t->n_added && (uint8_t)t->arena[t->added[k].off] < b)
            k++;
        t->added_first[b] = (uint32_t)k;
    }
    t->added_first[256] = (uint32_t)t->n_added;
}

/* id of a token text: an added token first, then the model vocabulary. */
static int32_t find_token(const tok_tokenizer *t, const char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0; i < t->n_added; i++)
        if (t->added[i].len == n && memcmp(t->arena + t->added[i].off, s, n) == 0)
            return t->added[i].id;
    return tok__vmap_find(t, s, n);
}

static int add_merge(hf_load *L, size_t rank, const char *a, size_t alen, const char *b,
                     size_t blen)
{
    tok_tokenizer *t = L->t;
    int32_t ia = tok__vmap_find(t, a, alen), ib = tok__vmap_find(t, b, blen);
    char *cat = malloc(alen + blen + 1);
    if (cat == NULL) return TD_ENOMEM;
    memcpy(cat, a, alen);
    memcpy(cat + alen, b, blen);
    int32_t im = tok__vmap_find(t, cat, alen + blen);
    free(cat);
    if (ia < 0 || ib < 0 || im < 0) {
        td_err_set(L->err, L->errlen,
                   "%s: merge %zu (\"%.*s\" + \"%.*s\"): %s not in the vocabulary", L->path, rank,
                   (int)(alen > 40 ? 40 : alen), a, (int)(blen > 40 ? 40 : blen), b,
                   ia < 0   ? "left part"
                   : ib < 0 ? "right part"
                            : "merged piece");
        return TD_EFORMAT;
    }
    if (rank > INT32_MAX) return TD_ERANGE;
    return tok__mmap_put(&t->merges, ia, ib, (int32_t)rank, im);
}

/* Byte tables of the declared model: byte-level symbols or <0xNN> pieces. */
static int build_byte_ids(hf_load *L)
{
    tok_tokenizer *t = L->t;
    if (t->byte_level) {
        uint32_t b2c[256];
        byte_to_cp_table(b2c);
        for (int b = 0; b < 256; b++) {
            char u[4];
            size_t n = put_utf8(b2c[b], u);
            memcpy(t->bl_utf8[b], u, n);
            t->bl_len[b] = (uint8_t)n;
            t->byte_id[b] = tok__vmap_find(t, u, n);
            if (t->byte_id[b] < 0) {
                td_err_set(L->err, L->errlen,
                           "%s: byte-level vocabulary lacks the symbol of byte 0x%02X", L->path, b);
                return TD_EFORMAT;
            }
        }
    } else if (t->byte_fallback) {
        for (int b = 0; b < 256; b++) {
            char name[8];
            snprintf(name, sizeof(name), "<0x%02X>", b);
            t->byte_id[b] = tok__vmap_find(t, name, 6);
            if (t->byte_id[b] >= 0) t->attr[t->byte_id[b]] |= TOK__ATTR_BYTE;
        }
    }
    return 0;
}

/* Reads an optional JSON file beside the tokenizer; *root stays NULL when
 * the file does not exist. */
static int read_side_json(hf_load *L, const char *dir, const char *name, cJSON **root)
{
    char path[4096];
    *root = NULL;
    int n = snprintf(path, sizeof(path), "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= sizeof(path)) return 0;
    FILE *f = fopen(path, "rb");
    if (f == NULL) return 0;
    fclose(f);
    char *data = NULL;
    size_t len = 0;
    int rc = tok__read_file(path, TOK__MAX_JSON, &data, &len, L->err, L->errlen);
    if (rc < 0) return rc;
    *root = cJSON_ParseWithLength(data, len);
    free(data);
    if (*root == NULL) {
        td_err_set(L->err, L->errlen, "%s: not valid JSON", path);
        return TD_EFORMAT;
    }
    return 0;
}

/* "bos_token": "<s>" or {"content": "<s>", ...} */
static const char *token_text(const cJSON *cfg, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v)) return jstr(v, "content");
    return NULL;
}

static void note_eos_ids(tok_tokenizer *t, const cJSON *cfg)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "eos_token_id");
    const cJSON *it;
    if (cJSON_IsNumber(v)) {
        if (v->valueint >= 0 && v->valueint < t->n_vocab && t->n_eos < TOK__MAX_EOS)
            t->eos_ids[t->n_eos++] = v->valueint;
    } else {
        cJSON_ArrayForEach(it, v)
        {
            if (cJSON_IsNumber(it) && it->valueint >= 0 && it->valueint < t->n_vocab &&
                t->n_eos < TOK__MAX_EOS)
                t->eos_ids[t->n_eos++] = it->valueint;
        }
    }
}

static int32_t config_id(const tok_tokenizer *t, const cJSON *cfg, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsArray(v)) v = cJSON_GetArrayItem(v, 0);
    if (cJSON_IsNumber(v) && v->valueint >= 0 && v->valueint < t->n_vocab) return v->valueint;
    return -1;
}

static const char *chat_template_text(const cJSON *cfg)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    if (cJSON_IsString(v)) return v->valuestring;
    /* a list of named templates: the "default" one, else the first */
    const cJSON *it, *first = NULL;
    cJSON_ArrayForEach(it, v)
    {
        const char *name = jstr(it, "name"), *tpl = jstr(it, "template");
        if (tpl == NULL) continue;
        if (name && !strcmp(name, "default")) return tpl;
        if (first == NULL) first = it;
    }
    return first ? jstr(first, "template") : NULL;
}

/* A ChatML template with a literal default system turn, as Qwen's
 * "'<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'", keeps
 * its text (the newline may be a real one or a backslash-n escape). */
static int chatml_default_system(tok_tokenizer *t, const char *tpl)
{
    static const char head[] = "<|im_start|>system";
    const char *p = strstr(tpl, head);
    if (p == NULL) return 0;
    p += sizeof(head) - 1;
    if (p[0] == '\n')
        p += 1;
    else if (p[0] == '\\' && p[1] == 'n')
        p += 2;
    else
        return 0;
    const char *end = strstr(p, "<|im_end|>");
    if (end == NULL) return 0;
    /* plain text only: a quote or a brace means template code, not a default */
    char *text = malloc((size_t)(end - p) + 1);
    if (text == NULL) return TD_ENOMEM;
    size_t n = 0;
    for (const char *q = p; q < end; q++) {
        if (*q == '\'' || *q == '"' || *q == '{' || *q == '}') {
            free(text);
            return 0;
        }
        if (q[0] == '\\' && q + 1 < end && q[1] == 'n') {
            text[n++] = '\n';
            q++;
        } else {
            text[n++] = *q;
        }
    }
    int rc = tok__arena_put(t, text, n, &t->chat_system_off);
    free(text);
    if (rc < 0) return rc;
    t->chat_system_len = (uint32_t)n;
    t->chat_default_system = true;
    return 0;
}

/* BOS/EOS, add_bos_token and the chat template from the files beside the
 * tokenizer: tokenizer_config.json first, then generation_config.json, then
 * config.json. */
static int load_configs(hf_load *L, const char *dir)
{
    tok_tokenizer *t = L->t;
    cJSON *tc = NULL, *gc = NULL, *mc = NULL;
    int rc = read_side_json(L, dir, "tokenizer_config.json", &tc);
    if (rc == 0) rc = read_side_json(L, dir, "generation_config.json", &gc);
    if (rc == 0) rc = read_side_json(L, dir, "config.json", &mc);
    if (rc < 0) goto out;

    const char *bos = token_text(tc, "bos_token"), *eos = token_text(tc, "eos_token");
    t->bos_id = bos ? find_token(t, bos) : -1;
    t->eos_id = eos ? find_token(t, eos) : -1;
    if (t->bos_id < 0 && L->post_bos) t->bos_id = find_token(t, L->post_bos);
    /* When tokenizer_config.json names a BOS/EOS text the vocabulary lacks,
     * the numeric ids of the model's configs are not trusted: they point at
     * some other token (a tokenizer borrowed from another model names id 0,
     * its byte piece for 0x00). The vocabulary has no such token then. */
    bool bos_lacking = bos != NULL && t->bos_id < 0, eos_lacking = eos != NULL && t->eos_id < 0;
    if (t->bos_id < 0 && !bos_lacking) t->bos_id = config_id(t, gc, "bos_token_id");
    if (t->bos_id < 0 && !bos_lacking) t->bos_id = config_id(t, mc, "bos_token_id");
    if (t->eos_id < 0 && !eos_lacking) t->eos_id = config_id(t, gc, "eos_token_id");
    if (t->eos_id < 0 && !eos_lacking) t->eos_id = config_id(t, mc, "eos_token_id");
    note_eos_ids(t, gc);
    note_eos_ids(t, mc);

    const cJSON *ab = cJSON_GetObjectItemCaseSensitive(tc, "add_bos_token");
    if (cJSON_IsBool(ab))
        t->add_bos = cJSON_IsTrue(ab);
    else
        t->add_bos = L->post_adds_bos;
    if (t->bos_id < 0) t->add_bos = false;

    const char *tpl = chat_template_text(tc);
    if (tpl != NULL) {
        if (strstr(tpl, "<|start_header_id|>"))
            t->chat = TOK_CHAT_LLAMA3;
        else if (strstr(tpl, "<|im_start|>")) {
            t->chat = TOK_CHAT_CHATML;
            rc = chatml_default_system(t, tpl);
        } else if (strstr(tpl, "[INST]"))
            t->chat = TOK_CHAT_LLAMA2;
    }
out:
    cJSON_Delete(tc);
    cJSON_Delete(gc);
    cJSON_Delete(mc);
    return rc;
}

static void dir_of(const char *path, char *dir, size_t cap)
{
    const char *slash = strrchr(path, '/');
    if (slash == NULL) {
        snprintf(dir, cap, ".");
        return;
    }
    size_t n = (size_t)(slash - path);
    if (n == 0) n = 1; /* "/tokenizer.json" */
    if (n >= cap) n = cap - 1;
    memcpy(dir, path, n);
    dir[n] = '\0';
}

static bool valid_id(const cJSON *v)
{
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < (1 << 24) &&
           v->valuedouble == (double)v->valueint;
}

/* Vocabulary and added tokens into the tokenizer's tables. */
static int load_vocab(hf_load *L, const cJSON *vocab, const cJSON *added)
{
    tok_tokenizer *t = L->t;
    int32_t max_id = -1;
    size_t n_vocab_entries = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab)
    {
        if (!valid_id(it) || it->string == NULL) {
            td_err_set(L->err, L->errlen, "%s: vocab entry \"%.40s\" has no valid id", L->path,
                       it->string ? it->string : "");
            return TD_EFORMAT;
        }
        if (it->valueint > max_id) max_id = it->valueint;
        n_vocab_entries++;
    }
    size_t n_added = 0;
    cJSON_ArrayForEach(it, added)
    {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        const char *content = jstr(it, "content");
        if (!valid_id(id) || content == NULL || content[0] == '\0') {
            td_err_set(L->err, L->errlen, "%s: added token %zu lacks a valid id or content",
                       L->path, n_added);
            return TD_EFORMAT;
        }
        if (id->valueint > max_id) max_id = id->valueint;
        n_added++;
    }
    if (n_vocab_entries == 0) {
        td_err_set(L->err, L->errlen, "%s: empty model vocabulary", L->path);
        return TD_EFORMAT;
    }
    int rc = tok__alloc_vocab(t, max_id + 1);
    if (rc < 0) return rc;
    uint8_t *seen = calloc((size_t)max_id + 1, 1);
    int32_t *ids = malloc(n_vocab_entries * sizeof(int32_t));
    t->added = calloc(n_added ? n_added : 1, sizeof(tok__added));
    if (seen == NULL || ids == NULL || t->added == NULL) {
        rc = TD_ENOMEM;
        goto out;
    }
    size_t k = 0;
    cJSON_ArrayForEach(it, vocab)
    {
        int32_t id = it->valueint;
        if (seen[id]) {
            td_err_set(L->err, L->errlen, "%s: id %d appears twice in the vocabulary", L->path, id);
            rc = TD_EFORMAT;
            goto out;
        }
        seen[id] = 1;
        size_t len = strlen(it->string);
        if ((rc = tok__arena_put(t, it->string, len, &t->piece_off[id])) < 0) goto out;
        t->piece_len[id] = (uint32_t)len;
        ids[k++] = id;
    }
    if ((rc = tok__vmap_build(t, ids, k)) < 0) goto out;
    cJSON_ArrayForEach(it, added)
    {
        tok__added *a = &t->added[t->n_added++];
        const char *content = jstr(it, "content");
        a->id = cJSON_GetObjectItemCaseSensitive(it, "id")->valueint;
        a->len = (uint32_t)strlen(content);
        if ((rc = tok__arena_put(t, content, a->len, &a->off)) < 0) goto out;
        a->special = jbool(it, "special", false);
        a->lstrip = jbool(it, "lstrip", false);
        a->rstrip = jbool(it, "rstrip", false);
        if (!seen[a->id]) {
            seen[a->id] = 1;
            t->piece_off[a->id] = a->off;
            t->piece_len[a->id] = a->len;
        }
        t->attr[a->id] |= TOK__ATTR_ADDED | (a->special ? TOK__ATTR_SPECIAL : 0);
    }
    index_added(t);
out:
    free(seen);
    free(ids);
    return rc;
}

/* Steps common to tokenizer.json and vocab.json + merges.txt once the
 * vocabulary, merges and declared pipeline are in place. */
static int finish_load(hf_load *L)
{
    tok_tokenizer *t = L->t;
    if (!t->byte_level && t->n_splits == 0 && t->norm_space_meta && !t->ignore_merges)
        tok__check_split_words(t, META, 3);
    int rc = build_byte_ids(L);
    if (rc == 0) rc = build_decoded(L);
    if (rc == 0) {
        char dir[4096];
        dir_of(L->path, dir, sizeof(dir));
        rc = load_configs(L, dir);
    }
    return rc;
}

int tok__hf_load(tok_tokenizer *t, const char *json_path, char *err, size_t errlen)
{
    hf_load L = {.t = t, .err = err, .errlen = errlen, .path = json_path};
    t->kind = TOK__KIND_BPE;
    char *data = NULL;
    size_t len = 0;
    int rc = tok__read_file(json_path, TOK__MAX_JSON, &data, &len, err, errlen);
    if (rc < 0) return rc;
    cJSON *root = cJSON_ParseWithLength(data, len);
    free(data);
    if (root == NULL) {
        td_err_set(err, errlen, "%s: not valid JSON (truncated or corrupt)", json_path);
        return TD_EFORMAT;
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    const char *type = jstr(model, "type");
    if (!cJSON_IsObject(model)) {
        td_err_set(err, errlen, "%s: no \"model\" object", json_path);
        rc = TD_EFORMAT;
        goto out;
    }
    if (type != NULL && strcmp(type, "BPE") != 0) {
        rc = unsupported(&L, "model type", type);
        goto out;
    }
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
        td_err_set(err, errlen, "%s: model lacks a \"vocab\" object or a \"merges\" array",
                   json_path);
        rc = TD_EFORMAT;
        goto out;
    }
    const char *cont = jstr(model, "continuing_subword_prefix");
    const char *suffix = jstr(model, "end_of_word_suffix");
    if ((cont && cont[0]) || (suffix && suffix[0])) {
        rc = unsupported(&L, "BPE subword affix", cont && cont[0] ? cont : suffix);
        goto out;
    }
    if ((rc = load_vocab(&L, vocab, cJSON_IsArray(added) ? added : NULL)) < 0) goto out;
    t->byte_fallback = jbool(model, "byte_fallback", false);
    t->ignore_merges = jbool(model, "ignore_merges", false);
    t->fuse_unk = jbool(model, "fuse_unk", false);
    const char *unk = jstr(model, "unk_token");
    t->unk_id = unk ? tok__vmap_find(t, unk, strlen(unk)) : -1;
    if ((rc = parse_normalizer(&L, cJSON_GetObjectItemCaseSensitive(root, "normalizer"))) < 0 ||
        (rc = parse_pretok(&L, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"))) < 0 ||
        (rc = parse_decoder(&L, cJSON_GetObjectItemCaseSensitive(root, "decoder"))) < 0)
        goto out;
    parse_post(&L, cJSON_GetObjectItemCaseSensitive(root, "post_processor"));

    if ((rc = tok__mmap_init(&t->merges, (size_t)cJSON_GetArraySize(merges))) < 0) goto out;
    size_t rank = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, merges)
    {
        if (cJSON_IsString(m)) {
            /* "left right": pieces never hold a plain space in these models */
            const char *s = m->valuestring, *sp = strchr(s, ' ');
            if (sp == NULL || sp == s || sp[1] == '\0' || strchr(sp + 1, ' ')) {
                td_err_set(err, errlen, "%s: merge %zu \"%.40s\" is not two pieces", json_path,
                           rank, s);
                rc = TD_EFORMAT;
                goto out;
            }
            rc = add_merge(&L, rank, s, (size_t)(sp - s), sp + 1, strlen(sp + 1));
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
            const char *a = cJSON_GetArrayItem(m, 0)->valuestring;
            const char *b = cJSON_GetArrayItem(m, 1)->valuestring;
            rc = add_merge(&L, rank, a, strlen(a), b, strlen(b));
        } else {
            td_err_set(err, errlen, "%s: merge %zu is neither \"a b\" nor [\"a\", \"b\"]",
                       json_path, rank);
            rc = TD_EFORMAT;
        }
        if (rc < 0) goto out;
        rank++;
    }
    rc = finish_load(&L);
out:
    free(L.post_bos);
    cJSON_Delete(root);
    return rc;
}

int tok__hf_load_gpt2(tok_tokenizer *t, const char *vocab_path, char *err, size_t errlen)
{
    hf_load L = {.t = t, .err = err, .errlen = errlen, .path = vocab_path};
    t->kind = TOK__KIND_BPE;
    char *data = NULL, *mdata = NULL;
    size_t len = 0, mlen = 0;
    cJSON *vocab = NULL, *added = NULL;
    char mpath[4096], dir[4096];
    dir_of(vocab_path, dir, sizeof(dir));
    int n = snprintf(mpath, sizeof(mpath), "%s/merges.txt", dir);
    if (n < 0 || (size_t)n >= sizeof(mpath)) return TD_ETOOLONG;
    int rc = tok__read_file(vocab_path, TOK__MAX_JSON, &data, &len, err, errlen);
    if (rc < 0) return rc;
    vocab = cJSON_ParseWithLength(data, len);
    free(data);
    if (!cJSON_IsObject(vocab)) {
        td_err_set(err, errlen, "%s: not a JSON object", vocab_path);
        rc = TD_EFORMAT;
        goto out;
    }
    /* GPT-2's one special token lives in the vocabulary itself. */
    const cJSON *eot = cJSON_GetObjectItemCaseSensitive(vocab, "<|endoftext|>");
    added = cJSON_CreateArray();
    if (added == NULL) {
        rc = TD_ENOMEM;
        goto out;
    }
    if (valid_id(eot)) {
        cJSON *a = cJSON_CreateObject();
        if (a == NULL || !cJSON_AddItemToArray(added, a) ||
            !cJSON_AddNumberToObject(a, "id", eot->valueint) ||
            !cJSON_AddStringToObject(a, "content", "<|endoftext|>") ||
            !cJSON_AddTrueToObject(a, "special")) {
            rc = TD_ENOMEM;
            goto out;
        }
    }
    if ((rc = load_vocab(&L, vocab, added)) < 0) goto out;
    t->byte_level = true;
    t->splits[t->n_splits++] = TOK__SPLIT_GPT2;
    L.dec_byte_level = true;

    if ((rc = tok__read_file(mpath, TOK__MAX_JSON, &mdata, &mlen, err, errlen)) < 0) goto out;
    size_t lines = 1;
    for (size_t i = 0; i < mlen; i++)
        lines += mdata[i] == '\n';
    if ((rc = tok__mmap_init(&t->merges, lines)) < 0) goto out;
    size_t rank = 0;
    for (char *p = mdata, *end = mdata + mlen; p < end;) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *le = nl ? nl : end;
        size_t ll = (size_t)(le - p);
        if (ll > 0 && p[ll - 1] == '\r') ll--;
        if (ll > 0 && !(rank == 0 && ll >= 8 && memcmp(p, "#version", 8) == 0)) {
            char *sp = memchr(p, ' ', ll);
            if (sp == NULL || sp == p || sp == p + ll - 1 ||
                memchr(sp + 1, ' ', (size_t)(p + ll - sp - 1))) {
                td_err_set(err, errlen, "%s: merge %zu \"%.*s\" is not two pieces", mpath, rank,
                           (int)(ll > 40 ? 40 : ll), p);
                rc = TD_EFORMAT;
                goto out;
            }
            L.path = mpath;
            rc = add_merge(&L, rank, p, (size_t)(sp - p), sp + 1, (size_t)(p + ll - sp - 1));
            L.path = vocab_path;
            if (rc < 0) goto out;
            rank++;
        }
        p = le + 1;
    }
    rc = finish_load(&L);
out:
    free(mdata);
    cJSON_Delete(vocab);
    cJSON_Delete(added);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Encoding */

typedef struct enc {
    const tok_tokenizer *t;
    tok__ids out;
    tok__bpe_scratch s;
    char *norm; /* normalized segment */
    size_t norm_cap;
    char *mapped; /* a word in byte-level code points, for ignore_merges */
    size_t mapped_cap;
} enc;

static int grow(char **p, size_t *cap, size_t need)
{
    if (need <= *cap) return 0;
    char *q = realloc(*p, need);
    if (q == NULL) return TD_ENOMEM;
    *p = q;
    *cap = need;
    return 0;
}

static int enc_word(enc *e, const char *w, size_t n)
{
    const tok_tokenizer *t = e->t;
    const uint8_t *u = (const uint8_t *)w;
    tok__bpe_scratch *s = &e->s;
    size_t ns = 0;
    if (t->byte_level) {
        if (t->ignore_merges) {
            size_t m = 0;
            for (size_t i = 0; i < n; i++) {
                memcpy(e->mapped + m, t->bl_utf8[u[i]], t->bl_len[u[i]]);
                m += t->bl_len[u[i]];
            }
            int32_t id = tok__vmap_find(t, e->mapped, m);
            if (id >= 0) return tok__ids_push(&e->out, id);
        }
        for (size_t i = 0; i < n; i++)
            s->sym[ns++] = (tok__sym){.id = t->byte_id[u[i]], .off = (uint32_t)i, .len = 1};
    } else {
        if (t->ignore_merges) {
            int32_t id = tok__vmap_find(t, w, n);
            if (id >= 0) return tok__ids_push(&e->out, id);
        }
        for (size_t i = 0; i < n;) {
            uint32_t cp;
            size_t l = tok__utf8_next(u, n, i, &cp);
            int32_t id = tok__vmap_find(t, w + i, l);
            if (id >= 0) {
                s->sym[ns++] = (tok__sym){.id = id, .off = (uint32_t)i, .len = (uint32_t)l};
            } else if (t->byte_fallback) {
                for (size_t k = 0; k < l; k++) {
                    int32_t b = t->byte_id[u[i + k]];
                    if (b < 0) b = t->unk_id;
                    if (b >= 0)
                        s->sym[ns++] = (tok__sym){.id = b, .off = (uint32_t)(i + k), .len = 1};
                }
            } else if (t->unk_id >= 0) {
                if (t->fuse_unk && ns > 0 && s->sym[ns - 1].id == t->unk_id)
                    s->sym[ns - 1].len += (uint32_t)l;
                else
                    s->sym[ns++] =
                        (tok__sym){.id = t->unk_id, .off = (uint32_t)i, .len = (uint32_t)l};
            }
            /* else: no way to spell the character; tokenizers drops it too */
            i += l;
        }
    }
    for (size_t i = 0; i < ns; i++) {
        s->sym[i].prev = (int32_t)i - 1;
        s->sym[i].next = i + 1 < ns ? (int32_t)i + 1 : -1;
    }
    return tok__bpe_merge(t, s, w, ns, &e->out);
}

static int enc_split(enc *e, int level, const char *w, size_t n)
{
    if (level >= e->t->n_splits || level >= TOK__MAX_SPLITS) return enc_word(e, w, n);
    const uint8_t *u = (const uint8_t *)w;
    for (size_t i = 0; i < n;) {
        size_t l = tok__split_next(e->t->splits[level], u, n, i);
        int rc = enc_split(e, level + 1, w + i, l);
        if (rc < 0) return rc;
        i += l;
    }
    return 0;
}

static int enc_segment(enc *e, const char *s, size_t n, bool at_start)
{
    const tok_tokenizer *t = e->t;
    if (n == 0) return 0;
    /* normalized length: U+2581 is 3 bytes for each space and the prefix */
    size_t cap = n * 3 + 4;
    int rc = grow(&e->norm, &e->norm_cap, cap);
    if (rc < 0) return rc;
    size_t m = 0;
    if (t->norm_prepend || (t->norm_prepend_first && at_start)) {
        memcpy(e->norm, META, 3);
        m = 3;
    }
    if (t->prefix_space && s[0] != ' ') e->norm[m++] = ' ';
    if (t->norm_space_meta) {
        for (size_t i = 0; i < n; i++) {
            if (s[i] == ' ') {
                memcpy(e->norm + m, META, 3);
                m += 3;
            } else {
                e->norm[m++] = s[i];
            }
        }
    } else {
        memcpy(e->norm + m, s, n);
        m += n;
    }
    if ((rc = tok__bpe_reserve(&e->s, m)) < 0) return rc;
    if (t->byte_level && (rc = grow(&e->mapped, &e->mapped_cap, m * 2)) < 0) return rc;
    if (t->split_words) {
        for (size_t i = 0; i < m;) {
            size_t j = tok__word_end(t, e->norm, m, i);
            if ((rc = enc_word(e, e->norm + i, j - i)) < 0) return rc;
            i = j;
        }
        return 0;
    }
    return enc_split(e, 0, e->norm, m);
}

/* Bytes of the white-space code point (Unicode White_Space, as the
 * reference's char::is_whitespace) that starts at text[i], or 0. */
static size_t space_at(const char *text, size_t len, size_t i)
{
    uint32_t cp;
    size_t l = tok__utf8_next((const uint8_t *)text, len, i, &cp);
    if (cp == 0xFFFD && l == 1) return 0; /* an invalid byte */
    return tok__is_space(cp) ? l : 0;
}

/* Bytes of the white-space code point that ends just before text[end], not
 * reaching before text[lo], or 0. */
static size_t space_before(const char *text, size_t lo, size_t end)
{
    for (size_t l = 1; l <= 4 && l <= end - lo; l++) {
        uint8_t b = (uint8_t)text[end - l];
        if ((b & 0xC0) == 0x80) continue; /* a continuation byte: look further back */
        size_t got = space_at(text, end, end - l);
        return got == l ? l : 0;
    }
    return 0;
}

int tok__hf_encode(const tok_tokenizer *t, const char *text, size_t len, int flags, int32_t **ids,
                   size_t *n_ids)
{
    enc e = {.t = t};
    int rc = 0;
    if ((flags & TOK_ADD_BOS) && t->bos_id >= 0 && (rc = tok__ids_push(&e.out, t->bos_id)) < 0)
        goto done;
    bool parse_special = (flags & TOK_PARSE_SPECIAL) != 0;
    size_t seg = 0, pos = 0;
    while (pos < len) {
        uint8_t b = (uint8_t)text[pos];
        const tok__added *hit = NULL;
        for (uint32_t k = t->added_first[b]; k < t->added_first[b + 1]; k++) {
            const tok__added *a = &t->added[k];
            if (a->special && !parse_special) continue;
            if (a->len <= len - pos && memcmp(t->arena + a->off, text + pos, a->len) == 0) {
                hit = a;
                break;
            }
        }
        if (hit == NULL) {
            pos++;
            continue;
        }
        size_t start = pos, end = pos + hit->len;
        size_t l;
        if (hit->lstrip)
            while (start > seg && (l = space_before(text, seg, start)) > 0)
                start -= l;
        if (hit->rstrip)
            while (end < len && (l = space_at(text, len, end)) > 0)
                end += l;
        if ((rc = enc_segment(&e, text + seg, start - seg, seg == 0)) < 0) goto done;
        if ((rc = tok__ids_push(&e.out, hit->id)) < 0) goto done;
        seg = pos = end;
    }
    rc = enc_segment(&e, text + seg, len - seg, seg == 0);
done:
    tok__bpe_scratch_free(&e.s);
    free(e.norm);
    free(e.mapped);
    if (rc < 0) {
        free(e.out.v);
        return rc;
    }
    if (e.out.v == NULL && (e.out.v = malloc(sizeof(int32_t))) == NULL) return TD_ENOMEM;
    *ids = e.out.v;
    *n_ids = e.out.n;
    return 0;
}

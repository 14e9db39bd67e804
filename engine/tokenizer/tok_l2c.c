/* llama2.c tokenizer.bin: int32 max_token_length, then per token a float
 * score, an int32 length and that many bytes (little-endian). The vocabulary
 * size is not stored: tokens run to the end of the file. Ids 0, 1 and 2 are
 * <unk>, BOS and EOS by llama2.c's convention. */
#include "engine/tokenizer/tok_internal.h"

#include "common/err.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int32_t rd_i32(const char *p)
{
    uint32_t v = (uint32_t)(uint8_t)p[0] | (uint32_t)(uint8_t)p[1] << 8 |
                 (uint32_t)(uint8_t)p[2] << 16 | (uint32_t)(uint8_t)p[3] << 24;
    int32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
}

static float rd_f32(const char *p)
{
    int32_t v = rd_i32(p);
    float f;
    memcpy(&f, &v, sizeof(f));
    return f;
}

int tok__l2c_load(tok_tokenizer *t, const char *data, size_t len, char *err, size_t errlen)
{
    t->kind = TOK__KIND_L2C;
    if (len < 4) {
        td_err_set(err, errlen, "tokenizer.bin: %zu bytes, too short for a header", len);
        return TD_EFORMAT;
    }
    int32_t max_len = rd_i32(data);
    if (max_len <= 0 || max_len > 4096) {
        td_err_set(err, errlen, "tokenizer.bin: max_token_length %d out of range", max_len);
        return TD_EFORMAT;
    }
    /* First pass: count and validate the records. */
    size_t n = 0;
    for (size_t off = 4; off < len; n++) {
        if (len - off < 8) {
            td_err_set(err, errlen, "tokenizer.bin: truncated record header of token %zu", n);
            return TD_EFORMAT;
        }
        int32_t l = rd_i32(data + off + 4);
        if (l < 0 || l > max_len || (size_t)l > len - off - 8) {
            td_err_set(
                err, errlen,
                "tokenizer.bin: token %zu has length %d (max_token_length %d, %zu bytes left)", n,
                l, max_len, len - off - 8);
            return TD_EFORMAT;
        }
        if (!isfinite(rd_f32(data + off))) {
            td_err_set(err, errlen, "tokenizer.bin: token %zu has a non-finite score", n);
            return TD_EFORMAT;
        }
        off += 8 + (size_t)l;
    }
    if (n < 3) {
        td_err_set(err, errlen, "tokenizer.bin: %zu tokens, need at least <unk>, BOS and EOS", n);
        return TD_EFORMAT;
    }
    int rc = tok__alloc_vocab(t, (int32_t)n);
    if (rc < 0) {
        td_err_set(err, errlen, "tokenizer.bin: %zu tokens: %s", n, td_strerror(rc));
        return rc;
    }
    t->scores = malloc(n * sizeof(float));
    int32_t *ids = malloc(n * sizeof(int32_t));
    if (t->scores == NULL || ids == NULL) {
        free(ids);
        return TD_ENOMEM;
    }
    size_t off = 4;
    for (size_t i = 0; i < n; i++) {
        t->scores[i] = rd_f32(data + off);
        uint32_t l = (uint32_t)rd_i32(data + off + 4);
        const char *p = data + off + 8;
        rc = tok__arena_put(t, p, l, &t->piece_off[i]);
        if (rc < 0) break;
        t->piece_len[i] = l;
        int b = tok__parse_byte_piece(p, l);
        if (b >= 0) {
            /* <0xNN> decodes to the raw byte */
            char c = (char)b;
            t->attr[i] |= TOK__ATTR_BYTE;
            if (t->byte_id[b] < 0) t->byte_id[b] = (int32_t)i;
            rc = tok__arena_put(t, &c, 1, &t->dec_off[i]);
            t->dec_len[i] = 1;
        } else {
            t->dec_off[i] = t->piece_off[i];
            t->dec_len[i] = l;
        }
        if (rc < 0) break;
        ids[i] = (int32_t)i;
        off += 8 + l;
    }
    if (rc == 0) rc = tok__vmap_build(t, ids, n);
    free(ids);
    if (rc < 0) return rc;
    tok__check_split_words(t, " ", 1);
    for (int i = 0; i < 3; i++)
        t->attr[i] |= TOK__ATTR_SPECIAL;
    t->unk_id = 0;
    t->bos_id = 1;
    t->eos_id = 2;
    t->add_bos = true;
    t->chat = TOK_CHAT_NONE;
    return 0;
}

int tok__l2c_encode(const tok_tokenizer *t, const char *text, size_t len, bool add_bos,
                    int32_t **ids, size_t *n_ids)
{
    tok__ids out = {0};
    tok__bpe_scratch s = {0};
    char *buf = NULL;
    int rc = 0;
    if (add_bos && (rc = tok__ids_push(&out, t->bos_id)) < 0) goto done;
    if (len == 0) goto done;
    /* llama2.c's "dummy prefix": a space before non-empty text, which
     * SentencePiece adds too (add_dummy_prefix). */
    if (len > SIZE_MAX - 1) {
        rc = TD_ETOOLONG;
        goto done;
    }
    buf = malloc(len + 1);
    if (buf == NULL) {
        rc = TD_ENOMEM;
        goto done;
    }
    buf[0] = ' ';
    memcpy(buf + 1, text, len);
    size_t n = len + 1;
    /* at most one symbol per byte */
    if ((rc = tok__bpe_reserve(&s, n)) < 0) goto done;
    const uint8_t *u = (const uint8_t *)buf;
    for (size_t w0 = 0; w0 < n && rc == 0;) {
        size_t w1 = t->split_words ? tok__word_end(t, buf, n, w0) : n;
        size_t ns = 0;
        for (size_t i = w0; i < w1;) {
            uint32_t cp;
            size_t l = tok__utf8_next(u, w1, i, &cp);
            int32_t id = tok__vmap_find(t, buf + i, l);
            if (id >= 0) {
                s.sym[ns++] = (tok__sym){.id = id, .off = (uint32_t)(i - w0), .len = (uint32_t)l};
            } else {
                /* byte fallback: one <0xNN> symbol per byte */
                for (size_t k = 0; k < l; k++) {
                    int32_t b = t->byte_id[u[i + k]];
                    s.sym[ns++] = (tok__sym){
                        .id = b >= 0 ? b : t->unk_id, .off = (uint32_t)(i - w0 + k), .len = 1};
                }
            }
            i += l;
        }
        for (size_t i = 0; i < ns; i++) {
            s.sym[i].prev = (int32_t)i - 1;
            s.sym[i].next = i + 1 < ns ? (int32_t)i + 1 : -1;
        }
        rc = tok__bpe_merge(t, &s, buf + w0, ns, &out);
        w0 = w1;
    }
done:
    free(buf);
    tok__bpe_scratch_free(&s);
    if (rc < 0) {
        free(out.v);
        return rc;
    }
    if (out.v == NULL && (out.v = malloc(sizeof(int32_t))) == NULL) return TD_ENOMEM;
    *ids = out.v;
    *n_ids = out.n;
    return 0;
}

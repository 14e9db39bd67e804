/* fuzz_tok_ops: tok_encode, tok_decode, tok_stream and tok_chat_render on
 * arbitrary bytes and ids, over three small built-in vocabularies (byte-level
 * BPE, SentencePiece-style BPE with byte fallback, llama2.c).
 *
 * Input: one control byte, then the payload. Control low 2 bits: vocabulary
 * (0 byte-level, 1 SentencePiece-style, 2 llama2.c, 3 byte-level); bits 4-5:
 * operation (0 encode text, 1 decode int32 ids, 2 stream int32 ids, 3 chat
 * render of NUL-separated role/content pairs); bits 2-3: flags (encode:
 * TOK_ADD_BOS, TOK_PARSE_SPECIAL; decode: skip_special).
 *
 * Oracles (byte-level vocabulary only, where they hold exactly): decoding the
 * encoding of valid UTF-8 gives the text back, and the streamed text equals
 * tok_decode's with skip_special. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "engine/tokenizer/tok.h"
#include "tests/fuzz/fuzz_util.h"

static tok_tokenizer *toks[3];

struct sbuf {
    char *p;
    size_t len, cap;
};

static void sb_put(struct sbuf *b, const void *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort(); /* harness out of memory */
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void sb_str(struct sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_utf8(struct sbuf *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xc0 | cp >> 6);
        u[1] = (char)(0x80 | (cp & 0x3f));
        n = 2;
    } else {
        u[0] = (char)(0xe0 | cp >> 12);
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f));
        n = 3;
    }
    if (cp == '"' || cp == '\\') sb_put(b, "\\", 1);
    sb_put(b, u, n);
}

/* GPT-2's byte-to-unicode map: printable bytes map to themselves. */
static unsigned byte_char(unsigned b)
{
    if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)) return b;
    unsigned n = 0;
    for (unsigned x = 0; x < b; x++)
        if (!((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || (x >= 0xae && x <= 0xff))) n++;
    return 256 + n;
}

static tok_tokenizer *load_or_die(const char *path)
{
    tok_tokenizer *t = NULL;
    char err[256];
    if (tok_load(path, &t, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_tok_ops: built-in tokenizer %s: %s\n", path, err);
        abort(); /* harness bug */
    }
    return t;
}

static void init(void)
{
    char path[256], sub[300];
    struct sbuf b = {0};
    /* byte-level BPE, ids 0..255 the bytes, then merges, then added tokens */
    sb_str(&b, "{\"added_tokens\": [{\"id\": 262, \"content\": \"<|endoftext|>\", \"special\": "
               "true}, {\"id\": 263, \"content\": \"<|im_start|>\", \"special\": true}, {\"id\": "
               "264, \"content\": \"<|im_end|>\", \"special\": true}, {\"id\": 265, \"content\": "
               "\"<tool>\", \"special\": false}], \"pre_tokenizer\": {\"type\": \"ByteLevel\", "
               "\"add_prefix_space\": false, \"use_regex\": true}, \"decoder\": {\"type\": "
               "\"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {");
    for (unsigned i = 0; i < 256; i++) {
        char num[32];
        sb_str(&b, "\"");
        sb_utf8(&b, byte_char(i));
        snprintf(num, sizeof(num), "\": %u, ", i);
        sb_str(&b, num);
    }
    sb_str(&b, "\"he\": 256, \"ll\": 257, \"hell\": 258, \"\xc4\xa0w\": 259, \"or\": 260, "
               "\"\xc4\xa0wor\": 261}, \"merges\": [\"h e\", \"l l\", \"he ll\", \"\xc4\xa0 w\", "
               "\"o r\", \"\xc4\xa0w or\"]}}");
    snprintf(sub, sizeof(sub), "%s/bl", fuzz_dir());
    if (mkdir(sub, 0700) != 0) abort();
    fuzz_write("bl/tokenizer.json", b.p, b.len, path, sizeof(path));
    const char *cfg = "{\"bos_token\": \"<|endoftext|>\", \"eos_token\": \"<|im_end|>\", "
                      "\"chat_template\": \"<|im_start|>{{ message['role'] }}\"}";
    fuzz_write("bl/tokenizer_config.json", cfg, strlen(cfg), path, sizeof(path));
    toks[0] = load_or_die(sub);

    /* SentencePiece-style: <unk> <s> </s>, 256 byte pieces, a few words */
    b.len = 0;
    sb_str(&b,
           "{\"added_tokens\": [{\"id\": 1, \"content\": \"<s>\", \"special\": true}, {\"id\": "
           "2, \"content\": \"</s>\", \"special\": true}], \"normalizer\": {\"type\": "
           "\"Sequence\", \"normalizers\": [{\"type\": \"Prepend\", \"prepend\": "
           "\"\xe2\x96\x81\"}, {\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, "
           "\"content\": \"\xe2\x96\x81\"}]}, \"decoder\": {\"type\": \"Sequence\", "
           "\"decoders\": [{\"type\": \"Replace\", \"pattern\": {\"String\": "
           "\"\xe2\x96\x81\"}, \"content\": \" \"}, {\"type\": \"ByteFallback\"}, {\"type\": "
           "\"Fuse\"}, {\"type\": \"Strip\", \"content\": \" \", \"start\": 1, \"stop\": 0}]}, "
           "\"model\": {\"type\": \"BPE\", \"byte_fallback\": true, \"unk_token\": "
           "\"<unk>\", \"fuse_unk\": true, \"vocab\": {\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2, ");
    for (unsigned i = 0; i < 256; i++) {
        char piece[32];
        snprintf(piece, sizeof(piece), "\"<0x%02X>\": %u, ", i, 3 + i);
        sb_str(&b, piece);
    }
    sb_str(&b, "\"\xe2\x96\x81\": 259, \"a\": 260, \"b\": 261, \"\xe2\x96\x81"
               "a\": 262, \"ab\": "
               "263, \"\xe2\x96\x81"
               "ab\": 264}, \"merges\": [\"\xe2\x96\x81 a\", \"a b\", "
               "\"\xe2\x96\x81"
               "a b\"]}}");
    snprintf(sub, sizeof(sub), "%s/spm", fuzz_dir());
    if (mkdir(sub, 0700) != 0) abort();
    fuzz_write("spm/tokenizer.json", b.p, b.len, path, sizeof(path));
    cfg = "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"add_bos_token\": true, "
          "\"chat_template\": \"[INST] {{ message['content'] }} [/INST]\"}";
    fuzz_write("spm/tokenizer_config.json", cfg, strlen(cfg), path, sizeof(path));
    toks[1] = load_or_die(sub);

    /* llama2.c tokenizer.bin: <unk> <s> </s>, 256 byte pieces, a few words */
    b.len = 0;
    int32_t max_len = 8;
    sb_put(&b, &max_len, 4);
    const char *words[] = {"<unk>", "\n<s>\n", "\n</s>\n"};
    for (int i = 0; i < 3 + 256 + 6; i++) {
        char piece[16];
        const char *w = piece;
        static const char *const extra[] = {" ", "a", "b", " a", "ab", " ab"};
        if (i < 3)
            w = words[i];
        else if (i < 259)
            snprintf(piece, sizeof(piece), "<0x%02X>", i - 3);
        else
            w = extra[i - 259];
        float score = i < 259 ? 0.0f : -(float)(i - 258);
        int32_t l = (int32_t)strlen(w);
        sb_put(&b, &score, 4);
        sb_put(&b, &l, 4);
        sb_put(&b, w, (size_t)l);
    }
    toks[2] = load_or_die(fuzz_write("tokenizer.bin", b.p, b.len, path, sizeof(path)));
    free(b.p);
}

static int valid_utf8(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            k = 1;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

static void do_encode(const tok_tokenizer *t, int bytelevel, const uint8_t *p, size_t n, int flags)
{
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int rc = tok_encode(t, (const char *)p, n, flags, &ids, &n_ids);
    if (rc != 0) {
        fprintf(stderr, "tok_encode failed (%d) on %zu bytes\n", rc, n);
        abort(); /* encoding never fails on any bytes */
    }
    char *text = NULL;
    size_t len = 0;
    rc = tok_decode(t, ids, n_ids, 0, &text, &len);
    if (rc != 0) {
        fprintf(stderr, "tok_decode of tok_encode's ids failed (%d)\n", rc);
        abort();
    }
    if (bytelevel && !(flags & TOK_ADD_BOS) && valid_utf8(p, n) &&
        (len != n || memcmp(text, p, n) != 0)) {
        fprintf(stderr, "byte-level round trip differs: %zu bytes in, %zu out\n", n, len);
        abort();
    }
    free(text);
    free(ids);
}

static void do_stream(const tok_tokenizer *t, int bytelevel, const int32_t *ids, size_t n)
{
    tok_stream *st = NULL;
    if (tok_stream_create(t, &st) != 0) return;
    struct sbuf got = {0};
    char out[128];
    size_t w;
    int ok = 1;
    for (size_t i = 0; i < n; i++) {
        /* First a small buffer: TD_ERANGE must consume nothing, so the retry
         * with room gives the same text. */
        int rc = tok_stream_push(st, ids[i], out, 1 + i % 5, &w);
        if (rc == TD_ERANGE && ids[i] >= 0 && ids[i] < tok_vocab_size(t))
            rc = tok_stream_push(st, ids[i], out, sizeof(out), &w);
        if (rc == 0)
            sb_put(&got, out, w);
        else
            ok = 0; /* an out-of-range id: the oracle below does not apply */
    }
    if (tok_stream_flush(st, out, sizeof(out), &w) == 0) sb_put(&got, out, w);
    tok_stream_free(st);
    if (bytelevel && ok) {
        char *text = NULL;
        size_t len = 0;
        if (tok_decode(t, ids, n, 1, &text, &len) == 0 &&
            (len != got.len || (len && memcmp(text, got.p, len) != 0))) {
            fprintf(stderr, "stream (%zu bytes) differs from tok_decode (%zu bytes)\n", got.len,
                    len);
            abort();
        }
        free(text);
    }
    free(got.p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    if (!toks[0]) init();
    if (size < 1) return 0;
    unsigned ctl = data[0], which = ctl & 3, op = (ctl >> 4) & 3, fl = (ctl >> 2) & 3;
    const tok_tokenizer *t = toks[which == 3 ? 0 : which];
    int bytelevel = which == 0 || which == 3;
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    if (op == 0) {
        do_encode(t, bytelevel, p, n, (int)fl);
    } else if (op == 1 || op == 2) {
        size_t n_ids = n / 4;
        int32_t *ids = malloc((n_ids ? n_ids : 1) * sizeof(*ids));
        if (!ids) return 0;
        int vocab = tok_vocab_size(t);
        for (size_t i = 0; i < n_ids; i++) {
            uint32_t v;
            memcpy(&v, p + 4 * i, 4);
            /* mostly ids near the vocabulary, sometimes anything at all */
            ids[i] = (v >> 28) == 0xf ? (int32_t)v : (int32_t)(v % (uint32_t)(vocab + 2)) - 1;
        }
        if (op == 1) {
            char *text = NULL;
            size_t len = 0;
            if (tok_decode(t, ids, n_ids, (int)(fl & 1), &text, &len) == 0) {
                if (text[len] != 0) abort(); /* NUL-terminated as promised */
                free(text);
            }
        } else {
            do_stream(t, bytelevel, ids, n_ids);
        }
        free(ids);
    } else {
        /* chat: NUL-separated role, content, role, content... */
        char *copy = malloc(n + 1);
        if (!copy) return 0;
        memcpy(copy, p, n);
        copy[n] = 0;
        tok_chat_msg msgs[8];
        size_t n_msgs = 0;
        char *s = copy, *end = copy + n;
        while (n_msgs < 8 && s < end) {
            msgs[n_msgs].role = s;
            s += strlen(s) + 1;
            msgs[n_msgs].content = s < end ? s : "";
            if (s < end) s += strlen(s) + 1;
            n_msgs++;
        }
        char *prompt = NULL;
        if (tok_chat_render(t, msgs, n_msgs, (int)(fl & 1), &prompt) == 0) {
            int32_t *ids = NULL;
            size_t n_ids = 0;
            if (tok_encode(t, prompt, strlen(prompt), TOK_PARSE_SPECIAL, &ids, &n_ids) == 0)
                free(ids);
            free(prompt);
        }
        free(copy);
    }
    return 0;
}

/* fuzz_tok_common: exercises a loaded tokenizer the way the router and the
 * engine do (header only, shared by the tokenizer fuzz targets). */
#ifndef TANDEM_TESTS_FUZZ_TOK_COMMON_H
#define TANDEM_TESTS_FUZZ_TOK_COMMON_H

#include <stdint.h>
#include <stdlib.h>

#include "engine/tokenizer/tok.h"

/* Encodes and decodes a few fixed texts, decodes and streams the first ids of
 * the vocabulary (plus out-of-range ones), renders a chat: everything a
 * freshly loaded, possibly odd, vocabulary must survive. */
static inline void fuzz_tok_exercise(const tok_tokenizer *t)
{
    static const char *const texts[] = {
        "",
        "a",
        " Hello  world\n\t<s></s><|im_end|> 12345",
        "\xe4\xbd\xa0\xe5\xa5\xbd\xf0\x9f\x98",
        "\xff\xfe\xc3",
        "<unk>ab\xe2\x96\x81"
        "ab ba",
    };
    int n_vocab = tok_vocab_size(t);
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        for (int flags = 0; flags < 4; flags++) {
            int32_t *ids = NULL;
            size_t n = 0;
            if (tok_encode(t, texts[i], strlen(texts[i]), flags, &ids, &n) == 0) {
                char *text = NULL;
                size_t len = 0;
                if (tok_decode(t, ids, n, flags & 1, &text, &len) == 0) free(text);
            }
            free(ids);
        }
    }
    int32_t ids[300];
    size_t n = 0;
    for (int32_t id = -2; id < n_vocab + 2 && n < sizeof(ids) / sizeof(ids[0]); id++)
        ids[n++] = id;
    char *text = NULL;
    size_t len = 0;
    if (tok_decode(t, ids + 2, n > 4 ? n - 4 : 0, 0, &text, &len) == 0) free(text);
    tok_stream *st = NULL;
    if (tok_stream_create(t, &st) == 0) {
        char out[64];
        size_t w;
        for (size_t i = 0; i < n; i++)
            (void)tok_stream_push(st, ids[i], out, (i % 7) * 9 + 1, &w);
        (void)tok_stream_flush(st, out, sizeof(out), &w);
        tok_stream_free(st);
    }
    for (int32_t id = -1; id < n_vocab && id < 300; id++) {
        const char *piece;
        size_t plen;
        (void)tok_piece(t, id, &piece, &plen);
        (void)tok_is_special(t, id);
        (void)tok_is_eog(t, id);
    }
    tok_chat_msg msgs[] = {
        {"system", "Be brief."}, {"user", "hi"}, {"assistant", "hello"}, {"user", " again "}};
    char *prompt = NULL;
    if (tok_chat_render(t, msgs, 4, 1, &prompt) == 0) free(prompt);
    (void)tok_bos_id(t);
    (void)tok_eos_id(t);
    (void)tok_adds_bos(t);
}

#endif

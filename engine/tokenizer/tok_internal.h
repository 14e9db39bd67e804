/* tok internals shared between the tokenizer's files (prefix tok__). */
#ifndef TANDEM_ENGINE_TOKENIZER_TOK_INTERNAL_H
#define TANDEM_ENGINE_TOKENIZER_TOK_INTERNAL_H

#include "engine/tokenizer/tok.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum tok__kind {
    TOK__KIND_L2C = 1, /* llama2.c tokenizer.bin: merges by score */
    TOK__KIND_BPE = 2, /* Hugging Face BPE: merges by rank */
};

/* Pre-tokenizer regexes, each implemented by hand (tok_pretok.c). */
enum tok__split {
    TOK__SPLIT_GPT2 = 1,      /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|... */
    TOK__SPLIT_LLAMA3 = 2,    /* (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|... */
    TOK__SPLIT_QWEN2 = 3,     /* as LLAMA3 with \p{N} one digit at a time */
    TOK__SPLIT_METASPACE = 4, /* split before every U+2581 (Metaspace split=true) */
};
#define TOK__MAX_SPLITS 4
#define TOK__MAX_EOS    8

/* Bits of tok_tokenizer.attr[id]. */
enum {
    TOK__ATTR_SPECIAL = 1 << 0, /* skipped by decode with skip_special */
    TOK__ATTR_ADDED = 1 << 1,   /* an added token (tokenizer.json added_tokens) */
    TOK__ATTR_BYTE = 1 << 2,    /* a <0xNN> byte token */
};

/* Open-addressing hash map from a piece (bytes) to its id; slots hold ids
 * (-1 = empty), keys are compared against the tokenizer's piece table. */
typedef struct tok__vmap {
    int32_t *slots;
    uint32_t mask; /* slot count - 1 (a power of two) */
} tok__vmap;

/* Hash map from a pair of ids to (rank, merged id). */
typedef struct tok__mmap {
    uint64_t *keys; /* (left << 32) | right; UINT64_MAX = empty */
    int32_t *rank;
    int32_t *merged;
    uint32_t mask;
    uint32_t count;
} tok__mmap;

typedef struct tok__added {
    int32_t id;
    uint32_t off, len; /* content in the arena */
    bool special, lstrip, rstrip;
} tok__added;

struct tok_tokenizer {
    enum tok__kind kind;
    int32_t n_vocab; /* ids are 0..n_vocab-1; holes have empty pieces */

    /* All strings live in one arena. piece_*: the text of token id as the
     * vocabulary spells it; dec_*: the bytes it decodes to. */
    char *arena;
    size_t arena_len, arena_cap;
    uint32_t *piece_off, *piece_len; /* [n_vocab] */
    uint32_t *dec_off, *dec_len;     /* [n_vocab] */
    uint8_t *attr;                   /* [n_vocab] TOK__ATTR_* */
    float *scores;                   /* [n_vocab], llama2.c only */

    tok__vmap vocab; /* model vocabulary (not added tokens) */
    tok__mmap merges;
    int32_t byte_id[256]; /* byte fallback <0xNN> id, or byte-level char id; -1 none */

    tok__added *added; /* sorted by first byte, then longest first */
    size_t n_added;
    uint32_t added_first[257]; /* added[added_first[b] .. added_first[b+1]) start with byte b */

    /* Hugging Face pipeline, as declared by tokenizer.json. */
    bool byte_level;      /* ByteLevel: bytes mapped to printable code points */
    char bl_utf8[256][2]; /* ByteLevel: UTF-8 of the code point of each byte */
    uint8_t bl_len[256];
    bool prefix_space;       /* ByteLevel add_prefix_space */
    bool norm_prepend;       /* Prepend "▁" to each non-empty segment */
    bool norm_prepend_first; /* ... only to the segment at the start of the text */
    bool norm_space_meta;    /* Replace " " with "▁" */
    enum tok__split splits[TOK__MAX_SPLITS];
    int n_splits;
    bool byte_fallback; /* model: unknown chars become <0xNN> */
    bool ignore_merges; /* model: a word found whole in the vocab is one token */
    bool fuse_unk;
    int32_t unk_id;
    bool dec_strip_space; /* decoder strips one leading space of the output */
    /* Decoder ByteFallback: a run of consecutive <0xNN> tokens (attr BYTE)
     * that is not valid UTF-8 as a whole decodes to one U+FFFD per byte of
     * the run, valid bytes inside it included (Hugging Face's rule). */
    bool dec_byte_runs;
    /* SentencePiece-style vocabularies without a pre-tokenizer: when no piece
     * holds the space mark (U+2581, or ' ' for llama2.c) after another
     * character, no merge can cross the start of a "▁word", so each one is
     * merged on its own: same ids, small heaps. Decided at load. */
    bool split_words;
    char word_mark[3];
    uint8_t word_mark_len;

    int32_t bos_id, eos_id;
    int32_t eos_ids[TOK__MAX_EOS]; /* every id that ends generation */
    int n_eos;
    bool add_bos;
    enum tok_chat_family chat;
    /* ChatML templates (Qwen) that add a system turn when the conversation
     * has none: its text in the arena. */
    bool chat_default_system;
    uint32_t chat_system_off, chat_system_len;
};

/* --- tok.c --- */
int tok__alloc_vocab(tok_tokenizer *t, int32_t n_vocab);
/* Copies bytes into the arena; *off receives their offset. */
int tok__arena_put(tok_tokenizer *t, const void *bytes, size_t len, uint32_t *off);
int tok__vmap_build(tok_tokenizer *t, const int32_t *ids, size_t n);
int32_t tok__vmap_find(const tok_tokenizer *t, const void *bytes, size_t len);
int tok__mmap_init(tok__mmap *m, size_t n);
int tok__mmap_put(tok__mmap *m, int32_t left, int32_t right, int32_t rank, int32_t merged);
bool tok__mmap_find(const tok__mmap *m, int32_t left, int32_t right, int32_t *rank,
                    int32_t *merged);
int tok__read_file(const char *path, size_t max, char **data, size_t *len, char *err,
                   size_t errlen);
/* Parses "<0xNN>"; returns the byte or -1. */
int tok__parse_byte_piece(const char *s, size_t len);

/* --- tok_utf8 (in tok_pretok.c) --- */
/* Decodes one code point at s[i] (i < n); returns its length in bytes. An
 * invalid or truncated sequence decodes as one byte with *cp = 0xFFFD. */
size_t tok__utf8_next(const uint8_t *s, size_t n, size_t i, uint32_t *cp);
bool tok__is_letter(uint32_t cp);
bool tok__is_number(uint32_t cp);
bool tok__is_space(uint32_t cp); /* Unicode White_Space */
/* The Unicode version of the letter/number tables, e.g. "16.0.0". */
const char *tok__unicode_version(void);
/* Length of the pre-token that starts at s[i] (i < n) under split kind k. */
size_t tok__split_next(enum tok__split k, const uint8_t *s, size_t n, size_t i);
/* Writes in[0..n) as valid UTF-8 into out (NULL: count only), replacing each
 * maximal invalid subpart by U+FFFD. When !final a trailing sequence that may
 * still complete is left unconsumed. Returns bytes written; *used = bytes
 * consumed. out needs 3 * n bytes at most. */
size_t tok__utf8_sanitize(const uint8_t *in, size_t n, char *out, bool final, size_t *used);

/* --- tok_l2c.c --- */
int tok__l2c_load(tok_tokenizer *t, const char *data, size_t len, char *err, size_t errlen);
int tok__l2c_encode(const tok_tokenizer *t, const char *text, size_t len, bool add_bos,
                    int32_t **ids, size_t *n_ids);

/* --- tok_gguf.c --- */
/* The "llama" (SentencePiece) tokenizer in a GGUF file's metadata. */
int tok__gguf_load(tok_tokenizer *t, const char *path, char *err, size_t errlen);

/* --- tok_hf.c --- */
int tok__hf_load(tok_tokenizer *t, const char *json_path, char *err, size_t errlen);
int tok__hf_load_gpt2(tok_tokenizer *t, const char *vocab_path, char *err, size_t errlen);
int tok__hf_encode(const tok_tokenizer *t, const char *text, size_t len, int flags, int32_t **ids,
                   size_t *n_ids);

/* --- growable id vector and the BPE merge loop (tok_bpe.c) --- */
typedef struct tok__ids {
    int32_t *v;
    size_t n, cap;
} tok__ids;
int tok__ids_push(tok__ids *ids, int32_t id);

/* One symbol of a word being merged. */
typedef struct tok__sym {
    int32_t id;
    int32_t prev, next; /* indexes in the word, -1 at the ends */
    uint32_t off, len;  /* bytes of the symbol in the word's text */
} tok__sym;

/* Scratch space for merging one word; grows as needed, reused across words. */
typedef struct tok__bpe_scratch {
    tok__sym *sym;
    size_t sym_cap;
    struct tok__heap_ent *heap;
    size_t heap_cap;
} tok__bpe_scratch;
void tok__bpe_scratch_free(tok__bpe_scratch *s);
/* Sets split_words when the model vocabulary allows it (see above). */
void tok__check_split_words(tok_tokenizer *t, const char *mark, size_t mark_len);
/* End of the word that starts at text[i]: a run of marks, then everything
 * up to the next mark. */
size_t tok__word_end(const tok_tokenizer *t, const char *text, size_t n, size_t i);
int tok__bpe_reserve(tok__bpe_scratch *s, size_t n_sym);
/* Merges sym[0..n) (linked in order) and appends the resulting ids to out.
 * text: the word's bytes (symbols point into it). By rank (merges map) for
 * TOK__KIND_BPE, by best score of the concatenated piece for TOK__KIND_L2C. */
int tok__bpe_merge(const tok_tokenizer *t, tok__bpe_scratch *s, const char *text, size_t n,
                   tok__ids *out);

#endif

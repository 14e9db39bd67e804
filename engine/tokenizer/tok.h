/* tok: tokenizers for Llama-family models, a library of its own (tandem_tokenizer)
 * so the router and the load tester can link it without the engine.
 *
 * Formats:
 *   - Hugging Face tokenizer.json BPE, byte-level (GPT-2, Llama 3, Qwen2) and
 *     SentencePiece-style with U+2581 and byte fallback (Llama 2, Mistral, TinyLlama),
 *     with added/special tokens; BOS/EOS and the chat template family come from
 *     tokenizer_config.json (and config.json / generation_config.json) beside it.
 *   - llama2.c tokenizer.bin.
 *
 * A loaded tok_tokenizer is immutable and may be shared by many threads.
 * Errors: 0 or a negative TD_E* code (common/err.h); loaders also write a
 * human-readable reason into err[errlen] when err is not NULL.
 */
#ifndef TANDEM_ENGINE_TOKENIZER_TOK_H
#define TANDEM_ENGINE_TOKENIZER_TOK_H

#include <stddef.h>
#include <stdint.h>

typedef struct tok_tokenizer tok_tokenizer;

/* path: a tokenizer.json file, a directory holding tokenizer.json, or a
 * llama2.c tokenizer.bin. Also accepted: a GPT-2 style vocab.json (merges.txt
 * beside it), and a directory holding vocab.json + merges.txt or
 * tokenizer.bin / tok512.bin when it has no tokenizer.json. A file is JSON
 * or llama2.c binary by its content; a JSON file named *vocab.json is read
 * as GPT-2's vocab.json. Pipeline parts the library
 * does not implement are refused with TD_EUNSUPPORTED and named in err;
 * malformed files give TD_EFORMAT. On success *out is owned by the caller
 * (tok_free). */
int tok_load(const char *path, tok_tokenizer **out, char *err, size_t errlen);
void tok_free(tok_tokenizer *tok); /* accepts NULL */

int tok_vocab_size(const tok_tokenizer *tok);
int32_t tok_bos_id(const tok_tokenizer *tok); /* -1 when the vocabulary has none */
int32_t tok_eos_id(const tok_tokenizer *tok); /* -1 when the vocabulary has none */
/* True when the model's config asks for BOS to be prepended (add_bos_token). */
int tok_adds_bos(const tok_tokenizer *tok);
/* True when id ends generation: the EOS id or any eos_token_id listed in
 * generation_config.json / config.json (Llama 3 instruct: <|eot_id|> too). */
int tok_is_eog(const tok_tokenizer *tok, int32_t id);
/* True when id is a special token (skipped by tok_decode with skip_special). */
int tok_is_special(const tok_tokenizer *tok, int32_t id);
/* The vocabulary's spelling of id (e.g. "\u2581Hello", "<0x0A>", "<|eot_id|>"):
 * *piece points into tok (not NUL-terminated), valid until tok_free.
 * TD_ERANGE for an id outside the vocabulary. */
int tok_piece(const tok_tokenizer *tok, int32_t id, const char **piece, size_t *len);

/* Checks that tok fits a model whose embedding has model_vocab rows: every
 * token id must be a row, so a larger tokenizer is refused. A smaller one is
 * refused too when exact is set (llama2.c checkpoints, made for one
 * tokenizer); Hugging Face models often pad the embedding past the
 * tokenizer, and ids there have no text (tok_decode gives TD_ERANGE).
 * Returns 0 or TD_EMISMATCH with the two sizes in err. */
int tok_check_model_vocab(const tok_tokenizer *tok, int model_vocab, int exact, char *err,
                          size_t errlen);

/* Parses s[0..len) as a token id: a whole decimal number (digits only; no
 * sign, white space or trailing text) below n_vocab. Returns 0 with *id set,
 * TD_EINVAL when s is not such a number, TD_ERANGE when it is n_vocab or
 * more. For command lines and request bodies that name ids as text. */
int tok_parse_id(const char *s, size_t len, int32_t n_vocab, int32_t *id);

enum tok_encode_flags {
    TOK_ADD_BOS = 1 << 0,       /* prepend BOS (when the vocabulary has one) */
    TOK_PARSE_SPECIAL = 1 << 1, /* recognise special-token text such as "<|eot_id|>" */
};
/* Added tokens that are not special (tokenizer.json "special": false) are
 * always recognised, as Hugging Face tokenizers do. */

/* Encodes text[0..len) (UTF-8; invalid bytes are encoded through byte tokens,
 * never dropped). On success *ids is malloc'd, owned by the caller (free()),
 * and *n_ids is its length. */
int tok_encode(const tok_tokenizer *tok, const char *text, size_t len, int flags, int32_t **ids,
               size_t *n_ids);

/* Decodes ids into malloc'd, NUL-terminated *text (caller frees); *len excludes
 * the NUL. Special tokens are skipped when skip_special is non-zero. The
 * output is always valid UTF-8: invalid byte sequences become U+FFFD. The
 * SentencePiece-style leading space is dropped as the model's decoder says:
 * at the start of the text for tokenizer.json ("Strip" / Metaspace), right
 * after BOS for llama2.c (as its run.c prints). TD_ERANGE for an id outside
 * the vocabulary. */
int tok_decode(const tok_tokenizer *tok, const int32_t *ids, size_t n_ids, int skip_special,
               char **text, size_t *len);

/* Incremental detokenization for streaming: push one id at a time, get the
 * newly completed text. Never emits a partial UTF-8 sequence; bytes that can
 * never become valid UTF-8 are emitted as U+FFFD. Special tokens produce no
 * text. A stream continues a text, so pieces keep their leading space except
 * right after BOS (SentencePiece-style vocabularies). One stream per
 * sequence; a stream is not thread-safe, the tokenizer is. */
typedef struct tok_stream tok_stream;
int tok_stream_create(const tok_tokenizer *tok, tok_stream **out); /* tok must outlive it */
void tok_stream_free(tok_stream *st);                              /* accepts NULL */
/* Appends the text completed by id to out[0..cap) and NUL-terminates it;
 * *written excludes the NUL. TD_ERANGE when cap is too small (nothing consumed). */
int tok_stream_push(tok_stream *st, int32_t id, char *out, size_t cap, size_t *written);
/* Emits whatever is still held back (as U+FFFD for incomplete sequences). */
int tok_stream_flush(tok_stream *st, char *out, size_t cap, size_t *written);

/* Chat templates, chosen from tokenizer_config.json (Llama 3, Llama 2, ChatML). */
enum tok_chat_family {
    TOK_CHAT_NONE = 0,
    TOK_CHAT_LLAMA3,
    TOK_CHAT_LLAMA2,
    TOK_CHAT_CHATML,
};
typedef struct tok_chat_msg {
    const char *role;    /* "system", "user" or "assistant" */
    const char *content; /* UTF-8, NUL-terminated */
} tok_chat_msg;
enum tok_chat_family tok_chat_family_of(const tok_tokenizer *tok);
/* Renders messages into a malloc'd prompt string (caller frees). With
 * add_generation_prompt the text ends where the assistant's reply begins.
 * The text holds the BOS token's text where the template does (Llama 3,
 * Llama 2): encode it with TOK_PARSE_SPECIAL and without TOK_ADD_BOS.
 * Llama 3 renders the 3.0 template (content trimmed); Llama 2 folds a leading
 * system message into the first user turn and requires user/assistant
 * alternation (TD_EINVAL otherwise); ChatML adds Qwen's default system prompt
 * when the template has one. TD_EINVAL for a role other than system, user,
 * assistant. TD_EUNSUPPORTED when the tokenizer has no known chat template. */
int tok_chat_render(const tok_tokenizer *tok, const tok_chat_msg *msgs, size_t n_msgs,
                    int add_generation_prompt, char **out);
/* tok_chat_render in the given family instead of the tokenizer's own (the
 * router's --chat-template naming a known family); BOS/EOS text comes from
 * tok. TD_EUNSUPPORTED for TOK_CHAT_NONE. */
int tok_chat_render_as(const tok_tokenizer *tok, enum tok_chat_family family,
                       const tok_chat_msg *msgs, size_t n_msgs, int add_generation_prompt,
                       char **out);

/* Stop strings (matched on detokenized text by whoever detokenizes: the
 * router, tandem-generate). Looks for the earliest occurrence of any of
 * stops[0..n) (NUL-terminated; empty ones never match) in text[0..len).
 * Returns 1 and sets *cut to the byte offset where the match starts (the text
 * to return is text[0..*cut)), or 0 when none occurs. To check only new text
 * cheaply, pass the tail that starts (longest stop - 1) bytes before the
 * newly added text. */
int tok_stop_find(const char *text, size_t len, const char *const *stops, size_t n, size_t *cut);

/* Bytes at the end of text[0..len) that a streaming caller must hold back
 * because they could be the start of a stop string (the longest suffix of
 * text that is a proper prefix of some stop string). */
size_t tok_stop_holdback(const char *text, size_t len, const char *const *stops, size_t n);

#endif

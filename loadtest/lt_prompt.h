/* lt_prompt: prompts of an exact token count for the served tokenizer, distinct
 * per request.
 *
 * A prompt of n tokens is n units (n - 1 when the tokenizer prepends BOS, see
 * tok_adds_bos, so the server sees exactly n): a head of up to
 * LT_PROMPT_HEAD_UNITS units that spell the request's variant number in base
 * n_alt with single-token words (the first digit first, so consecutive
 * requests differ in their very first token and share no KV-cache prefix
 * block), then filler units " w" of one word w. Words are searched among
 * common English words for ones that encode to one token each, in any order;
 * that is checked by encoding probes at creation, and every prompt a run
 * uses can be checked with lt_prompt_count. Every filler unit has the same
 * bytes, so the tail is a slice of one long buffer: building a request copies
 * only the small head.
 *
 * Without a tokenizer, the same layout gives a JSON array body of token ids
 * ("101,100,100,...") that OpenAI-compatible servers accept as `prompt`.
 */
#ifndef TANDEM_LOADTEST_LT_PROMPT_H
#define TANDEM_LOADTEST_LT_PROMPT_H

#include <stddef.h>
#include <stdint.h>

typedef struct lt_prompt lt_prompt;

#define LT_PROMPT_HEAD_UNITS 6   /* units that vary per request */
#define LT_PROMPT_HEAD_MAX   256 /* bytes of a head */

/* A prompt as written: head (per request) then tail (shared bytes). */
typedef struct lt_prompt_parts {
    char head[LT_PROMPT_HEAD_MAX];
    size_t head_len;
    const char *tail; /* points into the lt_prompt; valid while it lives */
    size_t tail_len;
} lt_prompt_parts;

/* Shared prompt blocks (Mooncake hash_ids): token block j of the prompt,
 * block_tokens tokens long, starts with the head of hashes[j] instead of the
 * request's variant, so requests that share leading hash ids share those
 * blocks' text exactly (and so their KV prefix); tokens past the last hash id
 * start a block headed by the request's variant. */
typedef struct lt_prompt_shape {
    const uint64_t *hashes; /* [n_hash], borrowed */
    uint32_t n_hash;
    int32_t block_tokens; /* >= 1; Mooncake's traces use 512 */
} lt_prompt_shape;

/* Loads the tokenizer at path (tokenizer.json, its directory, or a llama2.c
 * tokenizer.bin; see tok_load) and prepares prompts of up to max_tokens
 * tokens. On success *out is owned by the caller (lt_prompt_free).
 * TD_EUNSUPPORTED when built without the tokenizer library; TD_ENOENT when no
 * candidate word encodes to one token per repetition. */
int lt_prompt_create_text(const char *path, int32_t max_tokens, lt_prompt **out, char *err,
                          size_t errlen);

/* Token-id prompts: ids id..id+15 in the head, id in the tail, up to
 * max_tokens ids. id must be in [0, INT32_MAX - 16]. */
int lt_prompt_create_ids(int32_t id, int32_t max_tokens, lt_prompt **out);

void lt_prompt_free(lt_prompt *p); /* accepts NULL */

/* 1 for text prompts (a JSON string), 0 for id arrays. */
int lt_prompt_is_text(const lt_prompt *p);

/* The prompt for n tokens of request `variant` (n below 1 is treated as 1,
 * above the maximum as the maximum). The bytes need no JSON escaping. */
void lt_prompt_get(const lt_prompt *p, int32_t n, uint64_t variant, lt_prompt_parts *out);

/* The same prompt as one malloc'd NUL-terminated string (caller frees); with
 * shape (may be NULL) for shared blocks. 0 or TD_ENOMEM. */
int lt_prompt_text(const lt_prompt *p, int32_t n, uint64_t variant, const lt_prompt_shape *shape,
                   char **out, size_t *len);

/* Id prompts: writes the ids of the prompt for n tokens into ids[cap];
 * returns how many (0 for text prompts or when cap is too small). */
size_t lt_prompt_ids(const lt_prompt *p, int32_t n, uint64_t variant, const lt_prompt_shape *shape,
                     uint32_t *ids, size_t cap);

/* Token count of the prompt for (n, variant, shape) when encoded the way the
 * server does (with BOS when the tokenizer adds it). 0 and *count, or
 * TD_EUNSUPPORTED for id prompts. */
int lt_prompt_count(const lt_prompt *p, int32_t n, uint64_t variant, const lt_prompt_shape *shape,
                    int32_t *count);

/* The filler word in use ("" for id prompts), and how many head words. */
const char *lt_prompt_word(const lt_prompt *p);
int lt_prompt_n_alt(const lt_prompt *p);

#endif

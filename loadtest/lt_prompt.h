/* lt_prompt: prompts of an exact token count for the served tokenizer.
 *
 * A prompt of n tokens is a word w followed by (k - 1) copies of " w", where
 * k = n, or n - 1 when the tokenizer prepends BOS (tok_adds_bos), so the
 * server sees exactly n prompt tokens. The word is searched among candidates
 * ("the", "hello", "a", ...) for one whose repetitions encode to one token
 * each; that is verified by encoding several lengths, and every length a run
 * uses can be verified too (lt_prompt_verify). Because every unit has the
 * same bytes, the prompt for n tokens is a prefix of one long buffer: building
 * a request copies nothing.
 *
 * Without a tokenizer, lt_prompt_ids gives the same prefix trick for a JSON
 * array of token ids ("100,100,...") that OpenAI-compatible servers accept
 * as `prompt`.
 */
#ifndef TANDEM_LOADTEST_LT_PROMPT_H
#define TANDEM_LOADTEST_LT_PROMPT_H

#include <stddef.h>
#include <stdint.h>

typedef struct lt_prompt lt_prompt;

/* Loads the tokenizer at path (tokenizer.json, its directory, or a llama2.c
 * tokenizer.bin; see tok_load) and prepares prompts of up to max_tokens
 * tokens. On success *out is owned by the caller (lt_prompt_free).
 * TD_EUNSUPPORTED when built without the tokenizer library; TD_ENOENT when no
 * candidate word encodes to one token per repetition. */
int lt_prompt_create_text(const char *path, int32_t max_tokens, lt_prompt **out, char *err,
                          size_t errlen);

/* Token-id prompts: the JSON array body "id,id,...,id" (without brackets) of
 * up to max_tokens copies of id. */
int lt_prompt_create_ids(int32_t id, int32_t max_tokens, lt_prompt **out);

void lt_prompt_free(lt_prompt *p); /* accepts NULL */

/* 1 for text prompts (a JSON string), 0 for id arrays. */
int lt_prompt_is_text(const lt_prompt *p);

/* The prompt for n tokens (n >= 1; values below 1 are treated as 1, above the
 * maximum as the maximum): *text points into p (valid while p lives), *len its
 * length in bytes. The bytes need no JSON escaping. */
void lt_prompt_get(const lt_prompt *p, int32_t n, const char **text, size_t *len);

/* Token count of the prompt for n when encoded the way the server does (with
 * BOS when the tokenizer adds it). 0 and *count, or TD_EUNSUPPORTED for id prompts. */
int lt_prompt_count(const lt_prompt *p, int32_t n, int32_t *count);

/* The filler word in use ("" for id prompts). */
const char *lt_prompt_word(const lt_prompt *p);

#endif

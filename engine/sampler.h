/* sampler: picks the next token from logits, per request, reproducibly.
 *
 * Order of operations (the usual one in vLLM / llama.cpp):
 *   1. EOS and stop ids are masked (-inf) while fewer than min_tokens were generated;
 *   2. temperature <= 0: greedy (argmax, lowest id on ties) and we stop here;
 *   3. logits / temperature, softmax;
 *   4. top-k (k > 0): keep the k most likely (ties broken by lower id; a heap
 *      up to k = 1,024, the select of step 5 by count above);
 *   5. top-p (0 < p < 1): keep the smallest prefix, by decreasing probability
 *      (ties: the lower id first), whose mass reaches p of the whole (of what
 *      top-k kept, after top-k). Alone, it is found without sorting the
 *      vocabulary (a radix select on the probabilities, sampler.c) and drawn
 *      from in id order;
 *   6. draw from what is left with one uniform number that depends only on
 *      (seed, index of the token being generated): same seed, same logits ->
 *      same tokens, also when the first token is drawn by one process (a
 *      prefill worker) and the rest by another that accepted it first.
 * Finish: after each accepted token smp_accept reports stop (EOS unless
 * ignore_eos, a stop id, max_tokens reached) or continue.
 *
 * A smp_sampler is owned by one request and used by one thread at a time.
 */
#ifndef TANDEM_ENGINE_SAMPLER_H
#define TANDEM_ENGINE_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

typedef struct smp_params {
    float temperature; /* <= 0: greedy */
    int top_k;         /* <= 0: off */
    float top_p;       /* >= 1 or <= 0: off */
    uint64_t seed;
    int max_tokens;          /* > 0: stop after this many generated tokens; 0: no limit */
    int min_tokens;          /* EOS and stop ids are suppressed before this many */
    int ignore_eos;          /* EOS does not stop generation (it may still be sampled) */
    int32_t eos_id;          /* -1: none */
    const int32_t *stop_ids; /* extra stop token ids, copied at create */
    int n_stop_ids;
} smp_params;

/* Defaults: greedy, no top-k/top-p, seed 0, no limits, eos -1. */
void smp_params_defaults(smp_params *p);

enum smp_finish {
    SMP_CONTINUE = 0,
    SMP_STOP_EOS = 1,    /* the EOS token was generated */
    SMP_STOP_TOKEN = 2,  /* a stop id was generated */
    SMP_STOP_LENGTH = 3, /* max_tokens reached */
};

typedef struct smp_sampler smp_sampler;

/* vocab_size: logits length. On success *out is owned by the caller (smp_free). */
int smp_create(const smp_params *p, int vocab_size, smp_sampler **out);
void smp_free(smp_sampler *s); /* accepts NULL */

/* Picks a token from logits[vocab_size], which it overwrites (masked ids,
 * then the softmax numerators): a sampler keeps no copy of the vocabulary,
 * and one with neither top-k nor top-p no scratch at all. Allocates nothing. Returns 0, or
 * TD_ERANGE when any logit is NaN: the forward pass is broken (NaN weights, an overflow) and no
 * token is drawn. The check rides on the argmax scan, so it costs nothing; it touches only this
 * request's sampler, so a server fails the one request whose logits are NaN (smp_logits_find_nan
 * names the first id for the message), not the worker. */
int smp_sample(smp_sampler *s, float *logits, int32_t *token);

/* The first id whose logit is NaN in logits[0..n), or -1 when none is. */
int smp_logits_find_nan(const float *logits, int n);

/* Records a generated token and says whether generation ends with it. */
enum smp_finish smp_accept(smp_sampler *s, int32_t token);

/* Tokens accepted so far. */
int smp_generated(const smp_sampler *s);

/* Stop strings are matched on text: tok_stop_find / tok_stop_holdback in
 * engine/tokenizer/tok.h. */

#endif

/* tandem-kvc-bench: speed of the KV block bookkeeping (kvc) and of the
 * scheduler core (sch), each printed beside a reference measured in the same run.
 *
 *   tandem-kvc-bench [n_seqs]     (default 256 sequences)
 *
 * 1. kvc grow/free: n_seqs sequences decode one token at a time (a block is
 *    taken every block_size tokens), then are freed; reference: the same number
 *    of pushes and pops on a bare array stack, the floor for any O(1) pool.
 * 2. kvc prefix hits: sequences whose 1024-token prompt is cached (64 blocks
 *    hashed and matched per allocation); reference: XXH3 over the same bytes.
 * 3. sch steps: n_seqs running sequences decode (schedule + update of a
 *    256-sequence batch per step); reference: a 10 ms forward pass, a typical
 *    GPU decode step, to show the scheduler's share of a step.
 */
#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "engine/kvcache/kvc.h"
#include "engine/sched/sch.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#define BS 16

static int bench_grow_free(uint32_t n_seqs)
{
    const uint32_t tokens_per_seq = 2048; /* 128 blocks each */
    const int rounds = 4;
    kvc_config cfg = {.num_blocks = n_seqs * (tokens_per_seq / BS),
                      .block_size = BS,
                      .max_seqs = n_seqs,
                      .max_blocks_per_seq = tokens_per_seq / BS};
    kvc_pool *p = NULL;
    int rc = kvc_pool_create(&cfg, &p);
    if (rc < 0) return rc;
    int64_t *ids = malloc(n_seqs * sizeof *ids);
    if (!ids) {
        kvc_pool_free(p);
        return TD_ENOMEM;
    }
    int32_t tok = 1;
    /* Each figure is the best of `rounds` rounds: the machine is shared. */
    const uint64_t grows = (uint64_t)n_seqs * (tokens_per_seq - 1);
    const uint64_t blocks = (uint64_t)n_seqs * (tokens_per_seq / BS);
    int64_t dt = INT64_MAX, adt = INT64_MAX, rdt = INT64_MAX;
    for (int r = 0; r < rounds; r++) {
        int64_t t0 = td_now_ns();
        for (uint32_t s = 0; s < n_seqs; s++) {
            kvc_seq_spec spec = {.tokens = &tok, .n_prompt = 1, .n_slots = 1};
            if ((rc = kvc_seq_alloc(p, &spec, &ids[s], NULL)) < 0) goto out;
        }
        /* Interleaved like a decode batch: every sequence grows by one token. */
        for (uint32_t t = 1; t < tokens_per_seq; t++)
            for (uint32_t s = 0; s < n_seqs; s++) {
                if ((rc = kvc_seq_grow(p, ids[s], 1, NULL)) < 0) goto out;
            }
        for (uint32_t s = 0; s < n_seqs; s++)
            if ((rc = kvc_seq_free(p, ids[s])) < 0) goto out;
        int64_t d = td_now_ns() - t0;
        if (d < dt) dt = d;
    }

    /* Whole-sequence allocations: 128 blocks taken at once, then freed. */
    for (int r = 0; r < rounds; r++) {
        int64_t a0 = td_now_ns();
        for (uint32_t s = 0; s < n_seqs; s++) {
            kvc_seq_spec spec = {.tokens = &tok, .n_prompt = 1, .n_slots = tokens_per_seq};
            if ((rc = kvc_seq_alloc(p, &spec, &ids[s], NULL)) < 0) goto out;
        }
        for (uint32_t s = 0; s < n_seqs; s++)
            if ((rc = kvc_seq_free(p, ids[s])) < 0) goto out;
        int64_t d = td_now_ns() - a0;
        if (d < adt) adt = d;
    }

    /* Reference: the same block count pushed and popped on a plain stack. */
    uint32_t nb = cfg.num_blocks;
    int32_t *stack = malloc(nb * sizeof *stack);
    if (!stack) {
        rc = TD_ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < nb; i++)
        stack[i] = (int32_t)i;
    int32_t *taken = malloc(nb * sizeof *taken);
    if (!taken) {
        free(stack);
        rc = TD_ENOMEM;
        goto out;
    }
    volatile int32_t sink = 0;
    for (int r = 0; r < rounds; r++) {
        int64_t r0 = td_now_ns();
        uint32_t top = nb;
        for (uint32_t i = 0; i < nb; i++)
            taken[i] = stack[--top];
        for (uint32_t i = 0; i < nb; i++)
            stack[top++] = taken[i];
        sink += taken[nb - 1];
        int64_t d = td_now_ns() - r0;
        if (d < rdt) rdt = d;
    }
    (void)sink;
    free(taken);
    free(stack);
    printf("kvc decode growth: %u seqs x %u tokens, one token per call (best of %d): "
           "%.1f M grow calls/s (%.1f ns each)\n",
           n_seqs, tokens_per_seq, rounds, grows / (dt / 1e3), (double)dt / grows);
    printf("kvc block alloc+free (%u-block sequences): %.1f M blocks/s (%.1f ns per block); "
           "reference bare stack pop+push: %.1f M/s\n",
           tokens_per_seq / BS, blocks / (adt / 1e3), (double)adt / blocks,
           blocks / (rdt / 1e3 + 1e-9));
out:
    free(ids);
    kvc_pool_free(p);
    return rc;
}

static int bench_prefix_hits(uint32_t n_seqs)
{
    const uint32_t n_prompt = 1024 + 1;
    kvc_config cfg = {.num_blocks = (n_prompt / BS + 2) * 2,
                      .block_size = BS,
                      .max_seqs = 4,
                      .enable_prefix_cache = true};
    kvc_pool *p = NULL;
    int rc = kvc_pool_create(&cfg, &p);
    if (rc < 0) return rc;
    int32_t *prompt = malloc(n_prompt * sizeof *prompt);
    if (!prompt) {
        kvc_pool_free(p);
        return TD_ENOMEM;
    }
    for (uint32_t i = 0; i < n_prompt; i++)
        prompt[i] = (int32_t)(i * 2654435761u % 32000);
    kvc_seq_spec spec = {.tokens = prompt, .n_prompt = n_prompt, .n_slots = n_prompt};
    int64_t first;
    if ((rc = kvc_seq_alloc(p, &spec, &first, NULL)) < 0) goto out;
    if ((rc = kvc_seq_commit(p, first, prompt, n_prompt)) < 0) goto out;
    uint32_t n_cached = 0;
    uint64_t h = 0;
    int64_t dt = INT64_MAX, rdt = INT64_MAX;
    for (int rep = 0; rep < 3; rep++) { /* best of 3: the machine is shared */
        int64_t t0 = td_now_ns();
        for (uint32_t s = 0; s < n_seqs; s++) {
            int64_t id;
            if ((rc = kvc_seq_alloc(p, &spec, &id, &n_cached)) < 0) goto out;
            if ((rc = kvc_seq_free(p, id)) < 0) goto out;
        }
        int64_t d = td_now_ns() - t0;
        if (d < dt) dt = d;
        if (n_cached != n_prompt - 1) {
            rc = TD_EINTERNAL;
            goto out;
        }
        int64_t r0 = td_now_ns();
        for (uint32_t s = 0; s < n_seqs; s++)
            for (uint32_t b = 0; b < n_prompt / BS; b++)
                h += XXH3_64bits_withSeed(prompt + (size_t)b * BS, BS * sizeof(int32_t), h);
        d = td_now_ns() - r0;
        if (d < rdt) rdt = d;
    }
    printf("kvc prefix hit: %u tokens (%u blocks) reused per alloc: %.2f us per alloc+free; "
           "reference XXH3 over the same blocks: %.2f us (checksum %llx)\n",
           n_cached, n_cached / BS, dt / 1e3 / n_seqs, rdt / 1e3 / n_seqs, (unsigned long long)h);
    kvc_seq_free(p, first);
out:
    free(prompt);
    kvc_pool_free(p);
    return rc;
}

/* One run of n_seqs requests to completion; *dt_ns total, *decode_ns the mean
 * time of a step where all n_seqs sequences decode. */
static int sched_run(uint32_t n_seqs, uint32_t n_prompt, uint32_t n_new, int32_t *prompt,
                     sch_result *res, int64_t *dt_ns, double *decode_ns, uint64_t *n_steps,
                     uint64_t *n_tokens)
{
    kvc_config kc = {.num_blocks = n_seqs * ((n_prompt + n_new) / BS + 1),
                     .block_size = BS,
                     .max_seqs = n_seqs,
                     .enable_prefix_cache = true};
    kvc_pool *p = NULL;
    sch *s = NULL;
    int rc = kvc_pool_create(&kc, &p);
    if (rc < 0) return rc;
    sch_config sc = {.max_num_batched_tokens = 8192,
                     .max_num_seqs = n_seqs,
                     .max_seqs = n_seqs,
                     .max_model_len = n_prompt + n_new};
    if ((rc = sch_create(&sc, p, &s)) < 0) goto out;
    for (uint32_t i = 0; i < n_seqs; i++) {
        for (uint32_t t = 0; t < n_prompt; t++)
            prompt[t] = (int32_t)((i * 131 + t * 7) % 32000);
        sch_request r = {
            .req_id = i, .prompt = prompt, .n_prompt = n_prompt, .max_new_tokens = n_new};
        if ((rc = sch_add(s, &r)) < 0) goto out;
    }
    uint64_t steps = 0, decode_steps = 0, tokens = 0;
    int64_t dec = 0, t0 = td_now_ns();
    for (;;) {
        int64_t s0 = td_now_ns();
        sch_step st;
        if ((rc = sch_schedule(s, &st)) < 0) goto out;
        if (st.n_items == 0) break;
        if ((rc = sch_update(s, res, st.n_items, NULL, NULL)) < 0) goto out;
        steps++;
        tokens += st.n_tokens;
        if (st.n_prefill_tokens == 0 && st.n_items == n_seqs) {
            dec += td_now_ns() - s0;
            decode_steps++;
        }
    }
    *dt_ns = td_now_ns() - t0;
    *decode_ns = decode_steps ? (double)dec / decode_steps : 0;
    *n_steps = steps;
    *n_tokens = tokens;
out:
    sch_free(s);
    kvc_pool_free(p);
    return rc;
}

static int bench_sched(uint32_t n_seqs)
{
    const uint32_t n_prompt = 128, n_new = 256;
    int32_t *prompt = malloc(n_prompt * sizeof *prompt);
    sch_result *res = malloc(n_seqs * sizeof *res);
    int rc = TD_ENOMEM;
    if (!prompt || !res) goto out;
    for (uint32_t i = 0; i < n_seqs; i++)
        res[i] = (sch_result){.token = 5, .stop = false};
    int64_t dt = INT64_MAX;
    double dec = 1e300;
    uint64_t steps = 0, tokens = 0;
    for (int rep = 0; rep < 3; rep++) { /* best of 3: the machine is shared */
        int64_t d;
        double e;
        if ((rc = sched_run(n_seqs, n_prompt, n_new, prompt, res, &d, &e, &steps, &tokens)) < 0)
            goto out;
        if (d < dt) dt = d;
        if (e < dec) dec = e;
    }
    double us = dec / 1e3;
    printf("sch: %u seqs x (%u prompt + %u new), best of 3: %llu steps in %.1f ms, %.0f steps/s, "
           "%.1f M tokens scheduled/s; full decode step (schedule+update of %u seqs): %.1f us "
           "= %.2f%% of a 10 ms forward pass (reference)\n",
           n_seqs, n_prompt, n_new, (unsigned long long)steps, dt / 1e6, steps / (dt / 1e9),
           tokens / (dt / 1e3), n_seqs, us, us / 10000.0 * 100);
out:
    free(prompt);
    free(res);
    return rc;
}

struct bench_opts {
    int64_t n_seqs;
};

static const struct cfg_option bench_table[] = {
    {"n-seqs", CFG_INT64, "256", "1", "65536", NULL,
     "Sequences per round (also accepted as the one positional argument)",
     offsetof(struct bench_opts, n_seqs), 0},
};

int main(int argc, char **argv)
{
    struct bench_opts o;
    cfg *c = NULL;
    if (cfg_create(&c, "tandem-kvc-bench [N_SEQS]", bench_table,
                   sizeof(bench_table) / sizeof(bench_table[0]), &o) != 0)
        return 1;
    int prc = cfg_parse(c, argc, argv);
    int npos = 0;
    char *const *pos = cfg_positional(c, &npos);
    if (prc == 0 && npos == 1) prc = cfg_set(c, "n-seqs", pos[0], "argument N_SEQS");
    if (prc == CFG_HELP) {
        fputs(cfg_help(c), stdout);
        cfg_free(c);
        return 0;
    }
    if (prc == 0 && npos > 1) {
        fprintf(stderr, "tandem-kvc-bench: unexpected argument '%s' (see --help)\n", pos[1]);
        prc = TD_EINVAL;
    } else if (prc != 0) {
        fprintf(stderr, "tandem-kvc-bench: %s\n", cfg_error(c));
    }
    cfg_free(c);
    if (prc != 0) return 2;
    uint32_t n_seqs = (uint32_t)o.n_seqs;
    int rc = bench_grow_free(n_seqs);
    if (rc == 0) rc = bench_prefix_hits(n_seqs);
    if (rc == 0) rc = bench_sched(n_seqs);
    if (rc < 0) {
        fprintf(stderr, "tandem-kvc-bench: %s\n", td_strerror(rc));
        return 1;
    }
    return 0;
}

/* sim_cost: the cost-model file and its defaults. */
#include <stddef.h>
#include <stdio.h>

#include "common/config.h"
#include "common/err.h"
#include "loadtest/sim/sim.h"

/* Defaults: the random 15m model (stories15M shape: dim 288, 6 layers, vocab
 * 32000, f32), one compute thread, on the 2-core development VM under other
 * builds (load average 1.5-2), measured 2026-12-06 with
 * `tandem-generate --bench` and the phase table of bench/workers_bench.py
 * (docs/workers.md):
 *   prefill of 128 tokens: 3,026 tok/s            -> 330 us per prompt token;
 *   workers_bench prefill queue + compute of a 64-token prompt: 0.7 + 17 ms,
 *   so about 1 ms a step does not scale with tokens -> prefill_us_fixed 1000;
 *   batched decode, median step: batch 1 455 tok/s (2.2 ms), batch 32
 *   1,670 tok/s (19.2 ms)                          -> 2,000 us fixed and
 *   (19.2 - 2.2) / 31 = 550 us per extra sequence (the weights are read once
 *   per step; each sequence adds its own matmul rows);
 *   attention over the context is a small share at these lengths
 *   (dim 288 x 6 layers x 2 (K, V) floats per token) -> 0.5 us per context
 *   token of a decode sequence;
 *   workers_bench KV transfer + hand-off of 4 blocks over tcp: 710 us, most
 *   of it fixed                                    -> 50 us per block.
 * Measure your own cluster and pass --cost FILE for other hardware. */
void sim_cost_defaults(adm_cost *c)
{
    c->prefill_us_fixed = 1000;
    c->prefill_us_per_token = 330;
    c->decode_step_us_fixed = 2000;
    c->decode_step_us_per_seq = 550;
    c->decode_step_us_per_ctx_token = 0.5;
    c->transfer_us_per_block = 50;
}

#define SIM__COST(name)                                                                            \
    {                                                                                              \
#name, CFG_DOUBLE, NULL, "0", NULL, NULL, "us", offsetof(adm_cost, name), 0                \
    }

int sim_cost_load(const char *path, adm_cost *c, char *err, size_t errlen)
{
    static const struct cfg_option opts[] = {
        SIM__COST(prefill_us_fixed),
        SIM__COST(prefill_us_per_token),
        SIM__COST(decode_step_us_fixed),
        SIM__COST(decode_step_us_per_seq),
        SIM__COST(decode_step_us_per_ctx_token),
        SIM__COST(transfer_us_per_block),
    };
    adm_cost tmp = *c;
    cfg *cf = NULL;
    int rc = cfg_create(&cf, "cost", opts, sizeof(opts) / sizeof(opts[0]), &tmp);
    if (rc) {
        if (err) snprintf(err, errlen, "cost table: %s", td_strerror(rc));
        return rc;
    }
    tmp = *c; /* cfg_create wrote the (zero) defaults: keys left out keep c's */
    rc = cfg_load_file(cf, path);
    if (rc) {
        if (err) snprintf(err, errlen, "%s", cfg_error(cf));
    } else {
        *c = tmp;
    }
    cfg_free(cf);
    return rc;
}

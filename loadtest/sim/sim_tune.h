/* sim_tune: searches admission parameters with the simulator.
 *
 * The trace is split in time order: its first train_fraction of requests are
 * tuned on, the rest (re-based to t = 0) is held out and gives the reported
 * numbers. The capacity is found by a sweep with admission "none" on the
 * training part: the highest mean rate at which at least 90% of requests meet
 * both SLOs. Every load is a multiple of it (arrivals rescaled, burst shape
 * kept). Each policy's parameter grid is searched on the training part for
 * the value with the highest goodput summed over the loads; that one config
 * is evaluated on the held-out part at every load and written as a router
 * config file (out/admission-<policy>.conf). With a held-out trace of its own
 * (opts.holdout) the whole trace is tuned on and the other one reported.
 *
 * A knob searched in multiples of the capacity (the token bucket's rate) is a
 * rate the cluster sustains, so it is written as the same multiple of the
 * capacity of the cluster it is for: opts.target_capacity, the capacity
 * measured there on the traffic it will serve, when the simulated one differs
 * (a stale profile, a training trace less bursty than the served traffic).
 */
#ifndef TANDEM_LOADTEST_SIM_SIM_TUNE_H
#define TANDEM_LOADTEST_SIM_SIM_TUNE_H

#include <stdio.h>

#include "loadtest/lt_report.h"
#include "loadtest/lt_trace.h"
#include "loadtest/sim/sim.h"

typedef struct sim_tune_opts {
    const char *loads;       /* "0.5,1,1.5,2" */
    const char *policies;    /* "a,b,c"; policies this build lacks are reported and skipped */
    double train_fraction;   /* (0, 1) */
    lt_slo slo;              /* both bounds > 0 */
    const char *out;         /* directory for the chosen configs */
    const lt_trace *holdout; /* when set: tune on the whole trace, report on this one
                                (another synthetic seed, other windows); borrowed */
    double target_capacity;  /* req/s the configs are written for; 0: the simulated capacity */
} sim_tune_opts;

/* Runs the search and prints the table to fp. base: cluster, cost (its
 * admission fields are replaced). 0 or a TD_E* code with err set. */
int sim_tune(const sim_config *base, const lt_trace *tr, const sim_tune_opts *o, FILE *fp,
             char *err, size_t errlen);

#endif

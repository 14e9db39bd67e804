/* gen_bench: tandem-generate --bench. Decode speed of the CPU backend on a
 * model (or a random model shaped like llama2.c's stories15M), next to the
 * plain memory-read bandwidth measured in the same run. */
#ifndef TANDEM_ENGINE_CLI_GEN_BENCH_H
#define TANDEM_ENGINE_CLI_GEN_BENCH_H

#include "engine/model.h"

/* m: the model to measure, or NULL for a random 15M-shaped one. Prints a
 * report on stdout. Returns 0 or a TD_E* code. */
int gen_bench_run(const mdl_model *m);

#endif

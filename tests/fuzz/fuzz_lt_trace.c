/* fuzz_lt_trace: the load tester's trace readers on arbitrary bytes. Built
 * once per format (FUZZ_TRACE_FMT). Each input is read three times: with the
 * defaults, with skip_bad + keep_failed + a time window, and with filters and
 * a first-N cap; a trace that loads is scaled and written back as JSONL. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/err.h"
#include "loadtest/lt_trace.h"
#include "tests/fuzz/fuzz_util.h"

#ifndef FUZZ_TRACE_FMT
#define FUZZ_TRACE_FMT LT_FMT_BURSTGPT
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    lt_read_opts opts[3] = {{0}};
    opts[1].skip_bad = 1;
    opts[1].keep_failed = 1;
    opts[1].start_s = 1.0;
    opts[1].end_s = 100.0;
    opts[2].model = "ChatGPT";
    opts[2].log_type = "API log";
    opts[2].max_requests = 2;
    opts[2].skip_bad = 1;
    for (int i = 0; i < 3; i++) {
        /* fmemopen of a zero-length buffer fails on some libcs: give it one byte */
        FILE *fp = size ? fmemopen((void *)data, size, "r") : fmemopen((void *)"\n", 1, "r");
        if (!fp) return 0;
        lt_trace tr;
        lt_trace_init(&tr);
        char err[256];
        int rc = lt_trace_read_stream(fp, FUZZ_TRACE_FMT, &opts[i], &tr, err, sizeof(err));
        fclose(fp);
        if (getenv("FUZZ_VERBOSE")) fprintf(stderr, "lt_trace_read: %d %s\n", rc, rc ? err : "");
        if (rc == 0) {
            for (size_t k = 1; k < tr.n; k++)
                if (tr.reqs[k].t_ns < tr.reqs[k - 1].t_ns) abort(); /* sorted, as promised */
            (void)lt_trace_mean_rate(&tr);
            (void)lt_trace_scale_to_rate(&tr, 3.5);
            (void)lt_trace_speedup(&tr, 2.0);
            char *buf = NULL;
            size_t len = 0;
            FILE *out = open_memstream(&buf, &len);
            if (out) {
                (void)lt_trace_write_jsonl(&tr, out);
                fclose(out);
                free(buf);
            }
        } else if (tr.n != 0 || tr.reqs != NULL) {
            abort(); /* "On error tr is left empty" */
        }
        lt_trace_free(&tr);
    }
    return 0;
}

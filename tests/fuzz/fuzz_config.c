/* fuzz_config: common/config's file parser and flag parser.
 * Input: config file text [SEP flags, one per line] (fuzz_util.h). The option
 * table has one option of every type, with bounds and choices. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/config.h"
#include "common/log.h"
#include "tests/fuzz/fuzz_util.h"

struct opts {
    const char *name, *backend;
    int64_t port;
    double ratio;
    bool enabled;
    int64_t window_ns;
    uint64_t pool_bytes, max_body;
    struct cfg_list stop;
};

static const struct cfg_option table[] = {
    {"log_level", CFG_STRING, "info", NULL, NULL, "debug|info|warn|error", "level",
     offsetof(struct opts, name), 0},
    {"name", CFG_STRING, "tandem", NULL, NULL, NULL, "name", offsetof(struct opts, backend), 0},
    {"router.port", CFG_INT64, "8000", "1", "65535", NULL, "port", offsetof(struct opts, port), 0},
    {"router.ratio", CFG_DOUBLE, "0.5", "-1e300", "1e300", NULL, "ratio",
     offsetof(struct opts, ratio), 0},
    {"router.enabled", CFG_BOOL, "false", NULL, NULL, NULL, "on", offsetof(struct opts, enabled),
     0},
    {"router.admit_window", CFG_DURATION, "250ms", "0", "1h", NULL, "window",
     offsetof(struct opts, window_ns), 0},
    {"router.kv_pool", CFG_SIZE, "64MiB", "0", "1TiB", NULL, "pool",
     offsetof(struct opts, pool_bytes), 0},
    {"router.http.max_body", CFG_SIZE, NULL, NULL, NULL, NULL, "body",
     offsetof(struct opts, max_body), 0},
    {"stop", CFG_LIST, "</s>", NULL, NULL, NULL, "stop strings", offsetof(struct opts, stop), 0},
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    fuzz_part parts[2];
    int n = fuzz_split(data, size, parts, 2);
    char *text = malloc(parts[0].len + 1);
    char *flags = malloc(n > 1 ? parts[1].len + 1 : 1);
    if (!text || !flags) abort();
    memcpy(text, parts[0].data, parts[0].len);
    text[parts[0].len] = 0;
    flags[0] = 0;
    if (n > 1) {
        memcpy(flags, parts[1].data, parts[1].len);
        flags[parts[1].len] = 0;
    }
    struct opts o;
    memset(&o, 0, sizeof(o));
    cfg *c = NULL;
    if (cfg_create(&c, "fuzz", table, sizeof(table) / sizeof(table[0]), &o) != 0) abort();
    (void)cfg_load_string(c, text, "fuzz.conf");
    (void)cfg_error(c);
    cfg_free(c);

    /* flags: argv from the lines of part 1 */
    char *argv[34];
    int argc = 0;
    argv[argc++] = "fuzz";
    for (char *s = flags; *s && argc < 33;) {
        argv[argc++] = s;
        char *nl = strchr(s, '\n');
        if (!nl) break;
        *nl = 0;
        s = nl + 1;
    }
    argv[argc] = NULL;
    memset(&o, 0, sizeof(o));
    if (cfg_create(&c, "fuzz", table, sizeof(table) / sizeof(table[0]), &o) != 0) abort();
    (void)cfg_load_string(c, text, "fuzz.conf");
    int rc = cfg_parse(c, argc, argv);
    if (rc == 0) {
        (void)cfg_source(c, "router.port");
        for (size_t i = 0; i < o.stop.n; i++)
            (void)strlen(o.stop.v[i]);
        int np;
        (void)cfg_positional(c, &np);
    }
    (void)cfg_help(c);
    cfg_free(c);
    free(text);
    free(flags);
    return 0;
}

/* config: one option table per binary, filled from a config file and flags.
 *
 * A binary declares its options once, as a table of struct cfg_option, each
 * naming the field of the binary's own config struct that receives the value
 * (offsetof). cfg_parse then applies, in order of increasing precedence:
 *   1. the defaults from the table,
 *   2. the file named by --config FILE (or --config=FILE),
 *   3. every other flag: --section.key=value or --section.key value
 *      (a bool flag alone, --section.key, means true).
 * `--help` (or -h) makes cfg_parse return CFG_HELP; cfg_help() gives the text.
 *
 * File format (the same for every binary):
 *     # comment
 *     log_level = info            # trailing comment
 *     [router]                    # following keys are router.<key>
 *     port = 8000
 *     name = "a \"quoted\" value" # escapes: \\ \" \n \t \r \#
 *     admit_window = 250ms
 *     kv_pool = 64MiB
 * Keys and section names use [A-Za-z0-9_-] and dots. A key set twice in one
 * file is an error (except a CFG_LIST key, which appends). Unknown keys are
 * errors, with a suggestion when a known key is close. Errors stop parsing at
 * the first one and name the key, the file and line (or the flag as typed),
 * the bad value and what is allowed, e.g.
 *     router.conf:12: router.port = "70000": out of range [1, 65535]
 *     command line: --router.port = "0": out of range [1, 65535]
 *
 * Value syntax by type:
 *   CFG_STRING    any text; quote it to keep leading/trailing blanks or '#'
 *   CFG_INT64     decimal integer, optional sign
 *   CFG_DOUBLE    decimal or exponent notation, finite
 *   CFG_BOOL      true/false, yes/no, on/off, 1/0 (any case)
 *   CFG_DURATION  number+unit, units ns us ms s m h, may repeat ("1m30s",
 *                 "1.5s", "250ms"); "0" alone is allowed; stored as int64 ns
 *   CFG_SIZE      bytes, or number+unit: B, KiB MiB GiB TiB (powers of 1024),
 *                 KB MB GB TB (powers of 1000); "1.5GiB" if a whole number of
 *                 bytes; stored as uint64 bytes
 *   CFG_LIST      one string per occurrence (flag repeated, or key repeated
 *                 in one file)
 * Fractions are computed exactly (no floating point) for durations and sizes.
 *
 * Not thread-safe: parse at start-up, then read the struct.
 */
#ifndef TANDEM_COMMON_CONFIG_H
#define TANDEM_COMMON_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum cfg_type {
    CFG_STRING,   /* field: const char * (owned by the cfg; NULL when unset) */
    CFG_INT64,    /* field: int64_t */
    CFG_DOUBLE,   /* field: double */
    CFG_BOOL,     /* field: bool */
    CFG_DURATION, /* field: int64_t nanoseconds */
    CFG_SIZE,     /* field: uint64_t bytes */
    CFG_LIST,     /* field: struct cfg_list (strings; a flag may repeat) */
};

/* The field of a CFG_LIST option: every value given, in order. A repeated
 * flag (--stop a --stop b) or a key repeated within one config file appends;
 * the values of one source (one file, or the flags of one cfg_parse) replace
 * those of an earlier source, as for any option. A default, if any, is one
 * item. */
struct cfg_list {
    char *const *v; /* n strings, owned by the cfg */
    size_t n;
};

/* Option flags. */
#define CFG_REQUIRED 1u /* cfg_parse fails unless the file or a flag sets it */

/* Returned by cfg_parse when --help was given (a positive value). */
#define CFG_HELP 1

struct cfg_option {
    const char *name;    /* "section.key" or "key"; [A-Za-z0-9_-] segments */
    enum cfg_type type;  /* also fixes the type of the target field */
    const char *def;     /* default, written as in the file; NULL: zero/NULL */
    const char *min;     /* inclusive bounds, written as values; NULL: none */
    const char *max;     /* (not for strings, bools or lists) */
    const char *choices; /* strings and lists only: allowed values, '|'-separated */
    const char *help;    /* one line for --help */
    size_t offset;       /* offsetof(your struct, field) */
    unsigned flags;      /* CFG_REQUIRED */
};

typedef struct cfg cfg;

/* Checks the table (names well formed and unique, defaults valid and in
 * range, bounds ordered), then writes every default into target.
 * prog: program name for --help (copied). opts and target are not owned:
 * both must outlive the cfg. On error *out is NULL and a message is logged.
 * Returns 0, TD_EINVAL (bad table) or TD_ENOMEM. */
int cfg_create(cfg **out, const char *prog, const struct cfg_option *opts, size_t nopts,
               void *target);

/* Frees the cfg and every string it set in target (those fields become
 * dangling: free the cfg after the last use of the struct). NULL is fine. */
void cfg_free(cfg *c);

/* Applies defaults, --config FILE, then flags, as described above. argv[0]
 * is skipped; arguments not starting with "--" (and all after a bare "--")
 * are positional and kept for cfg_positional. argv is not modified and
 * strings are copied. Returns 0, CFG_HELP, or a negative TD_E* code with the
 * message in cfg_error(c): TD_EINVAL (bad flag, key or value), TD_ERANGE
 * (out of range), TD_ENOENT / TD_EIO (config file unreadable), TD_EFORMAT
 * (malformed file line). Call it once per cfg. */
int cfg_parse(cfg *c, int argc, char *const *argv);

/* Parses config text as if read from a file named origin (for tests, or for
 * configs embedded elsewhere). Same errors as a file. May be called after
 * cfg_create and before/instead of cfg_parse; later values win. */
int cfg_load_string(cfg *c, const char *text, const char *origin);

/* Loads one config file (what --config does). */
int cfg_load_file(cfg *c, const char *path);

/* Sets one option from text, as a flag would (origin names it in errors).
 * For a CFG_LIST: appends when the list was last set by cfg_set or by the
 * latest file, else starts it afresh. */
int cfg_set(cfg *c, const char *name, const char *value, const char *origin);

/* Checks that every CFG_REQUIRED option was set. cfg_parse calls it. */
int cfg_check_required(cfg *c);

/* The message of the last error ("" if none). Owned by c, valid until the
 * next call on c. */
const char *cfg_error(const cfg *c);

/* --help text generated from the table. Owned by c, valid until cfg_free. */
const char *cfg_help(cfg *c);

/* Where the current value of name came from: "default", "FILE:LINE", or
 * "--flag" / the origin given to cfg_set; NULL for an unknown name. Owned by c. */
const char *cfg_source(const cfg *c, const char *name);

/* Positional arguments left by cfg_parse (owned by c). */
char *const *cfg_positional(const cfg *c, int *count);

/* Logs every option as one logfmt line each (name, value, source) at info
 * level, for start-up banners. */
void cfg_log(const cfg *c, const char *mod);

#endif

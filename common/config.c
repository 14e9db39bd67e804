#include "config.h"

#include "err.h"
#include "log.h"
#include "sbuf.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CFG_MAX_FILE_BYTES (1u << 20) /* a config file is small; refuse anything else */
#define CFG_MAX_NAME       128
#define CFG_ERR_BYTES      1024

union cfg_val {
    const char *s;
    int64_t i;  /* CFG_INT64, CFG_DURATION (ns) */
    uint64_t u; /* CFG_SIZE (bytes) */
    double d;
    bool b;
};

struct cfg_slot {
    const struct cfg_option *opt;
    char *str;    /* owned value of a CFG_STRING option */
    char **items; /* owned values of a CFG_LIST option */
    size_t nitems;
    unsigned list_id; /* the load_id whose values the list holds */
    char *source;     /* owned: "default", "FILE:LINE", "command line", ... */
    bool set;         /* set by a file, a flag or cfg_set */
    unsigned load_id; /* which cfg_load_string call set it last (duplicate check) */
    int line;         /* and on which line */
    bool has_min, has_max;
    union cfg_val min, max;
};

struct cfg {
    char *prog;
    const struct cfg_option *opts;
    size_t nopts;
    struct cfg_slot *slots;
    void *target;
    char err[CFG_ERR_BYTES];
    char *help;
    char **pos; /* positional arguments, owned */
    int npos;
    unsigned load_id;
};

static void set_err(cfg *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(cfg *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
}

const char *cfg_error(const cfg *c)
{
    return c ? c->err : "";
}

/* ---- value parsing ------------------------------------------------------ */

static const char *type_name(enum cfg_type t)
{
    switch (t) {
    case CFG_STRING:
        return "STRING";
    case CFG_INT64:
        return "INT";
    case CFG_DOUBLE:
        return "FLOAT";
    case CFG_BOOL:
        return "BOOL";
    case CFG_DURATION:
        return "DURATION";
    case CFG_SIZE:
        return "SIZE";
    case CFG_LIST:
        return "STRING";
    }
    return "?";
}

/* Parses "digits[.digits]" at *p and returns value * scale exactly in *out.
 * Returns 0, TD_EINVAL (no digits, or a fraction finer than 1/scale: *why
 * says so) or TD_ERANGE. Advances *p past the number. */
static int parse_scaled(const char **p, uint64_t scale, uint64_t *out, const char **why)
{
    const char *s = *p;
    unsigned __int128 whole = 0, frac = 0, den = 1;
    int ndigits = 0;
    while (isdigit((unsigned char)*s)) {
        whole = whole * 10 + (unsigned)(*s - '0');
        if (whole > UINT64_MAX) {
            *why = "too large";
            return TD_ERANGE;
        }
        s++;
        ndigits++;
    }
    if (*s == '.') {
        s++;
        while (isdigit((unsigned char)*s)) {
            if (den >= (unsigned __int128)1000000000000000000ull) {
                *why = "too many decimal digits";
                return TD_EINVAL;
            }
            frac = frac * 10 + (unsigned)(*s - '0');
            den *= 10;
            s++;
            ndigits++;
        }
    }
    if (*s == '.') {
        *why = "malformed number";
        return TD_EINVAL;
    }
    if (ndigits == 0) {
        *why = "expected a number";
        return TD_EINVAL;
    }
    unsigned __int128 v = whole * scale;
    unsigned __int128 f = frac * scale;
    if (f % den != 0) {
        *why = "fraction finer than the smallest unit";
        return TD_EINVAL;
    }
    v += f / den;
    if (v > UINT64_MAX) {
        *why = "too large";
        return TD_ERANGE;
    }
    *out = (uint64_t)v;
    *p = s;
    return 0;
}

struct unit {
    const char *name;
    uint64_t scale;
};

static const struct unit duration_units[] = {
    {"ns", 1ull},
    {"us", 1000ull},
    {"ms", 1000000ull},
    {"s", 1000000000ull},
    {"m", 60ull * 1000000000ull},
    {"h", 3600ull * 1000000000ull},
};

static const struct unit size_units[] = {
    {"B", 1ull},         {"KiB", 1ull << 10},   {"MiB", 1ull << 20},
    {"GiB", 1ull << 30}, {"TiB", 1ull << 40},   {"KB", 1000ull},
    {"MB", 1000000ull},  {"GB", 1000000000ull}, {"TB", 1000000000000ull},
};

static const struct unit *find_unit(const struct unit *units, size_t n, const char *s, size_t len)
{
    for (size_t i = 0; i < n; i++)
        if (strlen(units[i].name) == len && memcmp(units[i].name, s, len) == 0) return &units[i];
    return NULL;
}

static int parse_duration(const char *s, int64_t *out, const char **why)
{
    if (strcmp(s, "0") == 0) {
        *out = 0;
        return 0;
    }
    uint64_t total = 0;
    const char *p = s;
    if (*p == '\0') {
        *why = "empty value";
        return TD_EINVAL;
    }
    while (*p) {
        const char *num = p;
        while (isdigit((unsigned char)*p) || *p == '.')
            p++;
        const char *numend = p;
        if (p == num) {
            *why = "expected a number followed by a unit (ns, us, ms, s, m, h)";
            return TD_EINVAL;
        }
        const char *u = p;
        while (isalpha((unsigned char)*p))
            p++;
        if (p == u) {
            *why = "missing unit (ns, us, ms, s, m, h)";
            return TD_EINVAL;
        }
        const struct unit *unit = find_unit(
            duration_units, sizeof(duration_units) / sizeof(duration_units[0]), u, (size_t)(p - u));
        if (!unit) {
            *why = "unknown unit (use ns, us, ms, s, m, h)";
            return TD_EINVAL;
        }
        const char *q = num;
        uint64_t part;
        int rc = parse_scaled(&q, unit->scale, &part, why);
        if (rc == 0 && q != numend) {
            *why = "malformed number";
            rc = TD_EINVAL;
        }
        if (rc != 0) {
            if (rc == TD_EINVAL && strcmp(*why, "fraction finer than the smallest unit") == 0)
                *why = "finer than 1ns";
            return rc;
        }
        if (part > (uint64_t)INT64_MAX - total) {
            *why = "too large (max about 292 years)";
            return TD_ERANGE;
        }
        total += part;
    }
    *out = (int64_t)total;
    return 0;
}

static int parse_size(const char *s, uint64_t *out, const char **why)
{
    const char *p = s;
    const char *num = p;
    while (isdigit((unsigned char)*p) || *p == '.')
        p++;
    const char *numend = p;
    if (numend == num) {
        *why = "expected a number of bytes, optionally with a unit";
        return TD_EINVAL;
    }
    while (*p == ' ')
        p++;
    const struct unit *unit = &size_units[0];
    if (*p) {
        unit = find_unit(size_units, sizeof(size_units) / sizeof(size_units[0]), p, strlen(p));
        if (!unit) {
            *why = "unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)";
            return TD_EINVAL;
        }
    }
    const char *q = num;
    int rc = parse_scaled(&q, unit->scale, out, why);
    if (rc != 0) {
        if (rc == TD_EINVAL && strcmp(*why, "fraction finer than the smallest unit") == 0)
            *why = "not a whole number of bytes";
        return rc;
    }
    if (q != numend) {
        *why = "expected a number of bytes, optionally with a unit";
        return TD_EINVAL;
    }
    return 0;
}

static int parse_int64(const char *s, int64_t *out, const char **why)
{
    const char *p = s;
    if (*p == '+' || *p == '-') p++;
    if (!isdigit((unsigned char)*p)) {
        *why = "expected an integer";
        return TD_EINVAL;
    }
    for (const char *q = p; *q; q++) {
        if (!isdigit((unsigned char)*q)) {
            *why = "expected an integer";
            return TD_EINVAL;
        }
    }
    errno = 0;
    long long v = strtoll(s, NULL, 10);
    if (errno == ERANGE) {
        *why = "outside the 64-bit integer range";
        return TD_ERANGE;
    }
    *out = (int64_t)v;
    return 0;
}

static int parse_double(const char *s, double *out, const char **why)
{
    /* strtod also takes hex floats, "inf" and "nan": a config wants none. */
    for (const char *q = s; *q; q++) {
        if (!isdigit((unsigned char)*q) && !strchr("+-.eE", *q)) {
            *why = "expected a decimal number";
            return TD_EINVAL;
        }
    }
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0') {
        *why = "expected a decimal number";
        return TD_EINVAL;
    }
    if (errno == ERANGE && isinf(v)) {
        *why = "too large for a double";
        return TD_ERANGE;
    }
    *out = v;
    return 0;
}

static int parse_bool(const char *s, bool *out, const char **why)
{
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    *why = "expected true/false, yes/no, on/off or 1/0";
    return TD_EINVAL;
}

static int parse_value(enum cfg_type t, const char *s, union cfg_val *v, const char **why)
{
    *why = "";
    if (t != CFG_STRING && t != CFG_LIST && *s == '\0') {
        *why = "empty value";
        return TD_EINVAL;
    }
    switch (t) {
    case CFG_STRING:
    case CFG_LIST:
        v->s = s;
        return 0;
    case CFG_INT64:
        return parse_int64(s, &v->i, why);
    case CFG_DOUBLE:
        return parse_double(s, &v->d, why);
    case CFG_BOOL:
        return parse_bool(s, &v->b, why);
    case CFG_DURATION:
        return parse_duration(s, &v->i, why);
    case CFG_SIZE:
        return parse_size(s, &v->u, why);
    }
    *why = "unknown option type";
    return TD_EINVAL;
}

/* <0, 0, >0 like strcmp, for two values of numeric type t. */
static int compare(enum cfg_type t, union cfg_val a, union cfg_val b)
{
    switch (t) {
    case CFG_INT64:
    case CFG_DURATION:
        return a.i < b.i ? -1 : a.i > b.i;
    case CFG_SIZE:
        return a.u < b.u ? -1 : a.u > b.u;
    case CFG_DOUBLE:
        return a.d < b.d ? -1 : a.d > b.d;
    default:
        return 0;
    }
}

static bool in_choices(const char *choices, const char *s)
{
    size_t len = strlen(s);
    const char *p = choices;
    for (;;) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == len && memcmp(p, s, n) == 0) return true;
        if (!bar) return false;
        p = bar + 1;
    }
}

/* ---- names and lookup --------------------------------------------------- */

static bool name_char(char ch)
{
    return isalnum((unsigned char)ch) || ch == '_' || ch == '-';
}

/* [A-Za-z0-9_-]+ segments separated by single dots. */
static bool valid_name(const char *s, size_t len)
{
    if (len == 0 || len > CFG_MAX_NAME) return false;
    bool seg_start = true;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '.') {
            if (seg_start) return false;
            seg_start = true;
        } else if (name_char(s[i])) {
            seg_start = false;
        } else {
            return false;
        }
    }
    return !seg_start;
}

static struct cfg_slot *find_slot(const cfg *c, const char *name)
{
    for (size_t i = 0; i < c->nopts; i++)
        if (strcmp(c->opts[i].name, name) == 0) return &c->slots[i];
    return NULL;
}

static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > CFG_MAX_NAME || lb > CFG_MAX_NAME) return SIZE_MAX;
    size_t row[CFG_MAX_NAME + 1];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static const char *last_segment(const char *name)
{
    const char *dot = strrchr(name, '.');
    return dot ? dot + 1 : name;
}

/* The known name closest to an unknown one, or NULL when none is close:
 * a small edit distance, or the same last segment in another section. */
static const char *suggest(const cfg *c, const char *name)
{
    const char *best = NULL;
    size_t best_d = SIZE_MAX;
    size_t limit = strlen(name) / 3;
    if (limit < 2) limit = 2;
    for (size_t i = 0; i < c->nopts; i++) {
        size_t d = edit_distance(name, c->opts[i].name);
        if (d < best_d) {
            best_d = d;
            best = c->opts[i].name;
        }
    }
    if (best && best_d <= limit) return best;
    for (size_t i = 0; i < c->nopts; i++)
        if (strcmp(last_segment(c->opts[i].name), last_segment(name)) == 0) return c->opts[i].name;
    return NULL;
}

static void set_unknown_err(cfg *c, const char *where, const char *name)
{
    const char *hint = suggest(c, name);
    if (hint)
        set_err(c, "%s: unknown key '%s' (did you mean '%s'?)", where, name, hint);
    else
        set_err(c, "%s: unknown key '%s' (see --help)", where, name);
}

/* The same for a command-line flag, spelled as the user typed it. */
static void set_unknown_flag_err(cfg *c, const char *name)
{
    const char *hint = suggest(c, name);
    if (hint)
        set_err(c, "command line: unknown flag '--%s' (did you mean '--%s'?)", name, hint);
    else
        set_err(c, "command line: unknown flag '--%s' (see --help)", name);
}

/* Copy of s safe to quote in a one-line message: control characters become
 * '?', long values are cut. */
static void printable(char *dst, size_t cap, const char *s)
{
    size_t i = 0;
    for (; s[i] && i + 1 < cap; i++)
        dst[i] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
    dst[i] = '\0';
    if (s[i] && cap > 4) memcpy(dst + cap - 4, "...", 4);
}

/* ---- applying values ---------------------------------------------------- */

static void *field(const cfg *c, const struct cfg_slot *slot)
{
    return (char *)c->target + slot->opt->offset;
}

static int set_source(struct cfg_slot *slot, const char *source)
{
    char *copy = strdup(source);
    if (!copy) return TD_ENOMEM;
    free(slot->source);
    slot->source = copy;
    return 0;
}

static void range_text(const struct cfg_option *o, char *buf, size_t cap)
{
    if (o->min && o->max)
        snprintf(buf, cap, "out of range [%s, %s]", o->min, o->max);
    else if (o->min)
        snprintf(buf, cap, "must be >= %s", o->min);
    else
        snprintf(buf, cap, "must be <= %s", o->max);
}

/* Parses text for slot, checks it, stores it in the target. where: the
 * location for messages ("file:line" or "command line"); source: what
 * cfg_source reports afterwards; dash: "--" to name the option as a flag in
 * messages, "" as a key. */
static int apply_as(cfg *c, struct cfg_slot *slot, const char *text, const char *where,
                    const char *source, const char *dash)
{
    const struct cfg_option *o = slot->opt;
    union cfg_val v;
    const char *why;
    char shown[80];
    printable(shown, sizeof(shown), text);
    int rc = parse_value(o->type, text, &v, &why);
    if (rc != 0) {
        set_err(c, "%s: %s%s = \"%s\": %s (type %s)", where, dash, o->name, shown, why,
                type_name(o->type));
        return rc;
    }
    if ((slot->has_min && compare(o->type, v, slot->min) < 0) ||
        (slot->has_max && compare(o->type, v, slot->max) > 0)) {
        char range[160];
        range_text(o, range, sizeof(range));
        set_err(c, "%s: %s%s = \"%s\": %s", where, dash, o->name, shown, range);
        return TD_ERANGE;
    }
    if ((o->type == CFG_STRING || o->type == CFG_LIST) && o->choices &&
        !in_choices(o->choices, text)) {
        set_err(c, "%s: %s%s = \"%s\": must be one of %s", where, dash, o->name, shown, o->choices);
        return TD_EINVAL;
    }
    if (set_source(slot, source) != 0) {
        set_err(c, "out of memory");
        return TD_ENOMEM;
    }
    void *f = field(c, slot);
    switch (o->type) {
    case CFG_STRING: {
        char *copy = strdup(text);
        if (!copy) {
            set_err(c, "out of memory");
            return TD_ENOMEM;
        }
        free(slot->str);
        slot->str = copy;
        *(const char **)f = copy;
        break;
    }
    case CFG_INT64:
    case CFG_DURATION:
        *(int64_t *)f = v.i;
        break;
    case CFG_SIZE:
        *(uint64_t *)f = v.u;
        break;
    case CFG_DOUBLE:
        *(double *)f = v.d;
        break;
    case CFG_BOOL:
        *(bool *)f = v.b;
        break;
    case CFG_LIST: {
        /* A new source (a later file, the flags, or the first value after the
         * default) starts the list afresh; within one source values append. */
        if (!slot->set || slot->list_id != c->load_id) {
            for (size_t i = 0; i < slot->nitems; i++)
                free(slot->items[i]);
            slot->nitems = 0;
            *(struct cfg_list *)f = (struct cfg_list){.v = slot->items, .n = 0};
        }
        slot->list_id = c->load_id;
        char *copy = strdup(text);
        char **grown = copy ? realloc(slot->items, sizeof(*grown) * (slot->nitems + 1)) : NULL;
        if (!grown) {
            free(copy);
            set_err(c, "out of memory");
            return TD_ENOMEM;
        }
        slot->items = grown;
        grown[slot->nitems++] = copy;
        *(struct cfg_list *)f = (struct cfg_list){.v = grown, .n = slot->nitems};
        break;
    }
    }
    return 0;
}

static int apply(cfg *c, struct cfg_slot *slot, const char *text, const char *where,
                 const char *source)
{
    return apply_as(c, slot, text, where, source, "");
}

/* ---- create / free ------------------------------------------------------ */

void cfg_free(cfg *c)
{
    if (!c) return;
    for (size_t i = 0; c->slots && i < c->nopts; i++) {
        free(c->slots[i].str);
        for (size_t j = 0; j < c->slots[i].nitems; j++)
            free(c->slots[i].items[j]);
        free(c->slots[i].items);
        free(c->slots[i].source);
    }
    for (int i = 0; i < c->npos; i++)
        free(c->pos[i]);
    free(c->pos);
    free(c->slots);
    free(c->help);
    free(c->prog);
    free(c);
}

/* Validates one table entry and parses its bounds. */
static int check_option(cfg *c, struct cfg_slot *slot)
{
    const struct cfg_option *o = slot->opt;
    const char *why;
    if (!o->name || !valid_name(o->name, strlen(o->name))) {
        set_err(c, "option table: bad name '%s'", o->name ? o->name : "(null)");
        return TD_EINVAL;
    }
    if (strcmp(o->name, "config") == 0 || strcmp(o->name, "help") == 0) {
        set_err(c, "option table: '%s' is reserved for the flag of that name", o->name);
        return TD_EINVAL;
    }
    if ((unsigned)o->type > CFG_LIST) {
        set_err(c, "option table: %s: unknown type %d", o->name, (int)o->type);
        return TD_EINVAL;
    }
    if ((o->type == CFG_STRING || o->type == CFG_BOOL || o->type == CFG_LIST) &&
        (o->min || o->max)) {
        set_err(c, "option table: %s: min/max are not allowed for %s", o->name, type_name(o->type));
        return TD_EINVAL;
    }
    if (o->choices && o->type != CFG_STRING && o->type != CFG_LIST) {
        set_err(c, "option table: %s: choices are for strings and lists only", o->name);
        return TD_EINVAL;
    }
    if ((o->flags & CFG_REQUIRED) && o->def) {
        set_err(c, "option table: %s: a required option has no default", o->name);
        return TD_EINVAL;
    }
    if (o->flags & ~CFG_REQUIRED) {
        set_err(c, "option table: %s: unknown flags 0x%x", o->name, o->flags);
        return TD_EINVAL;
    }
    if (o->min) {
        if (parse_value(o->type, o->min, &slot->min, &why) != 0) {
            set_err(c, "option table: %s: bad min \"%s\": %s", o->name, o->min, why);
            return TD_EINVAL;
        }
        slot->has_min = true;
    }
    if (o->max) {
        if (parse_value(o->type, o->max, &slot->max, &why) != 0) {
            set_err(c, "option table: %s: bad max \"%s\": %s", o->name, o->max, why);
            return TD_EINVAL;
        }
        slot->has_max = true;
    }
    if (slot->has_min && slot->has_max && compare(o->type, slot->min, slot->max) > 0) {
        set_err(c, "option table: %s: min %s > max %s", o->name, o->min, o->max);
        return TD_EINVAL;
    }
    return 0;
}

int cfg_create(cfg **out, const char *prog, const struct cfg_option *opts, size_t nopts,
               void *target)
{
    if (!out) return TD_EINVAL;
    *out = NULL;
    if ((!opts && nopts) || !target) {
        td_log_error("config", "bad_table", "reason=\"no options or no target\"");
        return TD_EINVAL;
    }
    cfg *c = calloc(1, sizeof(*c));
    if (!c) return TD_ENOMEM;
    c->opts = opts;
    c->nopts = nopts;
    c->target = target;
    c->prog = strdup(prog ? prog : "tandem");
    c->slots = calloc(nopts ? nopts : 1, sizeof(*c->slots));
    if (!c->prog || !c->slots) {
        cfg_free(c);
        return TD_ENOMEM;
    }
    int rc = 0;
    for (size_t i = 0; i < nopts && rc == 0; i++) {
        c->slots[i].opt = &opts[i];
        rc = check_option(c, &c->slots[i]);
        for (size_t j = 0; j < i && rc == 0; j++) {
            if (strcmp(opts[j].name, opts[i].name) == 0) {
                set_err(c, "option table: '%s' declared twice", opts[i].name);
                rc = TD_EINVAL;
            }
        }
    }
    for (size_t i = 0; i < nopts && rc == 0; i++) {
        struct cfg_slot *slot = &c->slots[i];
        if (opts[i].def) {
            rc = apply(c, slot, opts[i].def, "option table default", "default");
            if (rc != 0 && rc != TD_ENOMEM) rc = TD_EINVAL; /* a bad default is a bad table */
            continue;
        }
        /* No default: zero of the type (NULL for strings). */
        void *f = field(c, slot);
        switch (opts[i].type) {
        case CFG_STRING:
            *(const char **)f = NULL;
            break;
        case CFG_INT64:
        case CFG_DURATION:
            *(int64_t *)f = 0;
            break;
        case CFG_SIZE:
            *(uint64_t *)f = 0;
            break;
        case CFG_DOUBLE:
            *(double *)f = 0.0;
            break;
        case CFG_BOOL:
            *(bool *)f = false;
            break;
        case CFG_LIST:
            *(struct cfg_list *)f = (struct cfg_list){.v = NULL, .n = 0};
            break;
        }
        if (set_source(slot, opts[i].flags & CFG_REQUIRED ? "unset" : "default") != 0)
            rc = TD_ENOMEM;
    }
    if (rc != 0) {
        td_log_error("config", "bad_table", "prog=%s error=\"%s\"", c->prog, c->err);
        cfg_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

/* ---- files -------------------------------------------------------------- */

static bool blank(char ch)
{
    return ch == ' ' || ch == '\t';
}

/* Reads a quoted string starting after the opening quote at *p into dst
 * (capacity cap, at least as long as the rest of the line). Returns 0, or
 * TD_EFORMAT with *why set. Leaves *p after the closing quote. */
static int unquote(const char **p, const char *end, char *dst, const char **why)
{
    const char *s = *p;
    size_t n = 0;
    while (s < end && *s != '"') {
        if (*s == '\\') {
            s++;
            if (s >= end) {
                break;
            }
            switch (*s) {
            case '\\':
            case '"':
            case '#':
                dst[n++] = *s;
                break;
            case 'n':
                dst[n++] = '\n';
                break;
            case 't':
                dst[n++] = '\t';
                break;
            case 'r':
                dst[n++] = '\r';
                break;
            default:
                *why = "unknown escape in quoted string (use \\\\ \\\" \\n \\t \\r \\#)";
                return TD_EFORMAT;
            }
            s++;
            continue;
        }
        dst[n++] = *s++;
    }
    if (s >= end) {
        *why = "unterminated quoted string";
        return TD_EFORMAT;
    }
    dst[n] = '\0';
    *p = s + 1;
    return 0;
}

/* After a value or header only blanks and a comment may follow. */
static bool rest_is_empty(const char *s, const char *end)
{
    while (s < end && blank(*s))
        s++;
    return s == end || *s == '#';
}

int cfg_load_string(cfg *c, const char *text, const char *origin)
{
    if (!c || !text) return TD_EINVAL;
    if (!origin) origin = "(string)";
    c->load_id++;
    size_t total = strlen(text);
    /* Longest value is shorter than the text. */
    char *value = malloc(total + 1);
    if (!value) {
        set_err(c, "out of memory");
        return TD_ENOMEM;
    }
    char section[CFG_MAX_NAME + 1] = "";
    char where[512];
    char key[2 * CFG_MAX_NAME + 2];
    int rc = 0;
    int line = 0;
    const char *p = text;
    while (*p && rc == 0) {
        line++;
        const char *end = strchr(p, '\n');
        if (!end) end = p + strlen(p);
        const char *next = *end ? end + 1 : end;
        if (end > p && end[-1] == '\r') end--;
        snprintf(where, sizeof(where), "%s:%d", origin, line);
        const char *s = p;
        p = next;
        while (s < end && blank(*s))
            s++;
        if (s == end || *s == '#') continue;
        if (*s == '[') {
            const char *close = memchr(s, ']', (size_t)(end - s));
            if (!close) {
                set_err(c, "%s: section header without ']'", where);
                rc = TD_EFORMAT;
                break;
            }
            const char *a = s + 1, *b = close;
            while (a < b && blank(*a))
                a++;
            while (b > a && blank(b[-1]))
                b--;
            if (!valid_name(a, (size_t)(b - a))) {
                set_err(c, "%s: bad section name '%.*s' (use letters, digits, _ - .)", where,
                        (int)(close - s - 1), s + 1);
                rc = TD_EFORMAT;
                break;
            }
            if (!rest_is_empty(close + 1, end)) {
                set_err(c, "%s: unexpected text after section header", where);
                rc = TD_EFORMAT;
                break;
            }
            memcpy(section, a, (size_t)(b - a));
            section[b - a] = '\0';
            continue;
        }
        const char *k = s;
        while (s < end && (name_char(*s) || *s == '.'))
            s++;
        size_t klen = (size_t)(s - k);
        while (s < end && blank(*s))
            s++;
        if (klen == 0 || s == end || *s != '=') {
            set_err(c, "%s: expected 'key = value' or '[section]'", where);
            rc = TD_EFORMAT;
            break;
        }
        if (!valid_name(k, klen)) {
            set_err(c, "%s: bad key '%.*s' (use letters, digits, _ - and dots)", where, (int)klen,
                    k);
            rc = TD_EFORMAT;
            break;
        }
        s++; /* '=' */
        while (s < end && blank(*s))
            s++;
        if (s < end && *s == '"') {
            const char *why = "";
            s++;
            rc = unquote(&s, end, value, &why);
            if (rc == 0 && !rest_is_empty(s, end)) {
                why = "unexpected text after quoted string";
                rc = TD_EFORMAT;
            }
            if (rc != 0) {
                set_err(c, "%s: %s", where, why);
                break;
            }
        } else {
            const char *v = s;
            while (s < end && *s != '#')
                s++;
            while (s > v && blank(s[-1]))
                s--;
            memcpy(value, v, (size_t)(s - v));
            value[s - v] = '\0';
        }
        if (section[0])
            snprintf(key, sizeof(key), "%s.%.*s", section, (int)klen, k);
        else
            snprintf(key, sizeof(key), "%.*s", (int)klen, k);
        struct cfg_slot *slot = find_slot(c, key);
        if (!slot) {
            set_unknown_err(c, where, key);
            rc = TD_EINVAL;
            break;
        }
        if (slot->set && slot->load_id == c->load_id && slot->opt->type != CFG_LIST) {
            set_err(c, "%s: %s set twice (first on line %d)", where, key, slot->line);
            rc = TD_EINVAL;
            break;
        }
        rc = apply(c, slot, value, where, where);
        if (rc == 0) {
            slot->set = true;
            slot->load_id = c->load_id;
            slot->line = line;
        }
    }
    free(value);
    return rc;
}

int cfg_load_file(cfg *c, const char *path)
{
    if (!c || !path) return TD_EINVAL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        set_err(c, "cannot open config file '%s': %s", path, strerror(e));
        return e == ENOENT ? TD_ENOENT : td_err_from_errno(e);
    }
    char *buf = malloc(CFG_MAX_FILE_BYTES + 1);
    if (!buf) {
        fclose(f);
        set_err(c, "out of memory");
        return TD_ENOMEM;
    }
    size_t n = fread(buf, 1, CFG_MAX_FILE_BYTES + 1, f);
    int rc = 0;
    if (ferror(f)) {
        set_err(c, "cannot read config file '%s': %s", path, strerror(errno));
        rc = TD_EIO;
    } else if (n > CFG_MAX_FILE_BYTES) {
        set_err(c, "config file '%s' is larger than %u bytes", path, CFG_MAX_FILE_BYTES);
        rc = TD_ETOOLONG;
    } else if (memchr(buf, '\0', n)) {
        set_err(c, "config file '%s' contains a NUL byte (not a text file?)", path);
        rc = TD_EFORMAT;
    }
    fclose(f);
    if (rc == 0) {
        buf[n] = '\0';
        rc = cfg_load_string(c, buf, path);
    }
    free(buf);
    return rc;
}

/* cfg_set; a flag (as_flag) is named --name in messages. */
static int set_value(cfg *c, const char *name, const char *value, const char *origin, bool as_flag)
{
    if (!c || !name || !value) return TD_EINVAL;
    if (!origin) origin = "command line";
    struct cfg_slot *slot = find_slot(c, name);
    if (!slot) {
        set_unknown_err(c, origin, name);
        return TD_EINVAL;
    }
    int rc = apply_as(c, slot, value, origin, origin, as_flag ? "--" : "");
    if (rc == 0) {
        slot->set = true;
        slot->load_id = 0; /* flags may repeat: the last one wins */
    }
    return rc;
}

int cfg_set(cfg *c, const char *name, const char *value, const char *origin)
{
    return set_value(c, name, value, origin, false);
}

int cfg_check_required(cfg *c)
{
    if (!c) return TD_EINVAL;
    for (size_t i = 0; i < c->nopts; i++) {
        if ((c->opts[i].flags & CFG_REQUIRED) && !c->slots[i].set) {
            set_err(c, "missing required option %s (set it in the config file or with --%s=%s)",
                    c->opts[i].name, c->opts[i].name, type_name(c->opts[i].type));
            return TD_EINVAL;
        }
    }
    return 0;
}

/* ---- flags -------------------------------------------------------------- */

struct flag {
    const char *name; /* the option's name in the table */
    const char *value;
};

static int add_positional(cfg *c, const char *arg)
{
    char **grown = realloc(c->pos, sizeof(*grown) * (size_t)(c->npos + 1));
    if (!grown) return TD_ENOMEM;
    c->pos = grown;
    grown[c->npos] = strdup(arg);
    if (!grown[c->npos]) return TD_ENOMEM;
    c->npos++;
    return 0;
}

int cfg_parse(cfg *c, int argc, char *const *argv)
{
    if (!c || argc < 0 || (argc > 0 && !argv)) return TD_EINVAL;
    c->err[0] = '\0';
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) break;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return CFG_HELP;
    }
    struct flag *flags = calloc((size_t)(argc > 0 ? argc : 1), sizeof(*flags));
    if (!flags) return TD_ENOMEM;
    int nflags = 0;
    const char *config_path = NULL;
    bool rest_positional = false;
    int rc = 0;
    /* Pass 1: split argv into flags; --config is applied before the rest. */
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (rest_positional || a[0] != '-' || a[1] == '\0') {
            rc = add_positional(c, a); /* "-" alone is a positional too (stdin) */
            if (rc != 0) set_err(c, "out of memory");
            continue;
        }
        if (a[1] != '-') {
            set_err(c, "command line: unknown flag '%s' (options are --key=value; see --help)", a);
            rc = TD_EINVAL;
            break;
        }
        if (a[2] == '\0') {
            rest_positional = true;
            continue;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        char key[CFG_MAX_NAME + 1];
        if (nlen == 0 || nlen > CFG_MAX_NAME) {
            set_err(c, "command line: bad flag '%s'", a);
            rc = TD_EINVAL;
            break;
        }
        memcpy(key, name, nlen);
        key[nlen] = '\0';
        const char *value = eq ? eq + 1 : NULL;
        bool is_config = strcmp(key, "config") == 0;
        struct cfg_slot *slot = is_config ? NULL : find_slot(c, key);
        if (!is_config && !slot) {
            set_unknown_flag_err(c, key);
            rc = TD_EINVAL;
            break;
        }
        if (!value) {
            if (slot && slot->opt->type == CFG_BOOL) {
                value = "true";
            } else if (i + 1 < argc) {
                value = argv[++i];
            } else {
                set_err(c, "command line: flag --%s needs a value (--%s=%s)", key, key,
                        is_config ? "FILE" : type_name(slot->opt->type));
                rc = TD_EINVAL;
                break;
            }
        }
        if (is_config) {
            if (config_path) {
                set_err(c, "command line: --config given twice ('%s' and '%s')", config_path,
                        value);
                rc = TD_EINVAL;
                break;
            }
            config_path = value;
            continue;
        }
        flags[nflags++] = (struct flag){.name = slot->opt->name, .value = value};
    }
    if (rc == 0 && config_path) rc = cfg_load_file(c, config_path);
    /* Pass 2: flags override the file. They are one source: a repeated list
     * flag appends, and together they replace the file's list. */
    c->load_id++;
    for (int i = 0; i < nflags && rc == 0; i++)
        rc = set_value(c, flags[i].name, flags[i].value, "command line", true);
    if (rc == 0) rc = cfg_check_required(c);
    free(flags);
    return rc;
}

/* ---- help, source, log -------------------------------------------------- */

const char *cfg_help(cfg *c)
{
    if (!c) return "";
    if (c->help) return c->help;
    sbuf b = {0};
    sbuf_printf(&b, "Usage: %s [--config FILE] [--KEY=VALUE ...]\n\n", c->prog);
    sbuf_printf(&b, "Every option can be set in the config file (KEY = VALUE, or KEY's last\n"
                    "part under a [section] header) or on the command line; flags win.\n\n");
    sbuf_printf(&b, "  --config=FILE\n      Read options from FILE.\n");
    sbuf_printf(&b, "  --help\n      Show this text.\n");
    for (size_t i = 0; i < c->nopts; i++) {
        const struct cfg_option *o = &c->opts[i];
        sbuf_printf(&b, "  --%s=%s%s%s\n      %s", o->name, type_name(o->type),
                    o->type == CFG_LIST ? " (repeatable)" : "",
                    o->flags & CFG_REQUIRED ? " (required)" : "", o->help ? o->help : "");
        bool open = false;
        if (o->def) {
            sbuf_printf(&b, " [default: %s", o->def);
            open = true;
        }
        if (o->min || o->max) {
            sbuf_printf(&b, "%s", open ? "; " : " [");
            if (o->min && o->max)
                sbuf_printf(&b, "range: %s..%s", o->min, o->max);
            else if (o->min)
                sbuf_printf(&b, "min: %s", o->min);
            else
                sbuf_printf(&b, "max: %s", o->max);
            open = true;
        }
        if (o->choices) {
            sbuf_printf(&b, "%sone of: %s", open ? "; " : " [", o->choices);
            open = true;
        }
        sbuf_printf(&b, "%s\n", open ? "]" : "");
    }
    c->help = sbuf_take(&b);
    return c->help ? c->help : "out of memory\n";
}

const char *cfg_source(const cfg *c, const char *name)
{
    if (!c || !name) return NULL;
    const struct cfg_slot *slot = find_slot(c, name);
    return slot ? slot->source : NULL;
}

char *const *cfg_positional(const cfg *c, int *count)
{
    if (count) *count = c ? c->npos : 0;
    return c ? c->pos : NULL;
}

void cfg_log(const cfg *c, const char *mod)
{
    if (!c) return;
    for (size_t i = 0; i < c->nopts; i++) {
        const struct cfg_slot *slot = &c->slots[i];
        const void *f = (const char *)c->target + slot->opt->offset;
        char value[96];
        switch (slot->opt->type) {
        case CFG_STRING: {
            const char *s = *(const char *const *)f;
            char shown[80];
            printable(shown, sizeof(shown), s ? s : "");
            for (char *q = shown; *q; q++)
                if (*q == '"') *q = '\'';
            snprintf(value, sizeof(value), "\"%s\"", shown);
            break;
        }
        case CFG_INT64:
            snprintf(value, sizeof(value), "%lld", (long long)*(const int64_t *)f);
            break;
        case CFG_DURATION:
            snprintf(value, sizeof(value), "%lldns", (long long)*(const int64_t *)f);
            break;
        case CFG_SIZE:
            snprintf(value, sizeof(value), "%lluB", (unsigned long long)*(const uint64_t *)f);
            break;
        case CFG_DOUBLE:
            snprintf(value, sizeof(value), "%.17g", *(const double *)f);
            break;
        case CFG_BOOL:
            snprintf(value, sizeof(value), "%s", *(const bool *)f ? "true" : "false");
            break;
        case CFG_LIST:
            /* The count only: items may hold any text; cfg_source says where. */
            snprintf(value, sizeof(value), "%zu_items", ((const struct cfg_list *)f)->n);
            break;
        }
        td_log_info(mod ? mod : "config", "option", "key=%s value=%s source=\"%s\"",
                    slot->opt->name, value, slot->source ? slot->source : "");
    }
}

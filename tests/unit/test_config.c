/* Unit tests for common/config: value syntax, file format, flags, precedence,
 * --help, and every error path (each error names the place and the value). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/config.h"
#include "common/err.h"
#include "common/log.h"
#include "fail_alloc.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct opts {
    const char *name;
    int64_t port;
    double ratio;
    bool verbose;
    int64_t window_ns;
    uint64_t pool_bytes;
    const char *backend;
};

static const struct cfg_option table[] = {
    {"name", CFG_STRING, "tandem", NULL, NULL, NULL, "Instance name", offsetof(struct opts, name),
     0},
    {"router.port", CFG_INT64, "8000", "1", "65535", NULL, "HTTP port", offsetof(struct opts, port),
     0},
    {"router.ratio", CFG_DOUBLE, "0.5", "0", "1", NULL, "Share of something",
     offsetof(struct opts, ratio), 0},
    {"router.verbose", CFG_BOOL, "false", NULL, NULL, NULL, "Say more",
     offsetof(struct opts, verbose), 0},
    {"router.window", CFG_DURATION, "250ms", "1ms", "10s", NULL, "Rate window",
     offsetof(struct opts, window_ns), 0},
    {"kv.pool", CFG_SIZE, "64MiB", "1MiB", "1TiB", NULL, "KV pool size",
     offsetof(struct opts, pool_bytes), 0},
    {"engine.backend", CFG_STRING, "cpu", NULL, NULL, "cpu|cuda", "Compute backend",
     offsetof(struct opts, backend), 0},
};
#define NTABLE (sizeof(table) / sizeof(table[0]))

static cfg *make(struct opts *o)
{
    memset(o, 0xff, sizeof(*o)); /* defaults must overwrite everything */
    cfg *c = NULL;
    assert_int_equal(cfg_create(&c, "tandem-test", table, NTABLE, o), 0);
    assert_non_null(c);
    return c;
}

/* Writes text to a fresh temporary file; returns its path (static buffer). */
static const char *write_temp(const char *text, size_t len)
{
    static char path[64];
    strcpy(path, "/tmp/tandem_test_config_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
    return path;
}

static void test_defaults(void **state)
{
    (void)state;
    struct opts o;
    cfg *c = make(&o);
    assert_string_equal(o.name, "tandem");
    assert_int_equal(o.port, 8000);
    assert_true(o.ratio == 0.5);
    assert_false(o.verbose);
    assert_int_equal(o.window_ns, 250000000);
    assert_int_equal(o.pool_bytes, 64u << 20);
    assert_string_equal(o.backend, "cpu");
    assert_string_equal(cfg_source(c, "router.port"), "default");
    assert_null(cfg_source(c, "router.nope"));
    assert_string_equal(cfg_error(c), "");
    cfg_free(c);
    cfg_free(NULL);
}

/* Values of every type, one option each and no bounds. */
struct all {
    int64_t i, dur;
    double d;
    bool b;
    uint64_t size;
    const char *s;
};

static const struct cfg_option all_table[] = {
    {"i", CFG_INT64, NULL, NULL, NULL, NULL, "", offsetof(struct all, i), 0},
    {"dur", CFG_DURATION, NULL, NULL, NULL, NULL, "", offsetof(struct all, dur), 0},
    {"d", CFG_DOUBLE, NULL, NULL, NULL, NULL, "", offsetof(struct all, d), 0},
    {"b", CFG_BOOL, NULL, NULL, NULL, NULL, "", offsetof(struct all, b), 0},
    {"size", CFG_SIZE, NULL, NULL, NULL, NULL, "", offsetof(struct all, size), 0},
    {"s", CFG_STRING, NULL, NULL, NULL, NULL, "", offsetof(struct all, s), 0},
};

struct case_ {
    const char *key, *text;
    int rc;          /* expected return */
    int64_t value;   /* expected value when rc == 0 (for i, dur, b, size) */
    const char *why; /* expected substring of the error otherwise */
};

static void test_value_syntax(void **state)
{
    (void)state;
    static const struct case_ cases[] = {
        {"i", "42", 0, 42, NULL},
        {"i", "-7", 0, -7, NULL},
        {"i", "+3", 0, 3, NULL},
        {"i", "9223372036854775807", 0, INT64_MAX, NULL},
        {"i", "-9223372036854775808", 0, INT64_MIN, NULL},
        {"i", "9223372036854775808", TD_ERANGE, 0, "outside the 64-bit integer range"},
        {"i", "12abc", TD_EINVAL, 0, "expected an integer"},
        {"i", "0x10", TD_EINVAL, 0, "expected an integer"},
        {"i", "1.5", TD_EINVAL, 0, "expected an integer"},
        {"i", "", TD_EINVAL, 0, "empty value"},
        {"i", "-", TD_EINVAL, 0, "expected an integer"},
        {"dur", "250ms", 0, 250000000, NULL},
        {"dur", "2s", 0, 2000000000, NULL},
        {"dur", "1.5s", 0, 1500000000, NULL},
        {"dur", "1m30s", 0, 90000000000, NULL},
        {"dur", "2h", 0, 7200000000000, NULL},
        {"dur", "3us", 0, 3000, NULL},
        {"dur", "7ns", 0, 7, NULL},
        {"dur", "0", 0, 0, NULL},
        {"dur", "0.000000001s", 0, 1, NULL},
        {"dur", "0.5ns", TD_EINVAL, 0, "finer than 1ns"},
        {"dur", "1.0000000000000000001s", TD_EINVAL, 0, "too many decimal digits"},
        {"dur", "10", TD_EINVAL, 0, "missing unit"},
        {"dur", "5sec", TD_EINVAL, 0, "unknown unit"},
        {"dur", "1.2.3s", TD_EINVAL, 0, "malformed number"},
        {"dur", "-1s", TD_EINVAL, 0, "expected a number followed by a unit"},
        {"dur", "ms", TD_EINVAL, 0, "expected a number"},
        {"dur", "2562047h", 0, 2562047LL * 3600 * 1000000000LL, NULL},
        {"dur", "2562048h", TD_ERANGE, 0, "too large"},
        {"dur", "99999999999999999999s", TD_ERANGE, 0, "too large"},
        {"size", "64MiB", 0, 64LL << 20, NULL},
        {"size", "1.5KiB", 0, 1536, NULL},
        {"size", "10", 0, 10, NULL},
        {"size", "10 B", 0, 10, NULL},
        {"size", "1GB", 0, 1000000000, NULL},
        {"size", "2TiB", 0, 2LL << 40, NULL},
        {"size", "0.1KiB", TD_EINVAL, 0, "not a whole number of bytes"},
        {"size", "5XB", TD_EINVAL, 0, "unknown unit"},
        {"size", "5kb", TD_EINVAL, 0, "unknown unit"},
        {"size", "-5", TD_EINVAL, 0, "expected a number of bytes"},
        {"size", "MiB", TD_EINVAL, 0, "expected a number of bytes"},
        {"size", "1.2.3MiB", TD_EINVAL, 0, "malformed number"},
        {"size", "1MiB2", TD_EINVAL, 0, "unknown unit"},
        {"size", "18446744073709551616", TD_ERANGE, 0, "too large"},
        {"size", "17000000TiB", TD_ERANGE, 0, "too large"},
        {"b", "TRUE", 0, 1, NULL},
        {"b", "off", 0, 0, NULL},
        {"b", "1", 0, 1, NULL},
        {"b", "No", 0, 0, NULL},
        {"b", "maybe", TD_EINVAL, 0, "expected true/false"},
    };
    struct all a;
    cfg *c = NULL;
    assert_int_equal(cfg_create(&c, "t", all_table, 6, &a), 0);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct case_ *k = &cases[i];
        int rc = cfg_set(c, k->key, k->text, "test");
        if (rc != k->rc)
            fail_msg("%s = \"%s\": rc %d, want %d (%s)", k->key, k->text, rc, k->rc, cfg_error(c));
        if (rc == 0) {
            int64_t got = strcmp(k->key, "i") == 0     ? a.i
                          : strcmp(k->key, "dur") == 0 ? a.dur
                          : strcmp(k->key, "b") == 0   ? (int64_t)a.b
                                                       : (int64_t)a.size;
            if (got != k->value)
                fail_msg("%s = \"%s\": got %lld, want %lld", k->key, k->text, (long long)got,
                         (long long)k->value);
        } else {
            char want[160];
            snprintf(want, sizeof(want), "test: %s = \"%s\": ", k->key, k->text);
            if (!strstr(cfg_error(c), want) || !strstr(cfg_error(c), k->why))
                fail_msg("%s = \"%s\": error '%s' lacks '%s' / '%s'", k->key, k->text, cfg_error(c),
                         want, k->why);
        }
    }
    /* Doubles. */
    assert_int_equal(cfg_set(c, "d", "0.25", "test"), 0);
    assert_true(a.d == 0.25);
    assert_int_equal(cfg_set(c, "d", "-1e3", "test"), 0);
    assert_true(a.d == -1000.0);
    assert_int_equal(cfg_set(c, "d", "nan", "test"), TD_EINVAL);
    assert_int_equal(cfg_set(c, "d", "inf", "test"), TD_EINVAL);
    assert_int_equal(cfg_set(c, "d", "0x1p3", "test"), TD_EINVAL);
    assert_int_equal(cfg_set(c, "d", "1e999", "test"), TD_ERANGE);
    assert_int_equal(cfg_set(c, "d", "1.5.2", "test"), TD_EINVAL);
    assert_true(a.d == -1000.0); /* failed sets change nothing */
    /* Strings: anything, including empty. */
    assert_int_equal(cfg_set(c, "s", "", "test"), 0);
    assert_string_equal(a.s, "");
    assert_int_equal(cfg_set(c, "s", "x y", "test"), 0);
    assert_string_equal(a.s, "x y");
    assert_string_equal(cfg_source(c, "s"), "test");
    assert_int_equal(cfg_set(c, "ss", "x", "test"), TD_EINVAL);
    assert_string_equal(cfg_error(c), "test: unknown key 'ss' (did you mean 's'?)");
    assert_int_equal(cfg_set(c, NULL, "x", "test"), TD_EINVAL);
    cfg_free(c);
}

static void test_file_format(void **state)
{
    (void)state;
    struct opts o;
    cfg *c = make(&o);
    const char *text =
        "# a comment\n"
        "   name = \"my \\\"node\\\" # not a comment\\n\\t\\\\\\r\\#\"   # comment\r\n"
        "\n"
        "[router]\n"
        "port=9000 # trailing\n"
        "\tratio = 0.75\n"
        "verbose = yes\n"
        "window = 1.5s\n"
        "[ kv ]   # spaces in header are fine\n"
        "pool = 1.5GiB\n"
        "[engine]\n"
        "backend = cuda"; /* no final newline */
    assert_int_equal(cfg_load_string(c, text, "node.conf"), 0);
    assert_string_equal(o.name, "my \"node\" # not a comment\n\t\\\r#");
    assert_int_equal(o.port, 9000);
    assert_true(o.ratio == 0.75);
    assert_true(o.verbose);
    assert_int_equal(o.window_ns, 1500000000);
    assert_int_equal(o.pool_bytes, 3ull << 29);
    assert_string_equal(o.backend, "cuda");
    assert_string_equal(cfg_source(c, "router.port"), "node.conf:5");
    assert_string_equal(cfg_source(c, "engine.backend"), "node.conf:12");
    /* A second load may override (later wins); dotted keys work at top level. */
    assert_int_equal(cfg_load_string(c, "router.port = 9001\n", "override.conf"), 0);
    assert_int_equal(o.port, 9001);
    /* Dotted key inside a section: [router] + a.b would be router.a.b. */
    assert_int_equal(cfg_load_string(c, "[router]\nwindow.x = 1\n", "x"), TD_EINVAL);
    assert_string_equal(cfg_error(c), "x:2: unknown key 'router.window.x' (did you mean "
                                      "'router.window'?)");
    cfg_free(c);
}

struct err_case {
    const char *text;
    int rc;
    const char *msg; /* exact message */
};

static void test_file_errors(void **state)
{
    (void)state;
    static const struct err_case cases[] = {
        {"[router]\nprot = 1\n", TD_EINVAL,
         "t.conf:2: unknown key 'router.prot' (did you mean 'router.port'?)"},
        {"port = 1\n", TD_EINVAL, "t.conf:1: unknown key 'port' (did you mean 'router.port'?)"},
        {"zzzzzzzz = 1\n", TD_EINVAL, "t.conf:1: unknown key 'zzzzzzzz' (see --help)"},
        {"[router]\nport = 70000\n", TD_ERANGE,
         "t.conf:2: router.port = \"70000\": out of range [1, 65535]"},
        {"router.window = 20s\n", TD_ERANGE,
         "t.conf:1: router.window = \"20s\": out of range [1ms, 10s]"},
        {"kv.pool = 1KiB\n", TD_ERANGE, "t.conf:1: kv.pool = \"1KiB\": out of range [1MiB, 1TiB]"},
        {"router.ratio = 1.01\n", TD_ERANGE,
         "t.conf:1: router.ratio = \"1.01\": out of range [0, 1]"},
        {"\n\nrouter.port = abc\n", TD_EINVAL,
         "t.conf:3: router.port = \"abc\": expected an integer (type INT)"},
        {"router.port =\n", TD_EINVAL, "t.conf:1: router.port = \"\": empty value (type INT)"},
        {"router.verbose = maybe\n", TD_EINVAL,
         "t.conf:1: router.verbose = \"maybe\": expected true/false, yes/no, on/off or 1/0 (type "
         "BOOL)"},
        {"engine.backend = tpu\n", TD_EINVAL,
         "t.conf:1: engine.backend = \"tpu\": must be one of cpu|cuda"},
        {"router.port 80\n", TD_EFORMAT, "t.conf:1: expected 'key = value' or '[section]'"},
        {"= 80\n", TD_EFORMAT, "t.conf:1: expected 'key = value' or '[section]'"},
        {"po$rt = 80\n", TD_EFORMAT, "t.conf:1: expected 'key = value' or '[section]'"},
        {"router..port = 80\n", TD_EFORMAT,
         "t.conf:1: bad key 'router..port' (use letters, digits, _ - and dots)"},
        {"[router\n", TD_EFORMAT, "t.conf:1: section header without ']'"},
        {"[rou ter]\n", TD_EFORMAT,
         "t.conf:1: bad section name 'rou ter' (use letters, digits, _ - .)"},
        {"[]\n", TD_EFORMAT, "t.conf:1: bad section name '' (use letters, digits, _ - .)"},
        {"[router] port = 1\n", TD_EFORMAT, "t.conf:1: unexpected text after section header"},
        {"name = \"abc\n", TD_EFORMAT, "t.conf:1: unterminated quoted string"},
        {"name = \"abc\\\"\n", TD_EFORMAT, "t.conf:1: unterminated quoted string"},
        {"name = \"a\\qb\"\n", TD_EFORMAT,
         "t.conf:1: unknown escape in quoted string (use \\\\ \\\" \\n \\t \\r \\#)"},
        {"name = \"abc\" x\n", TD_EFORMAT, "t.conf:1: unexpected text after quoted string"},
        {"[router]\nport = 1\n# x\nport = 2\n", TD_EINVAL,
         "t.conf:4: router.port set twice (first on line 2)"},
        {"name = \"a\x01b\" x\n", TD_EFORMAT, "t.conf:1: unexpected text after quoted string"},
        {"name = \"a\\nb\"\nrouter.port = 0\n", TD_ERANGE,
         "t.conf:2: router.port = \"0\": out of range [1, 65535]"},
        {"router.window = \"1\x02s\"\n", TD_EINVAL,
         "t.conf:1: router.window = \"1?s\": missing unit (ns, us, ms, s, m, h) (type DURATION)"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct opts o;
        cfg *c = make(&o);
        int rc = cfg_load_string(c, cases[i].text, "t.conf");
        if (rc != cases[i].rc || strcmp(cfg_error(c), cases[i].msg) != 0)
            fail_msg("case %zu: rc %d (want %d), message\n  '%s'\nwant\n  '%s'", i, rc, cases[i].rc,
                     cfg_error(c), cases[i].msg);
        assert_int_equal(o.port, strstr(cases[i].text, "port = 1\n#") ? 1 : 8000);
        cfg_free(c);
    }
}

static void test_load_file(void **state)
{
    (void)state;
    struct opts o;
    cfg *c = make(&o);
    const char *text = "[router]\nport = 7001\n";
    const char *path = write_temp(text, strlen(text));
    assert_int_equal(cfg_load_file(c, path), 0);
    assert_int_equal(o.port, 7001);
    char want[128];
    snprintf(want, sizeof(want), "%s:2", path);
    assert_string_equal(cfg_source(c, "router.port"), want);
    unlink(path);

    assert_int_equal(cfg_load_file(c, "/nonexistent/tandem.conf"), TD_ENOENT);
    assert_string_equal(cfg_error(c), "cannot open config file '/nonexistent/tandem.conf': No "
                                      "such file or directory");
    /* A NUL byte: not a text file. */
    path = write_temp("port = 1\0\n", 10);
    assert_int_equal(cfg_load_file(c, path), TD_EFORMAT);
    assert_non_null(strstr(cfg_error(c), "contains a NUL byte"));
    unlink(path);
    /* A directory opens but cannot be read. */
    assert_int_equal(cfg_load_file(c, "/tmp"), TD_EIO);
    assert_non_null(strstr(cfg_error(c), "cannot read config file '/tmp'"));
    /* Too large. */
    size_t big = (1u << 20) + 10;
    char *buf = malloc(big);
    assert_non_null(buf);
    memset(buf, '#', big);
    path = write_temp(buf, big);
    free(buf);
    assert_int_equal(cfg_load_file(c, path), TD_ETOOLONG);
    assert_non_null(strstr(cfg_error(c), "is larger than"));
    unlink(path);
    assert_int_equal(o.port, 7001); /* failed loads changed nothing */
    cfg_free(c);
}

static void test_flags_override_file(void **state)
{
    (void)state;
    const char *text = "[router]\nport = 9000\nwindow = 2s\n";
    char path[64];
    strcpy(path, write_temp(text, strlen(text)));
    struct opts o;
    cfg *c = make(&o);
    /* Flags before --config still win over the file. */
    char *argv[] = {"prog",
                    "--router.port=9100",
                    "--router.verbose",
                    "--kv.pool",
                    "1GiB",
                    "--config",
                    path,
                    "input.txt",
                    "--name",
                    "x=y",
                    "-",
                    "--",
                    "--not-flag",
                    NULL};
    assert_int_equal(cfg_parse(c, 13, argv), 0);
    assert_int_equal(o.port, 9100);
    assert_string_equal(cfg_source(c, "router.port"), "command line");
    assert_true(o.verbose);
    assert_int_equal(o.pool_bytes, 1ull << 30);
    assert_int_equal(o.window_ns, 2000000000);
    char want[96];
    snprintf(want, sizeof(want), "%s:3", path);
    assert_string_equal(cfg_source(c, "router.window"), want);
    assert_string_equal(o.name, "x=y");
    int n = 0;
    char *const *pos = cfg_positional(c, &n);
    assert_int_equal(n, 3);
    assert_string_equal(pos[0], "input.txt");
    assert_string_equal(pos[1], "-");
    assert_string_equal(pos[2], "--not-flag");
    cfg_free(c);

    /* --config=FILE form; the last of repeated flags wins. */
    c = make(&o);
    char cfgflag[96];
    snprintf(cfgflag, sizeof(cfgflag), "--config=%s", path);
    char *argv2[] = {"prog", cfgflag, "--router.port=1", "--router.port", "2", NULL};
    assert_int_equal(cfg_parse(c, 5, argv2), 0);
    assert_int_equal(o.port, 2);
    assert_int_equal(o.window_ns, 2000000000);
    cfg_free(c);
    unlink(path);
}

/* CFG_LIST: a repeated flag or file key appends; flags replace the file's
 * list; the default is one item; choices apply to every item. */
struct list_opts {
    struct cfg_list stop;
    struct cfg_list tags;
    bool flag;
};

static const struct cfg_option list_table[] = {
    {"stop", CFG_LIST, NULL, NULL, NULL, NULL, "Stop string", offsetof(struct list_opts, stop), 0},
    {"tags", CFG_LIST, "a", NULL, NULL, "a|b|c", "Tags", offsetof(struct list_opts, tags), 0},
    {"flag", CFG_BOOL, NULL, NULL, NULL, NULL, "A switch", offsetof(struct list_opts, flag), 0},
};

static void test_lists(void **state)
{
    (void)state;
    struct list_opts o;
    cfg *c = NULL;
    assert_int_equal(cfg_create(&c, "p", list_table, 3, &o), 0);
    assert_int_equal(o.stop.n, 0);
    assert_int_equal(o.tags.n, 1);
    assert_string_equal(o.tags.v[0], "a");
    const char *text = "stop = \"x y\"\nstop = \"\\n\"\ntags = b\n";
    char path[64];
    strcpy(path, write_temp(text, strlen(text)));
    /* No list flag: the file's lists stand (the file's tags replace the default). */
    char *argv[] = {"prog", "--config", path, "--flag", NULL};
    assert_int_equal(cfg_parse(c, 4, argv), 0);
    assert_int_equal(o.stop.n, 2);
    assert_string_equal(o.stop.v[0], "x y");
    assert_string_equal(o.stop.v[1], "\n");
    assert_int_equal(o.tags.n, 1);
    assert_string_equal(o.tags.v[0], "b");
    assert_true(o.flag);
    cfg_free(c);

    /* Flags replace the file's list and append to each other, in order. */
    assert_int_equal(cfg_create(&c, "p", list_table, 3, &o), 0);
    char *argv2[] = {"prog", "--stop", "END", "--config", path, "--flag", "--stop=--", NULL};
    assert_int_equal(cfg_parse(c, 7, argv2), 0);
    assert_int_equal(o.stop.n, 2);
    assert_string_equal(o.stop.v[0], "END");
    assert_string_equal(o.stop.v[1], "--");
    assert_int_equal(o.tags.n, 1);
    assert_string_equal(o.tags.v[0], "b");
    assert_non_null(strstr(cfg_help(c), "--stop=STRING (repeatable)"));
    cfg_free(c);

    /* Choices are checked per item. */
    assert_int_equal(cfg_create(&c, "p", list_table, 3, &o), 0);
    char *argv3[] = {"prog", "--tags", "c", "--tags", "d", NULL};
    assert_int_equal(cfg_parse(c, 5, argv3), TD_EINVAL);
    assert_non_null(strstr(cfg_error(c), "command line: --tags = \"d\": must be one of a|b|c"));
    cfg_free(c);

    /* Lists take no bounds. */
    static const struct cfg_option bad[] = {
        {"l", CFG_LIST, NULL, "1", NULL, NULL, "x", 0, 0},
    };
    td_log_set_level(TD_LOG_OFF);
    assert_int_equal(cfg_create(&c, "p", bad, 1, &o), TD_EINVAL);
    td_log_set_level(TD_LOG_INFO);
    unlink(path);
}

static void test_flag_errors(void **state)
{
    (void)state;
    static const struct {
        const char *args[5];
        int rc;
        const char *msg;
    } cases[] = {
        {{"--router.prot=1"},
         TD_EINVAL,
         "command line: unknown flag '--router.prot' (did you mean '--router.port'?)"},
        {{"--bogus"}, TD_EINVAL, "command line: unknown flag '--bogus' (see --help)"},
        {{"--router.port"},
         TD_EINVAL,
         "command line: flag --router.port needs a value (--router.port=INT)"},
        {{"--config"}, TD_EINVAL, "command line: flag --config needs a value (--config=FILE)"},
        {{"-x"},
         TD_EINVAL,
         "command line: unknown flag '-x' (options are --key=value; see --help)"},
        {{"--=3"}, TD_EINVAL, "command line: bad flag '--=3'"},
        {{"--router.port=0"},
         TD_ERANGE,
         "command line: --router.port = \"0\": out of range [1, 65535]"},
        {{"--router.window", "fast"},
         TD_EINVAL,
         "command line: --router.window = \"fast\": expected a number followed by a unit (ns, us, "
         "ms, s, m, h) (type DURATION)"},
        {{"--config", "/nonexistent/a.conf"},
         TD_ENOENT,
         "cannot open config file '/nonexistent/a.conf': No such file or directory"},
        {{"--config=/a", "--config=/b"},
         TD_EINVAL,
         "command line: --config given twice ('/a' and '/b')"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *argv[7] = {"prog"};
        int argc = 1;
        for (int j = 0; j < 5 && cases[i].args[j]; j++)
            argv[argc++] = (char *)cases[i].args[j];
        struct opts o;
        cfg *c = make(&o);
        int rc = cfg_parse(c, argc, argv);
        if (rc != cases[i].rc || strcmp(cfg_error(c), cases[i].msg) != 0)
            fail_msg("case %zu: rc %d (want %d), message\n  '%s'\nwant\n  '%s'", i, rc, cases[i].rc,
                     cfg_error(c), cases[i].msg);
        cfg_free(c);
    }
}

struct req {
    const char *model;
    int64_t n;
    double f;
};

static const struct cfg_option req_table[] = {
    {"engine.model", CFG_STRING, NULL, NULL, NULL, NULL, "Model directory",
     offsetof(struct req, model), CFG_REQUIRED},
    {"n", CFG_INT64, NULL, "0", NULL, NULL, "Count", offsetof(struct req, n), 0},
    {"f", CFG_DOUBLE, NULL, NULL, "2.5", NULL, "Factor", offsetof(struct req, f), 0},
};

static void test_required_and_help(void **state)
{
    (void)state;
    struct req r;
    cfg *c = NULL;
    assert_int_equal(cfg_create(&c, "tandem-x", req_table, 3, &r), 0);
    assert_null(r.model);
    assert_string_equal(cfg_source(c, "engine.model"), "unset");
    char *argv[] = {"prog", NULL};
    assert_int_equal(cfg_parse(c, 1, argv), TD_EINVAL);
    assert_string_equal(cfg_error(c), "missing required option engine.model (set it in the "
                                      "config file or with --engine.model=STRING)");
    assert_int_equal(cfg_set(c, "n", "-1", "test"), TD_ERANGE);
    assert_string_equal(cfg_error(c), "test: n = \"-1\": must be >= 0");
    assert_int_equal(cfg_set(c, "f", "2.6", "test"), TD_ERANGE);
    assert_string_equal(cfg_error(c), "test: f = \"2.6\": must be <= 2.5");
    cfg_free(c);

    assert_int_equal(cfg_create(&c, "tandem-x", req_table, 3, &r), 0);
    char *argv2[] = {"prog", "--engine.model=/m", NULL};
    assert_int_equal(cfg_parse(c, 2, argv2), 0);
    assert_string_equal(r.model, "/m");
    cfg_free(c);

    /* --help wins over everything else, even bad flags; not after "--". */
    struct opts o;
    c = make(&o);
    char *argv3[] = {"prog", "--bogus", "--help", NULL};
    assert_int_equal(cfg_parse(c, 3, argv3), CFG_HELP);
    const char *help = cfg_help(c);
    assert_non_null(strstr(help, "Usage: tandem-test [--config FILE] [--KEY=VALUE ...]\n"));
    assert_non_null(strstr(help, "  --router.port=INT\n      HTTP port [default: 8000; range: "
                                 "1..65535]\n"));
    assert_non_null(strstr(help, "  --engine.backend=STRING\n      Compute backend [default: "
                                 "cpu; one of: cpu|cuda]\n"));
    assert_non_null(strstr(help, "  --router.window=DURATION\n"));
    assert_non_null(strstr(help, "  --kv.pool=SIZE\n"));
    assert_ptr_equal(cfg_help(c), help); /* built once */
    char *argv4[] = {"prog", "--", "--help", NULL};
    assert_int_equal(cfg_parse(c, 3, argv4), 0);
    cfg_free(c);

    assert_int_equal(cfg_create(&c, "tandem-x", req_table, 3, &r), 0);
    help = cfg_help(c);
    assert_non_null(strstr(help, "  --engine.model=STRING (required)\n      Model directory\n"));
    assert_non_null(strstr(help, "  --n=INT\n      Count [min: 0]\n"));
    assert_non_null(strstr(help, "  --f=FLOAT\n      Factor [max: 2.5]\n"));
    cfg_free(c);
}

/* Bounds are inclusive: a value exactly at an option's min or max is
 * accepted (and stored), the next value past it is not, for every bounded
 * type; from a file, a flag, cfg_set and as a default. */
static void test_bounds_inclusive(void **state)
{
    (void)state;
    static const struct {
        const char *key, *text;
        int rc;
    } cases[] = {
        {"router.port", "1", 0},
        {"router.port", "65535", 0},
        {"router.port", "0", TD_ERANGE},
        {"router.port", "65536", TD_ERANGE},
        {"router.ratio", "0", 0},
        {"router.ratio", "1", 0},
        {"router.ratio", "-0.000001", TD_ERANGE},
        {"router.ratio", "1.000001", TD_ERANGE},
        {"router.window", "1ms", 0},
        {"router.window", "10s", 0},
        {"router.window", "999999ns", TD_ERANGE},
        {"router.window", "10000000001ns", TD_ERANGE},
        {"kv.pool", "1MiB", 0},
        {"kv.pool", "1TiB", 0},
        {"kv.pool", "1048575", TD_ERANGE},
        {"kv.pool", "1099511627777", TD_ERANGE},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct opts o;
        cfg *c = make(&o);
        int rc = cfg_set(c, cases[i].key, cases[i].text, "test");
        if (rc != cases[i].rc)
            fail_msg("%s = \"%s\": rc %d, want %d (%s)", cases[i].key, cases[i].text, rc,
                     cases[i].rc, cfg_error(c));
        cfg_free(c);
    }
    /* Stored exactly, through a file and through flags. */
    struct opts o;
    cfg *c = make(&o);
    assert_int_equal(cfg_load_string(c,
                                     "[router]\nport = 65535\nratio = 1\nwindow = 10s\n"
                                     "[kv]\npool = 1TiB\n",
                                     "max.conf"),
                     0);
    assert_int_equal(o.port, 65535);
    assert_true(o.ratio == 1.0);
    assert_int_equal(o.window_ns, 10 * 1000000000LL);
    assert_int_equal(o.pool_bytes, 1ull << 40);
    cfg_free(c);
    c = make(&o);
    char *argv[] = {
        "prog", "--router.port=1", "--router.ratio=0", "--router.window=1ms", "--kv.pool=1MiB",
        NULL};
    assert_int_equal(cfg_parse(c, 5, argv), 0);
    assert_int_equal(o.port, 1);
    assert_true(o.ratio == 0.0);
    assert_int_equal(o.window_ns, 1000000);
    assert_int_equal(o.pool_bytes, 1u << 20);
    cfg_free(c);
    /* One-sided bounds (req_table: n >= 0, f <= 2.5). */
    struct req r;
    assert_int_equal(cfg_create(&c, "t", req_table, 3, &r), 0);
    assert_int_equal(cfg_set(c, "n", "0", "test"), 0);
    assert_int_equal(r.n, 0);
    assert_int_equal(cfg_set(c, "f", "2.5", "test"), 0);
    assert_true(r.f == 2.5);
    assert_int_equal(cfg_set(c, "n", "-1", "test"), TD_ERANGE);
    assert_int_equal(cfg_set(c, "f", "2.5000001", "test"), TD_ERANGE);
    cfg_free(c);
    /* Defaults that sit on a bound are valid tables. */
    static const struct cfg_option edge[] = {
        {"lo", CFG_INT64, "1", "1", "9", NULL, "", offsetof(struct opts, port), 0},
        {"hi", CFG_SIZE, "1TiB", "1MiB", "1TiB", NULL, "", offsetof(struct opts, pool_bytes), 0},
        {"d", CFG_DURATION, "10s", "1ms", "10s", NULL, "", offsetof(struct opts, window_ns), 0},
        {"x", CFG_DOUBLE, "0", "0", "1", NULL, "", offsetof(struct opts, ratio), 0},
    };
    assert_int_equal(cfg_create(&c, "t", edge, 4, &o), 0);
    assert_int_equal(o.port, 1);
    assert_int_equal(o.pool_bytes, 1ull << 40);
    assert_int_equal(o.window_ns, 10 * 1000000000LL);
    assert_true(o.ratio == 0.0);
    cfg_free(c);
}

/* Mistakes in the option table itself are caught at cfg_create. */
static void test_bad_tables(void **state)
{
    (void)state;
    struct opts o;
    static const struct cfg_option bad[][2] = {
        {{"a..b", CFG_INT64, NULL, NULL, NULL, NULL, "", 0, 0}},
        {{"a b", CFG_INT64, NULL, NULL, NULL, NULL, "", 0, 0}},
        {{"config", CFG_STRING, NULL, NULL, NULL, NULL, "", 0, 0}},
        {{"x", CFG_INT64, "5", "10", NULL, NULL, "", offsetof(struct opts, port), 0}},
        {{"x", CFG_INT64, "abc", NULL, NULL, NULL, "", offsetof(struct opts, port), 0}},
        {{"x", CFG_INT64, NULL, "10", "1", NULL, "", offsetof(struct opts, port), 0}},
        {{"x", CFG_INT64, NULL, "one", NULL, NULL, "", offsetof(struct opts, port), 0}},
        {{"x", CFG_INT64, NULL, NULL, "1e3", NULL, "", offsetof(struct opts, port), 0}},
        {{"x", (enum cfg_type)99, NULL, NULL, NULL, NULL, "", offsetof(struct opts, port), 0}},
        {{"x", CFG_STRING, NULL, "1", NULL, NULL, "", offsetof(struct opts, name), 0}},
        {{"x", CFG_INT64, NULL, NULL, NULL, "a|b", "", offsetof(struct opts, port), 0}},
        {{"x", CFG_STRING, "d", NULL, NULL, NULL, "", offsetof(struct opts, name), CFG_REQUIRED}},
        {{"x", CFG_STRING, NULL, NULL, NULL, NULL, "", offsetof(struct opts, name), 8}},
        {{"x", CFG_STRING, "z", NULL, NULL, "a|b", "", offsetof(struct opts, name), 0}},
        {{"x", CFG_INT64, NULL, NULL, NULL, NULL, "", offsetof(struct opts, port), 0},
         {"x", CFG_INT64, NULL, NULL, NULL, NULL, "", offsetof(struct opts, port), 0}},
    };
    enum td_log_level level = td_log_get_level();
    td_log_set_level(TD_LOG_OFF); /* these log an error each; keep the output clean */
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cfg *c = (cfg *)&o; /* must be reset to NULL on failure */
        size_t n = bad[i][1].name ? 2 : 1;
        if (cfg_create(&c, "t", bad[i], n, &o) != TD_EINVAL) fail_msg("bad table %zu accepted", i);
        assert_null(c);
    }
    cfg *c = NULL;
    assert_int_equal(cfg_create(&c, "t", NULL, 1, &o), TD_EINVAL);
    assert_int_equal(cfg_create(&c, "t", table, NTABLE, NULL), TD_EINVAL);
    assert_int_equal(cfg_create(NULL, "t", table, NTABLE, &o), TD_EINVAL);
    td_log_set_level(level);
}

static void test_log_lines(void **state)
{
    (void)state;
    struct opts o;
    cfg *c = make(&o);
    assert_int_equal(cfg_set(c, "name", "a \"b\"", NULL), 0);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    td_log_set_fd(fds[1]);
    cfg_log(c, "test");
    td_log_set_fd(2);
    close(fds[1]);
    char buf[4096] = {0};
    ssize_t n = read(fds[0], buf, sizeof(buf) - 1);
    close(fds[0]);
    assert_true(n > 0);
    assert_non_null(strstr(buf, "mod=test event=option key=router.port value=8000 "
                                "source=\"default\"\n"));
    assert_non_null(strstr(buf, "key=name value=\"a 'b'\" source=\"command line\"\n"));
    assert_non_null(strstr(buf, "key=router.window value=250000000ns"));
    assert_non_null(strstr(buf, "key=kv.pool value=67108864B"));
    cfg_free(c);
}

/* Random text built from tokens the parser cares about (real keys, units,
 * quotes, escapes, comments, headers): every input gets 0 or a negative code
 * with a message naming the line, never a crash (ASan checks memory). */
static void test_random_input(void **state)
{
    (void)state;
    static const char *const tokens[] = {
        "[router]\n", "[kv]\n",      "[",       "]",     "port",  "window", "pool",
        "name",       "router.port", "kv.pool", " = ",   "=",     "\"",     "\\",
        "\\\"",       "1.5",         "0",       "65535", "70000", "ms",     "s",
        "GiB",        "B",           "#",       " ",     "\t",    "\n",     "\r\n",
        "x",          "-",           ".",       "\x01",  "\xff",  "1e9",    "9999999999999999999"};
    const size_t ntok = sizeof(tokens) / sizeof(tokens[0]);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    char text[512];
    int ok = 0;
    for (int round = 0; round < 3000; round++) {
        size_t len = 0;
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int n = (int)((x >> 33) % 24);
        for (int t = 0; t < n; t++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            const char *tok = tokens[(x >> 33) % ntok];
            size_t tl = strlen(tok);
            if (len + tl >= sizeof(text)) break;
            memcpy(text + len, tok, tl);
            len += tl;
        }
        text[len] = '\0';
        struct opts o;
        cfg *c = make(&o);
        int rc = cfg_load_string(c, text, "r");
        if (rc > 0 || (rc < 0 && strncmp(cfg_error(c), "r:", 2) != 0))
            fail_msg("round %d: rc %d, message '%s'", round, rc, cfg_error(c));
        ok += rc == 0;
        cfg_free(c);
    }
    assert_true(ok > 0); /* some inputs were valid: the generator is not all noise */
}

/* Every allocation in create, load, parse and help fails in turn: each call
 * reports TD_ENOMEM (or the help text says so), nothing leaks (ASan), and
 * with no failure the same steps succeed. */
static int config_steps(void)
{
    struct opts o;
    cfg *c = NULL;
    int rc = cfg_create(&c, "tandem-test", table, NTABLE, &o);
    if (rc != 0) return rc;
    rc = cfg_load_string(c, "name = \"n\"\n[engine]\nbackend = cuda\n", "m.conf");
    if (rc == 0) {
        char *argv[] = {"prog", "--name=x", "pos1", "pos2", "pos3", "pos4", "pos5", NULL};
        rc = cfg_parse(c, 7, argv);
    }
    if (rc == 0 && strcmp(cfg_help(c), "out of memory\n") == 0) rc = TD_ENOMEM;
    if (rc == 0 && strcmp(o.name, "x") != 0) rc = TD_EINTERNAL;
    cfg_free(c);
    if (rc != 0) return rc;
    struct list_opts lo;
    rc = cfg_create(&c, "p", list_table, 3, &lo);
    if (rc != 0) return rc;
    rc = cfg_load_string(c, "stop = a\nstop = b\ntags = c\n", "l.conf");
    if (rc == 0) {
        char *argv[] = {"prog", "--stop=x", "--stop", "y", "--tags=b", NULL};
        rc = cfg_parse(c, 5, argv);
    }
    if (rc == 0 && (lo.stop.n != 2 || strcmp(lo.stop.v[1], "y") != 0)) rc = TD_EINTERNAL;
    cfg_free(c);
    return rc;
}

static void test_alloc_failures(void **state)
{
    (void)state;
    enum td_log_level level = td_log_get_level();
    td_log_set_level(TD_LOG_OFF);
    for (long n = 0;; n++) {
        fail_alloc_arm(n);
        int rc = config_steps();
        long hits = fail_alloc_disarm();
        if (hits == 0) {
            assert_int_equal(rc, 0);
            assert_true(n > 10); /* the steps did allocate */
            break;
        }
        if (rc != TD_ENOMEM)
            fail_msg("allocation %ld failed: rc %d (%s), want TD_ENOMEM", n, rc, td_strerror(rc));
    }
    td_log_set_level(level);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),     cmocka_unit_test(test_value_syntax),
        cmocka_unit_test(test_file_format),  cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_load_file),    cmocka_unit_test(test_flags_override_file),
        cmocka_unit_test(test_flag_errors),  cmocka_unit_test(test_required_and_help),
        cmocka_unit_test(test_bad_tables),   cmocka_unit_test(test_log_lines),
        cmocka_unit_test(test_random_input), cmocka_unit_test(test_alloc_failures),
        cmocka_unit_test(test_lists),        cmocka_unit_test(test_bounds_inclusive),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

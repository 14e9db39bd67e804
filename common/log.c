#include "log.h"

#include "err.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static _Atomic int log_level = -1; /* -1: not initialised from the environment yet */
static _Atomic int log_fd = 2;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

int td_log_level_parse(const char *text, enum td_log_level *out)
{
    for (int i = 0; i <= TD_LOG_OFF; i++) {
        if (text && strcmp(text, level_names[i]) == 0) {
            *out = (enum td_log_level)i;
            return 0;
        }
    }
    return TD_EINVAL;
}

void td_log_set_level(enum td_log_level level)
{
    atomic_store(&log_level, (int)level);
}

enum td_log_level td_log_get_level(void)
{
    int level = atomic_load(&log_level);
    if (level < 0) {
        enum td_log_level parsed = TD_LOG_INFO;
        const char *env = getenv("TANDEM_LOG_LEVEL");
        if (env) (void)td_log_level_parse(env, &parsed);
        level = (int)parsed;
        atomic_store(&log_level, level);
    }
    return (enum td_log_level)level;
}

void td_log_set_fd(int fd)
{
    atomic_store(&log_fd, fd);
}

void td_log_emitv(enum td_log_level level, const char *mod, const char *event, const char *fields,
                  va_list ap)
{
    if (level < td_log_get_level() || level >= TD_LOG_OFF) return;

    char line[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(
        line, sizeof(line), "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s mod=%s event=%s",
        tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
        ts.tv_nsec / 1000000, level_names[level], mod ? mod : "-", event ? event : "-");
    if (n < 0) return;
    size_t len = (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1;
    if (fields && fields[0] && len < sizeof(line) - 2) {
        line[len++] = ' ';
        int m = vsnprintf(line + len, sizeof(line) - len, fields, ap);
        if (m > 0) len += (size_t)m < sizeof(line) - len ? (size_t)m : sizeof(line) - len - 1;
    }
    if (len >= sizeof(line) - 1) len = sizeof(line) - 2; /* truncated: still one line */
    line[len++] = '\n';
    ssize_t written = write(atomic_load(&log_fd), line, len);
    (void)written; /* nowhere to report a failed log write */
}

void td_log_emit(enum td_log_level level, const char *mod, const char *event, const char *fields,
                 ...)
{
    va_list ap;
    va_start(ap, fields);
    td_log_emitv(level, mod, event, fields, ap);
    va_end(ap);
}

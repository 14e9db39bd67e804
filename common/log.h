/* log: one line per event, logfmt style:
 *   ts=2026-11-29T03:30:00.123Z level=info mod=rpc event=server_started port=7000
 * Each line is written with a single write(2), so lines from many threads never
 * interleave. The level threshold is global (set once at start-up). */
#ifndef TANDEM_COMMON_LOG_H
#define TANDEM_COMMON_LOG_H

#include <stdarg.h>

enum td_log_level {
    TD_LOG_DEBUG = 0,
    TD_LOG_INFO = 1,
    TD_LOG_WARN = 2,
    TD_LOG_ERROR = 3,
    TD_LOG_OFF = 4,
};

/* Sets the threshold; events below it are dropped. Default: TD_LOG_INFO, or the
 * value of the TANDEM_LOG_LEVEL environment variable when set. */
void td_log_set_level(enum td_log_level level);
enum td_log_level td_log_get_level(void);

/* Parses "debug", "info", "warn", "error" or "off". Returns 0 or TD_EINVAL. */
int td_log_level_parse(const char *text, enum td_log_level *out);

/* Sends lines to fd (default 2, stderr). The caller keeps fd open. */
void td_log_set_fd(int fd);

/* Emits one event. mod: module name; event: a snake_case event name; fields:
 * printf-style format producing space-separated key=value pairs, or NULL.
 * Values with spaces must be quoted by the caller (use %s with td_log_quote
 * only where needed; keep values simple). */
void td_log_emit(enum td_log_level level, const char *mod, const char *event, const char *fields,
                 ...) __attribute__((format(printf, 4, 5)));
void td_log_emitv(enum td_log_level level, const char *mod, const char *event, const char *fields,
                  va_list ap);

#define TD_LOG_ENABLED(level) ((level) >= td_log_get_level())
#define td_log_debug(mod, event, ...)                                                              \
    do {                                                                                           \
        if (TD_LOG_ENABLED(TD_LOG_DEBUG)) td_log_emit(TD_LOG_DEBUG, mod, event, __VA_ARGS__);      \
    } while (0)
#define td_log_info(mod, event, ...)  td_log_emit(TD_LOG_INFO, mod, event, __VA_ARGS__)
#define td_log_warn(mod, event, ...)  td_log_emit(TD_LOG_WARN, mod, event, __VA_ARGS__)
#define td_log_error(mod, event, ...) td_log_emit(TD_LOG_ERROR, mod, event, __VA_ARGS__)

#endif

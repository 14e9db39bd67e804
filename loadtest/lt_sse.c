/* lt_sse: OpenAI-style SSE completion stream parser (see lt_sse.h). */
#include "loadtest/lt_sse.h"

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void sse_error(lt_sse *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sse_error(lt_sse *s, const char *fmt, ...)
{
    if (s->err[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, sizeof(s->err), fmt, ap);
    va_end(ap);
}

static void sse_data(lt_sse *s, const char *p, size_t len)
{
    if (len == 6 && memcmp(p, "[DONE]", 6) == 0) {
        s->done_seen = 1;
        return;
    }
    cJSON *j = cJSON_ParseWithLength(p, len);
    if (!j) {
        /* p is not NUL-terminated: print at most len bytes of it */
        sse_error(s, "SSE data is not JSON: %.*s", (int)(len < 40 ? len : 40), p);
        return;
    }
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    if (e) {
        const cJSON *m = cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, "message") : e;
        sse_error(s, "error event: %.70s", cJSON_IsString(m) ? m->valuestring : "(no message)");
    }
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(j, "choices");
    const cJSON *ch0 = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    if (ch0) {
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(ch0, "text");
        if (!text) { /* chat completions stream deltas */
            const cJSON *d = cJSON_GetObjectItemCaseSensitive(ch0, "delta");
            text = d ? cJSON_GetObjectItemCaseSensitive(d, "content") : NULL;
        }
        if (cJSON_IsString(text) && text->valuestring[0] != '\0' && s->on_text) s->on_text(s->arg);
    }
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(j, "usage");
    const cJSON *ct =
        cJSON_IsObject(usage) ? cJSON_GetObjectItemCaseSensitive(usage, "completion_tokens") : NULL;
    if (cJSON_IsNumber(ct) && ct->valuedouble >= 0 && ct->valuedouble <= INT32_MAX)
        s->usage_tokens = (int32_t)ct->valuedouble;
    cJSON_Delete(j);
}

static void sse_line(lt_sse *s, const char *line, size_t len)
{
    if (len > 0 && line[len - 1] == '\r') len--;
    if (len >= 5 && memcmp(line, "data:", 5) == 0) {
        size_t off = (len > 5 && line[5] == ' ') ? 6 : 5;
        sse_data(s, line + off, len - off);
    }
    /* Blank lines end events; "event:", "id:", "retry:" and ":" comments carry
     * nothing the load test counts. */
}

void lt_sse_init(lt_sse *s, void (*on_text)(void *arg), void *arg)
{
    memset(s, 0, sizeof(*s));
    s->on_text = on_text;
    s->arg = arg;
    s->usage_tokens = -1;
}

void lt_sse_reset(lt_sse *s)
{
    s->done_seen = 0;
    s->usage_tokens = -1;
    s->err[0] = '\0';
    s->line_len = 0;
}

void lt_sse_feed(lt_sse *s, const char *p, size_t len)
{
    while (len > 0) {
        const char *nl = memchr(p, '\n', len);
        size_t take = nl ? (size_t)(nl - p) : len;
        if (s->line_len == 0 && nl) {
            sse_line(s, p, take); /* whole line in the buffer: no copy */
        } else {
            if (s->line_len + take + 1 > LT_SSE_MAX_LINE) {
                sse_error(s, "SSE line longer than %d bytes", LT_SSE_MAX_LINE);
                return;
            }
            if (s->line_len + take + 1 > s->line_cap) {
                size_t cap = (s->line_len + take + 1) * 2;
                char *nb = realloc(s->line, cap);
                if (!nb) {
                    sse_error(s, "out of memory");
                    return;
                }
                s->line = nb;
                s->line_cap = cap;
            }
            memcpy(s->line + s->line_len, p, take);
            s->line_len += take;
            if (nl) {
                sse_line(s, s->line, s->line_len);
                s->line_len = 0;
            }
        }
        if (!nl) return;
        p += take + 1;
        len -= take + 1;
    }
}

void lt_sse_end(lt_sse *s)
{
    if (s->line_len > 0) {
        sse_line(s, s->line, s->line_len); /* last line without a newline */
        s->line_len = 0;
    }
}

void lt_sse_free(lt_sse *s)
{
    if (!s) return;
    free(s->line);
    s->line = NULL;
    s->line_len = s->line_cap = 0;
}

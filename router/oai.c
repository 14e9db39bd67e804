/* oai: OpenAI request parsing and validation, chat rendering, response and
 * SSE texts (see oai.h). */
#include "router/oai.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/sbuf.h"

/* ------------------------------------------------------------------------ */
/* A growing string; the first allocation failure sticks in rc. */

/* ------------------------------------------------------------------------ */
/* UTF-8 */

/* Length of the well-formed UTF-8 sequence at s[0..n) (no overlongs, no
 * surrogates, at most U+10FFFF), or 0 when it is not one. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    if (n < len) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return len;
}

static bool utf8_valid(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq(u + i, n - i);
        if (l == 0) return false;
        i += l;
    }
    return true;
}

/* A JSON string literal for s[0..n); bytes that are not UTF-8 become U+FFFD
 * so the output is always valid JSON. */
static void sb_json_str(sbuf *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    sbuf_put(b, "\"", 1);
    size_t run = 0; /* start of bytes copied as they are */
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        const char *esc = NULL;
        char hex[8];
        size_t l = 1;
        if (c == '"') {
            esc = "\\\"";
        } else if (c == '\\') {
            esc = "\\\\";
        } else if (c < 0x20) {
            switch (c) {
            case '\n':
                esc = "\\n";
                break;
            case '\r':
                esc = "\\r";
                break;
            case '\t':
                esc = "\\t";
                break;
            case '\b':
                esc = "\\b";
                break;
            case '\f':
                esc = "\\f";
                break;
            default:
                snprintf(hex, sizeof(hex), "\\u%04x", c);
                esc = hex;
            }
        } else if (c >= 0x80) {
            l = utf8_seq(u + i, n - i);
            if (l == 0) {
                esc = "\\ufffd";
                l = 1;
            }
        }
        if (esc != NULL) {
            sbuf_put(b, s + run, i - run);
            sbuf_puts(b, esc);
            run = i + l;
        }
        i += l;
    }
    sbuf_put(b, s + run, n - run);
    sbuf_put(b, "\"", 1);
}

static void sb_json_cstr(sbuf *b, const char *s)
{
    if (s == NULL)
        sbuf_puts(b, "null");
    else
        sb_json_str(b, s, strlen(s));
}

/* ------------------------------------------------------------------------ */
/* Errors */

static const char *default_type(int status)
{
    switch (status) {
    case 401:
        return "authentication_error";
    case 429:
        return "rate_limit_error";
    default:
        return status >= 500 ? "server_error" : "invalid_request_error";
    }
}

static void error_vset(oai_error *e, int status, const char *type, const char *param,
                       const char *code, const char *fmt, va_list ap)
{
    e->status = status;
    e->type = type ? type : default_type(status);
    e->code = code;
    snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
}

void oai_error_set(oai_error *e, int status, const char *type, const char *param, const char *code,
                   const char *fmt, ...)
{
    if (e == NULL) return;
    va_list ap;
    va_start(ap, fmt);
    error_vset(e, status, type, param, code, fmt, ap);
    va_end(ap);
}

/* A 400 naming param. */
static int bad(oai_error *e, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int bad(oai_error *e, const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(e, 400, NULL, param, NULL, fmt, ap);
    va_end(ap);
    return TD_EINVAL;
}

static int unsupported(oai_error *e, const char *param, const char *what)
{
    return bad(e, param, "'%s' is not supported by this server: %s", param, what);
}

static int no_memory(oai_error *e)
{
    oai_error_set(e, 500, NULL, NULL, NULL, "the server ran out of memory");
    return TD_ENOMEM;
}

void oai_error_auth(oai_error *e)
{
    oai_error_set(e, 401, NULL, NULL, "invalid_api_key",
                  "Missing or incorrect API key: send it as 'Authorization: Bearer KEY'.");
}

void oai_error_model(oai_error *e, const char *model)
{
    oai_error_set(e, 404, NULL, "model", "model_not_found", "The model '%s' does not exist.",
                  model ? model : "");
}

void oai_error_path(oai_error *e, const char *method, const char *path)
{
    oai_error_set(e, 404, NULL, NULL, "unknown_url", "Unknown request URL: %s %s.",
                  method ? method : "", path ? path : "");
}

void oai_error_method(oai_error *e, const char *method, const char *path)
{
    oai_error_set(e, 405, NULL, NULL, "method_not_allowed", "Method %s is not allowed on %s.",
                  method ? method : "", path ? path : "");
}

void oai_error_too_large(oai_error *e, size_t limit)
{
    oai_error_set(e, 413, NULL, NULL, "request_too_large",
                  "The request body is larger than %zu bytes.", limit);
}

void oai_error_busy(oai_error *e, int retry_after_s)
{
    oai_error_set(e, 429, NULL, NULL, "rate_limit_exceeded",
                  "The server is busy; retry after %d s.", retry_after_s);
}

void oai_error_unavailable(oai_error *e)
{
    oai_error_set(e, 503, NULL, NULL, "service_unavailable",
                  "No worker is ready to serve this request; retry later.");
}

void oai_error_timeout(oai_error *e)
{
    oai_error_set(e, 504, NULL, NULL, "timeout", "The request did not finish before its deadline.");
}

static void put_error(sbuf *b, const oai_error *e)
{
    sbuf_puts(b, "{\"error\":{\"message\":");
    sb_json_cstr(b, e->message);
    sbuf_puts(b, ",\"type\":");
    sb_json_cstr(b, e->type ? e->type : default_type(e->status));
    sbuf_puts(b, ",\"param\":");
    sb_json_cstr(b, e->param[0] ? e->param : NULL);
    sbuf_puts(b, ",\"code\":");
    sb_json_cstr(b, e->code);
    sbuf_puts(b, "}}");
}

char *oai_error_json(const oai_error *e)
{
    if (e == NULL) return NULL;
    sbuf b = {0};
    put_error(&b, e);
    return sbuf_take(&b);
}

/* ------------------------------------------------------------------------ */
/* Request parsing */

static bool absent(const cJSON *v)
{
    return v == NULL || cJSON_IsNull(v);
}

static const cJSON *field(const cJSON *obj, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(obj, name);
}

/* An integer-valued JSON number in [lo, hi]. */
static int get_int(const cJSON *v, const char *param, double lo, double hi, int64_t *out,
                   oai_error *e)
{
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || floor(v->valuedouble) != v->valuedouble)
        return bad(e, param, "'%s' must be an integer", param);
    if (v->valuedouble < lo || v->valuedouble > hi)
        return bad(e, param, "'%s' must be between %.0f and %.0f; got %.0f", param, lo, hi,
                   v->valuedouble);
    *out = (int64_t)v->valuedouble;
    return 0;
}

static int get_bool(const cJSON *v, const char *param, bool *out, oai_error *e)
{
    if (absent(v)) return 0;
    if (!cJSON_IsBool(v)) return bad(e, param, "'%s' must be a boolean", param);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* A JSON string that is valid UTF-8 (cJSON does not check). */
static int check_str(const cJSON *v, const char *param, oai_error *e)
{
    if (!cJSON_IsString(v) || v->valuestring == NULL)
        return bad(e, param, "'%s' must be a string", param);
    if (!utf8_valid(v->valuestring, strlen(v->valuestring)))
        return bad(e, param, "'%s' is not valid UTF-8", param);
    return 0;
}

static int dup_str(const cJSON *v, const char *param, char **out, oai_error *e)
{
    int rc = check_str(v, param, e);
    if (rc < 0) return rc;
    *out = strdup(v->valuestring);
    return *out ? 0 : no_memory(e);
}

/* cJSON ends a string at an escaped NUL ("\u0000"): such a body would lose
 * the rest of the string without a word, so it is refused. */
static bool has_escaped_nul(const char *s, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++) {
        if (s[i] != '\\') continue;
        if (s[i + 1] == 'u' && i + 5 < n && !memcmp(s + i + 2, "0000", 4)) return true;
        i++; /* the escaped character */
    }
    return false;
}

static int parse_messages(const cJSON *v, oai_request *r, oai_error *e)
{
    if (absent(v)) return bad(e, "messages", "'messages' is required");
    if (!cJSON_IsArray(v)) return bad(e, "messages", "'messages' must be a list of messages");
    size_t n = (size_t)cJSON_GetArraySize(v);
    if (n == 0) return bad(e, "messages", "'messages' must not be empty");
    r->messages = calloc(n, sizeof(*r->messages));
    if (r->messages == NULL) return no_memory(e);
    char param[64];
    size_t i = 0;
    for (const cJSON *m = v->child; m != NULL; m = m->next, i++) {
        r->n_messages = i + 1;
        oai_message *out = &r->messages[i];
        snprintf(param, sizeof(param), "messages[%zu]", i);
        if (!cJSON_IsObject(m)) return bad(e, param, "'%s' must be an object", param);
        snprintf(param, sizeof(param), "messages[%zu].role", i);
        const cJSON *role = field(m, "role");
        if (absent(role)) return bad(e, param, "'%s' is required", param);
        int rc = check_str(role, param, e);
        if (rc < 0) return rc;
        const char *rs = role->valuestring;
        if (!strcmp(rs, "developer")) rs = "system"; /* OpenAI's newer name for it */
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") &&
            strcmp(rs, "tool"))
            return bad(e, param, "'%s' must be one of system, user, assistant, tool; got '%s'",
                       param, rs);
        if ((out->role = strdup(rs)) == NULL) return no_memory(e);

        snprintf(param, sizeof(param), "messages[%zu].content", i);
        const cJSON *c = field(m, "content");
        if (absent(c)) {
            /* An assistant turn that only called tools has no content. */
            if (strcmp(rs, "assistant")) return bad(e, param, "'%s' is required", param);
            out->content = strdup("");
        } else if (cJSON_IsString(c)) {
            if ((rc = dup_str(c, param, &out->content, e)) < 0) return rc;
        } else if (cJSON_IsArray(c)) {
            /* Text parts, joined by newlines. */
            sbuf b = {0};
            size_t j = 0;
            for (const cJSON *part = c->child; part != NULL; part = part->next, j++) {
                snprintf(param, sizeof(param), "messages[%zu].content[%zu]", i, j);
                const cJSON *type = cJSON_IsObject(part) ? field(part, "type") : NULL;
                if (!cJSON_IsString(type)) {
                    free(b.p);
                    return bad(e, param, "'%s' must be an object with a \"type\"", param);
                }
                if (strcmp(type->valuestring, "text")) {
                    free(b.p);
                    return bad(e, param,
                               "content parts of type '%.40s' are not supported: only "
                               "\"text\"",
                               type->valuestring);
                }
                const cJSON *text = field(part, "text");
                snprintf(param, sizeof(param), "messages[%zu].content[%zu].text", i, j);
                if ((rc = check_str(text, param, e)) < 0) {
                    free(b.p);
                    return rc;
                }
                if (j > 0) sbuf_put(&b, "\n", 1);
                sbuf_puts(&b, text->valuestring);
            }
            out->content = sbuf_take(&b);
        } else {
            return bad(e, param, "'%s' must be a string or a list of text parts", param);
        }
        if (out->content == NULL) return no_memory(e);
    }
    return 0;
}

static int parse_ids(const cJSON *v, oai_request *r, oai_error *e)
{
    size_t n = (size_t)cJSON_GetArraySize(v);
    if (n == 0) return bad(e, "prompt", "'prompt' must not be empty");
    r->prompt_ids = malloc(n * sizeof(*r->prompt_ids));
    if (r->prompt_ids == NULL) return no_memory(e);
    for (const cJSON *x = v->child; x != NULL; x = x->next) {
        int64_t id = 0;
        if (get_int(x, "prompt", 0, (double)INT32_MAX, &id, e) < 0)
            return bad(e, "prompt", "'prompt' token ids must be integers from 0 up");
        r->prompt_ids[r->n_prompt_ids++] = (int32_t)id;
    }
    return 0;
}

static int parse_prompt(const cJSON *v, oai_request *r, oai_error *e)
{
    if (absent(v)) return bad(e, "prompt", "'prompt' is required");
    if (cJSON_IsArray(v)) {
        const cJSON *first = v->child;
        if (first == NULL) return bad(e, "prompt", "'prompt' must not be empty");
        if (cJSON_IsNumber(first)) return parse_ids(v, r, e);
        if (cJSON_GetArraySize(v) > 1)
            return bad(e, "prompt",
                       "'prompt' holds %d prompts; this server takes one prompt per "
                       "request",
                       cJSON_GetArraySize(v));
        if (cJSON_IsArray(first)) return parse_ids(first, r, e);
        v = first;
    }
    if (!cJSON_IsString(v))
        return bad(e, "prompt",
                   "'prompt' must be a string, a list of one string or a list of "
                   "token ids");
    int rc = dup_str(v, "prompt", &r->prompt, e);
    if (rc < 0) return rc;
    r->prompt_len = strlen(r->prompt);
    if (r->prompt_len == 0) return bad(e, "prompt", "'prompt' must not be empty");
    return 0;
}

static int parse_stop(const cJSON *v, oai_request *r, oai_error *e)
{
    if (absent(v)) return 0;
    const cJSON *one = v;
    if (cJSON_IsArray(v)) {
        if (cJSON_GetArraySize(v) > OAI_MAX_STOPS)
            return bad(e, "stop", "'stop' takes at most %d strings", OAI_MAX_STOPS);
        one = v->child;
    } else if (!cJSON_IsString(v)) {
        return bad(e, "stop", "'stop' must be a string or a list of strings");
    }
    for (; one != NULL; one = cJSON_IsArray(v) ? one->next : NULL) {
        int rc = check_str(one, "stop", e);
        if (rc < 0) return rc;
        size_t l = strlen(one->valuestring);
        if (l == 0) return bad(e, "stop", "'stop' strings must not be empty");
        if (l > OAI_MAX_STOP_BYTES)
            return bad(e, "stop", "'stop' strings must be at most %d bytes", OAI_MAX_STOP_BYTES);
        if ((r->stop[r->n_stop] = strdup(one->valuestring)) == NULL) return no_memory(e);
        r->n_stop++;
    }
    return 0;
}

/* Known parameters this server does not implement: a 400 unless they hold
 * their "off" value. */
static int parse_unsupported(const cJSON *o, oai_error *e)
{
    const cJSON *v;
    int64_t i = 0;
    if (!absent(v = field(o, "n"))) {
        if (get_int(v, "n", 1, 1, &i, e) < 0)
            return bad(e, "n", "'n' must be 1: this server returns one choice per request");
    }
    if (!absent(v = field(o, "logprobs")) && !cJSON_IsFalse(v))
        return unsupported(e, "logprobs", "log probabilities are not returned");
    if (!absent(v = field(o, "top_logprobs")) && !(cJSON_IsNumber(v) && v->valuedouble == 0))
        return unsupported(e, "top_logprobs", "log probabilities are not returned");
    static const char *const lists[] = {"tools", "functions"};
    for (size_t k = 0; k < 2; k++)
        if (!absent(v = field(o, lists[k])) && !(cJSON_IsArray(v) && v->child == NULL))
            return unsupported(e, lists[k], "tool calling is not implemented");
    static const char *const choices[] = {"tool_choice", "function_call"};
    for (size_t k = 0; k < 2; k++)
        if (!absent(v = field(o, choices[k])) &&
            !(cJSON_IsString(v) &&
              (!strcmp(v->valuestring, "none") || !strcmp(v->valuestring, "auto"))))
            return unsupported(e, choices[k], "tool calling is not implemented");
    if (!absent(v = field(o, "logit_bias")) && !(cJSON_IsObject(v) && v->child == NULL))
        return unsupported(e, "logit_bias", "logits cannot be biased");
    if (!absent(v = field(o, "best_of"))) {
        if (get_int(v, "best_of", 1, 1e9, &i, e) < 0) return TD_EINVAL;
        if (i > 1) return unsupported(e, "best_of", "only best_of 1");
    }
    if (!absent(v = field(o, "echo"))) {
        if (!cJSON_IsBool(v)) return bad(e, "echo", "'echo' must be a boolean");
        if (cJSON_IsTrue(v)) return unsupported(e, "echo", "the prompt is not echoed");
    }
    if (!absent(v = field(o, "suffix")) && !(cJSON_IsString(v) && v->valuestring[0] == '\0'))
        return unsupported(e, "suffix", "insertion is not implemented");
    if (!absent(v = field(o, "response_format"))) {
        const cJSON *t = cJSON_IsObject(v) ? field(v, "type") : NULL;
        if (!(cJSON_IsString(t) && !strcmp(t->valuestring, "text")))
            return unsupported(e, "response_format", "only {\"type\": \"text\"}");
    }
    static const char *const penalties[] = {"presence_penalty", "frequency_penalty"};
    for (size_t k = 0; k < 2; k++) {
        if (absent(v = field(o, penalties[k]))) continue;
        if (!cJSON_IsNumber(v)) return bad(e, penalties[k], "'%s' must be a number", penalties[k]);
        if (v->valuedouble != 0) return unsupported(e, penalties[k], "only 0");
    }
    return 0;
}

static int parse_sampling(const cJSON *o, oai_request *r, oai_error *e)
{
    const cJSON *v;
    int64_t i = 0;
    int rc;
    if (!absent(v = field(o, "temperature"))) {
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
            return bad(e, "temperature", "'temperature' must be a number");
        if (v->valuedouble < 0 || v->valuedouble > 2)
            return bad(e, "temperature", "'temperature' must be between 0 and 2");
        r->temperature = (float)v->valuedouble;
    }
    if (!absent(v = field(o, "top_p"))) {
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
            return bad(e, "top_p", "'top_p' must be a number");
        if (!(v->valuedouble > 0 && v->valuedouble <= 1))
            return bad(e, "top_p", "'top_p' must be in (0, 1]");
        r->top_p = (float)v->valuedouble;
    }
    if (!absent(v = field(o, "top_k"))) {
        if ((rc = get_int(v, "top_k", -1, (double)INT32_MAX, &i, e)) < 0)
            return bad(e, "top_k", "'top_k' must be -1 or 0 (off) or a positive integer");
        r->top_k = i < 0 ? 0 : (int)i;
    }
    if (!absent(v = field(o, "seed"))) {
        double d = v->valuedouble;
        if (!cJSON_IsNumber(v) || !isfinite(d) || floor(d) != d)
            return bad(e, "seed", "'seed' must be an integer");
        if (d < -9223372036854775808.0 || d >= 18446744073709551616.0)
            return bad(e, "seed", "'seed' must fit in 64 bits");
        /* A negative seed is taken modulo 2^64. */
        r->seed = d >= 0 ? (uint64_t)d : (uint64_t)(int64_t)d;
        r->has_seed = true;
    }
    /* max_completion_tokens is the newer name; it wins when both are sent. */
    static const char *const max_names[] = {"max_tokens", "max_completion_tokens"};
    for (size_t k = 0; k < 2; k++) {
        if (absent(v = field(o, max_names[k]))) continue;
        if ((rc = get_int(v, max_names[k], 1, OAI_MAX_TOKENS_LIMIT, &i, e)) < 0) return rc;
        r->max_tokens = (int)i;
    }
    if (!absent(v = field(o, "min_tokens"))) {
        if ((rc = get_int(v, "min_tokens", 0, OAI_MAX_TOKENS_LIMIT, &i, e)) < 0) return rc;
        if (r->max_tokens > 0 && i > r->max_tokens)
            return bad(e, "min_tokens", "'min_tokens' (%d) must not exceed max_tokens (%d)", (int)i,
                       r->max_tokens);
        r->min_tokens = (int)i;
    }
    if ((rc = get_bool(field(o, "ignore_eos"), "ignore_eos", &r->ignore_eos, e)) < 0) return rc;
    return parse_stop(field(o, "stop"), r, e);
}

static int parse_object(enum oai_kind kind, const cJSON *o, oai_request *r, oai_error *e)
{
    const cJSON *v;
    int rc;
    if (absent(v = field(o, "model"))) return bad(e, "model", "'model' is required");
    if ((rc = dup_str(v, "model", &r->model, e)) < 0) return rc;
    if (r->model[0] == '\0') return bad(e, "model", "'model' must not be empty");
    if ((rc = parse_unsupported(o, e)) < 0) return rc;
    if (kind == OAI_CHAT)
        rc = parse_messages(field(o, "messages"), r, e);
    else
        rc = parse_prompt(field(o, "prompt"), r, e);
    if (rc < 0) return rc;
    if ((rc = get_bool(field(o, "stream"), "stream", &r->stream, e)) < 0) return rc;
    if (!absent(v = field(o, "stream_options"))) {
        if (!cJSON_IsObject(v))
            return bad(e, "stream_options", "'stream_options' must be an object");
        rc = get_bool(field(v, "include_usage"), "stream_options.include_usage", &r->include_usage,
                      e);
        if (rc < 0) return rc;
    }
    if ((rc = parse_sampling(o, r, e)) < 0) return rc;
    if (!absent(v = field(o, "user")) && (rc = dup_str(v, "user", &r->user, e)) < 0) return rc;
    /* OpenAI's legacy completions default, as vLLM keeps it. */
    if (kind == OAI_COMPLETIONS && r->max_tokens == 0)
        r->max_tokens = r->min_tokens > OAI_COMPLETIONS_DEFAULT_MAX_TOKENS
                            ? r->min_tokens
                            : OAI_COMPLETIONS_DEFAULT_MAX_TOKENS;
    if (!absent(v = field(o, "tandem"))) {
        if (!cJSON_IsObject(v)) return bad(e, "tandem", "'tandem' must be an object");
        if ((rc = get_bool(field(v, "timings"), "tandem.timings", &r->want_timings, e)) < 0)
            return rc;
    }
    return 0;
}

void oai_request_free(oai_request *r)
{
    if (r == NULL) return;
    free(r->model);
    free(r->prompt);
    free(r->prompt_ids);
    for (size_t i = 0; i < r->n_messages; i++) {
        free(r->messages[i].role);
        free(r->messages[i].content);
    }
    free(r->messages);
    for (size_t i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->user);
    memset(r, 0, sizeof(*r));
}

int oai_parse(enum oai_kind kind, const char *body, size_t len, oai_request *out, oai_error *err)
{
    if (out == NULL || err == NULL) return TD_EINVAL;
    memset(out, 0, sizeof(*out));
    memset(err, 0, sizeof(*err));
    if (body == NULL) len = 0;
    out->kind = kind;
    out->temperature = 1.0f;
    out->top_p = 1.0f;
    if (len == 0) return bad(err, NULL, "The request body is empty; send a JSON object.");
    if (has_escaped_nul(body, len))
        return bad(err, NULL, "Strings in the request must not contain NUL characters (\\u0000).");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (root == NULL) {
        size_t at = end && end >= body && end <= body + len ? (size_t)(end - body) : 0;
        return bad(err, NULL, "The request body is not valid JSON (near byte %zu).", at);
    }
    /* Only white space may follow the value. */
    for (const char *p = end; p != NULL && p < body + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\r' && *p != '\n' && *p != '\0') {
            cJSON_Delete(root);
            return bad(err, NULL, "The request body is not valid JSON (data after the object).");
        }
    }
    int rc;
    if (!cJSON_IsObject(root))
        rc = bad(err, NULL, "The request body must be a JSON object.");
    else
        rc = parse_object(kind, root, out, err);
    cJSON_Delete(root);
    if (rc < 0) {
        oai_request_free(out);
        out->kind = kind;
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Chat templates */

enum { K_FAMILY, K_BEGIN, K_SYSTEM, K_USER, K_ASSISTANT, K_TOOL, K_MESSAGE, K_GENERATION, K_COUNT };
static const char *const key_names[K_COUNT] = {"family",    "begin", "system",  "user",
                                               "assistant", "tool",  "message", "generation"};

typedef struct tpl {
    const char *val[K_COUNT]; /* into the template's text, not NUL-terminated; NULL: absent */
    size_t len[K_COUNT];
    enum tok_chat_family family;
} tpl;

static bool is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r';
}

static int tpl_parse(const char *text, tpl *t, char *errbuf, size_t errlen)
{
    memset(t, 0, sizeof(*t));
    if (text == NULL) return td_err_fail(errbuf, errlen, TD_EFORMAT, "no template text");
    int line = 0;
    for (const char *p = text; *p;) {
        const char *eol = strchr(p, '\n');
        if (eol == NULL) eol = p + strlen(p);
        line++;
        const char *s = p, *e = eol;
        p = *eol ? eol + 1 : eol;
        while (e > s && e[-1] == '\r')
            e--;
        const char *q = s;
        while (q < e && is_blank(*q))
            q++;
        if (q == e || *q == '#') continue;
        const char *colon = memchr(q, ':', (size_t)(e - q));
        if (colon == NULL)
            return td_err_fail(errbuf, errlen, TD_EFORMAT, "line %d: expected 'key: value'", line);
        const char *ke = colon;
        while (ke > q && is_blank(ke[-1]))
            ke--;
        int k = 0;
        while (k < K_COUNT && !((size_t)(ke - q) == strlen(key_names[k]) &&
                                !memcmp(q, key_names[k], (size_t)(ke - q))))
            k++;
        if (k == K_COUNT)
            return td_err_fail(errbuf, errlen, TD_EFORMAT, "line %d: unknown key '%.*s'", line,
                               (int)(ke - q), q);
        if (t->val[k] != NULL)
            return td_err_fail(errbuf, errlen, TD_EFORMAT, "line %d: '%s' given twice", line,
                               key_names[k]);
        const char *v = colon + 1;
        if (v < e && *v == ' ') v++;
        for (const char *c = v; c < e; c++) {
            if (*c != '\\') continue;
            if (c + 1 >= e || (c[1] != 'n' && c[1] != 't' && c[1] != '\\'))
                return td_err_fail(errbuf, errlen, TD_EFORMAT,
                                   "line %d: unknown escape (use \\n, \\t or \\\\)", line);
            c++;
        }
        t->val[k] = v;
        t->len[k] = (size_t)(e - v);
    }
    if (t->val[K_FAMILY] != NULL) {
        for (int k = 1; k < K_COUNT; k++)
            if (t->val[k] != NULL)
                return td_err_fail(errbuf, errlen, TD_EFORMAT,
                                   "'family' stands alone; '%s' cannot be given with it",
                                   key_names[k]);
        const char *f = t->val[K_FAMILY];
        size_t n = t->len[K_FAMILY];
        while (n > 0 && is_blank(f[n - 1]))
            n--;
        if (n == 6 && !memcmp(f, "llama3", 6))
            t->family = TOK_CHAT_LLAMA3;
        else if (n == 6 && !memcmp(f, "llama2", 6))
            t->family = TOK_CHAT_LLAMA2;
        else if (n == 6 && !memcmp(f, "chatml", 6))
            t->family = TOK_CHAT_CHATML;
        else
            return td_err_fail(errbuf, errlen, TD_EFORMAT,
                               "unknown family '%.*s' (llama3, llama2 or chatml)", (int)n, f);
        return 0;
    }
    bool any = false;
    for (int k = K_SYSTEM; k <= K_MESSAGE; k++)
        any |= t->val[k] != NULL;
    if (!any)
        return td_err_fail(errbuf, errlen, TD_EFORMAT,
                           "no message text: give 'family' or at least one of system, user, "
                           "assistant, tool, message");
    return 0;
}

int oai_chat_template_check(const char *text, char *errbuf, size_t errlen)
{
    tpl t;
    return tpl_parse(text, &t, errbuf, errlen);
}

static void put_special(sbuf *b, const tok_tokenizer *tok, int32_t id)
{
    const char *p;
    size_t n;
    if (id >= 0 && tok_piece(tok, id, &p, &n) == 0) sbuf_put(b, p, n);
}

/* strlen(ph) when v[0..n) starts with ph, else 0. */
static size_t placeholder(const char *v, size_t n, const char *ph)
{
    size_t l = strlen(ph);
    return n >= l && !memcmp(v, ph, l) ? l : 0;
}

/* Appends one template value with escapes and placeholders expanded. */
static void tpl_expand(sbuf *b, const tok_tokenizer *tok, const char *v, size_t n, const char *role,
                       const char *content)
{
    for (size_t i = 0; i < n; i++) {
        if (v[i] == '\\' && i + 1 < n) {
            char c = v[++i];
            sbuf_put(b, c == 'n' ? "\n" : c == 't' ? "\t" : "\\", 1);
            continue;
        }
        size_t l = 0;
        if (v[i] == '{') {
            if ((l = placeholder(v + i, n - i, "{content}")) > 0)
                sbuf_puts(b, content ? content : "");
            else if ((l = placeholder(v + i, n - i, "{role}")) > 0)
                sbuf_puts(b, role ? role : "");
            else if ((l = placeholder(v + i, n - i, "{bos}")) > 0)
                put_special(b, tok, tok_bos_id(tok));
            else if ((l = placeholder(v + i, n - i, "{eos}")) > 0)
                put_special(b, tok, tok_eos_id(tok));
        }
        if (l > 0) {
            i += l - 1;
            continue;
        }
        sbuf_put(b, v + i, 1);
    }
}

static int render_own(const tok_tokenizer *tok, const tpl *t, const oai_request *r, char **out,
                      oai_error *e)
{
    sbuf b = {0};
    if (t->val[K_BEGIN]) tpl_expand(&b, tok, t->val[K_BEGIN], t->len[K_BEGIN], NULL, NULL);
    for (size_t i = 0; i < r->n_messages; i++) {
        const oai_message *m = &r->messages[i];
        int k = K_SYSTEM;
        while (k <= K_TOOL && strcmp(key_names[k], m->role))
            k++;
        if (k > K_TOOL || t->val[k] == NULL) k = K_MESSAGE;
        if (t->val[k] == NULL) {
            free(b.p);
            char param[64];
            snprintf(param, sizeof(param), "messages[%zu].role", i);
            return bad(e, param, "The chat template has no text for role '%s'.", m->role);
        }
        tpl_expand(&b, tok, t->val[k], t->len[k], m->role, m->content);
    }
    if (t->val[K_GENERATION])
        tpl_expand(&b, tok, t->val[K_GENERATION], t->len[K_GENERATION], NULL, NULL);
    if ((*out = sbuf_take(&b)) == NULL) return no_memory(e);
    return 0;
}

int oai_render_chat(const tok_tokenizer *tok, const char *template_override, const oai_request *r,
                    char **prompt_text, oai_error *err)
{
    if (tok == NULL || r == NULL || prompt_text == NULL || err == NULL) return TD_EINVAL;
    *prompt_text = NULL;
    if (r->kind != OAI_CHAT || r->n_messages == 0)
        return bad(err, "messages", "'messages' is required");
    enum tok_chat_family family = tok_chat_family_of(tok);
    if (template_override != NULL) {
        tpl t;
        char why[160];
        if (tpl_parse(template_override, &t, why, sizeof(why)) < 0) {
            oai_error_set(err, 500, NULL, NULL, NULL, "The router's chat template is malformed: %s",
                          why);
            return TD_EINVAL;
        }
        if (t.val[K_FAMILY] == NULL) return render_own(tok, &t, r, prompt_text, err);
        family = t.family;
    }
    if (family == TOK_CHAT_NONE) {
        bad(err, "messages",
            "this model has no chat template; start the router with --chat-template");
        return TD_EUNSUPPORTED;
    }
    tok_chat_msg *msgs = calloc(r->n_messages, sizeof(*msgs));
    if (msgs == NULL) return no_memory(err);
    for (size_t i = 0; i < r->n_messages; i++) {
        if (!strcmp(r->messages[i].role, "tool")) {
            free(msgs);
            char param[64];
            snprintf(param, sizeof(param), "messages[%zu].role", i);
            return bad(err, param, "This model's chat template has no 'tool' role.");
        }
        msgs[i].role = r->messages[i].role;
        msgs[i].content = r->messages[i].content;
    }
    int rc = tok_chat_render_as(tok, family, msgs, r->n_messages, 1, prompt_text);
    free(msgs);
    if (rc == TD_ENOMEM) return no_memory(err);
    if (rc < 0)
        return bad(err, "messages",
                   family == TOK_CHAT_LLAMA2
                       ? "This model's chat template needs user and assistant turns alternating, "
                         "starting with user (after one optional system message)."
                       : "This model's chat template does not accept these messages.");
    return 0;
}

int oai_prompt_tokens(const tok_tokenizer *tok, const char *template_override, const oai_request *r,
                      int32_t **ids, size_t *n_ids, oai_error *err)
{
    if (tok == NULL || r == NULL || ids == NULL || n_ids == NULL || err == NULL) return TD_EINVAL;
    *ids = NULL;
    *n_ids = 0;
    int rc;
    if (r->kind == OAI_CHAT) {
        char *text = NULL;
        if ((rc = oai_render_chat(tok, template_override, r, &text, err)) < 0) return rc;
        rc = tok_encode(tok, text, strlen(text), TOK_PARSE_SPECIAL, ids, n_ids);
        free(text);
    } else if (r->prompt_ids != NULL) {
        *ids = malloc(r->n_prompt_ids * sizeof(**ids));
        if (*ids == NULL) return no_memory(err);
        memcpy(*ids, r->prompt_ids, r->n_prompt_ids * sizeof(**ids));
        *n_ids = r->n_prompt_ids;
        return 0;
    } else if (r->prompt != NULL) {
        int flags = TOK_PARSE_SPECIAL | (tok_adds_bos(tok) ? TOK_ADD_BOS : 0);
        rc = tok_encode(tok, r->prompt, r->prompt_len, flags, ids, n_ids);
    } else {
        return bad(err, "prompt", "'prompt' is required");
    }
    if (rc == 0) return 0;
    const char *param = r->kind == OAI_CHAT ? "messages" : "prompt";
    if (rc == TD_ENOMEM) return no_memory(err);
    if (rc == TD_ETOOLONG) return bad(err, param, "The prompt is too long.");
    oai_error_set(err, 500, NULL, NULL, NULL, "Tokenizing the prompt failed: %s.", td_strerror(rc));
    return rc;
}

int oai_check_limits(const oai_request *r, const int32_t *ids, size_t n_prompt_tokens,
                     int vocab_size, int context_len, oai_error *err)
{
    if (r == NULL || err == NULL || (ids == NULL && n_prompt_tokens > 0)) return TD_EINVAL;
    const char *param = r->kind == OAI_CHAT ? "messages" : "prompt";
    if (n_prompt_tokens == 0) return bad(err, param, "The prompt is empty.");
    if (vocab_size > 0)
        for (size_t i = 0; i < n_prompt_tokens; i++)
            if (ids[i] < 0 || ids[i] >= vocab_size)
                return bad(err, param, "Token id %" PRId32 " is outside the vocabulary (0..%d).",
                           ids[i], vocab_size - 1);
    if (context_len <= 0) return 0;
    if (n_prompt_tokens >= (size_t)context_len) {
        oai_error_set(err, 400, NULL, param, "context_length_exceeded",
                      "This model's maximum context length is %d tokens; the prompt has %zu "
                      "tokens.",
                      context_len, n_prompt_tokens);
        return TD_EINVAL;
    }
    if (r->max_tokens > 0 && n_prompt_tokens + (size_t)r->max_tokens > (size_t)context_len) {
        oai_error_set(err, 400, NULL, "max_tokens", "context_length_exceeded",
                      "This model's maximum context length is %d tokens; you asked for %zu "
                      "(%zu in the prompt, %d in the completion). Lower max_tokens.",
                      context_len, n_prompt_tokens + (size_t)r->max_tokens, n_prompt_tokens,
                      r->max_tokens);
        return TD_EINVAL;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Responses */

const char *oai_finish_name(enum oai_finish f)
{
    switch (f) {
    case OAI_FINISH_STOP:
        return "stop";
    case OAI_FINISH_LENGTH:
        return "length";
    default:
        return NULL;
    }
}

void oai_make_id(enum oai_kind kind, const char *request_id, char *out, size_t cap)
{
    if (out == NULL || cap == 0) return;
    snprintf(out, cap, "%s%s", kind == OAI_CHAT ? "chatcmpl-" : "cmpl-",
             request_id ? request_id : "");
}

/* {"id":..,"object":..,"created":..,"model":.., */
static void put_head(sbuf *b, const oai_meta *m, const char *object)
{
    sbuf_puts(b, "{\"id\":");
    sb_json_cstr(b, m->id ? m->id : "");
    sbuf_puts(b, ",\"object\":\"");
    sbuf_puts(b, object);
    sbuf_printf(b, "\",\"created\":%" PRId64 ",\"model\":", m->created);
    sb_json_cstr(b, m->model ? m->model : "");
}

static void put_finish(sbuf *b, enum oai_finish f)
{
    sbuf_puts(b, ",\"finish_reason\":");
    const char *name = oai_finish_name(f);
    sbuf_puts(b, name ? (f == OAI_FINISH_STOP ? "\"stop\"" : "\"length\"") : "null");
}

static void put_usage(sbuf *b, const oai_usage *u)
{
    oai_usage zero = {0};
    if (u == NULL) u = &zero;
    sbuf_printf(b, ",\"usage\":{\"prompt_tokens\":%" PRIu64 ",\"completion_tokens\":%" PRIu64,
                u->prompt_tokens, u->completion_tokens);
    sbuf_printf(b, ",\"total_tokens\":%" PRIu64 "}", u->prompt_tokens + u->completion_tokens);
}

static void put_timings(sbuf *b, const oai_timings *t)
{
    if (t == NULL) return;
    sbuf_printf(b, ",\"tandem\":{\"timings\":{\"queue_us\":%" PRIu64 ",\"tokenize_us\":%" PRIu64,
                t->queue_us, t->tokenize_us);
    sbuf_printf(b, ",\"prefill_queue_us\":%" PRIu64 ",\"prefill_us\":%" PRIu64, t->prefill_queue_us,
                t->prefill_us);
    sbuf_printf(b, ",\"transfer_us\":%" PRIu64 ",\"first_token_us\":%" PRIu64, t->transfer_us,
                t->first_token_us);
    sbuf_printf(b, ",\"decode_us\":%" PRIu64 ",\"e2e_us\":%" PRIu64 "}}", t->decode_us, t->e2e_us);
}

static char *unary_json(const oai_meta *m, bool chat, const char *text, size_t len,
                        enum oai_finish finish, const oai_usage *usage, const oai_timings *timings)
{
    if (m == NULL || (text == NULL && len > 0)) return NULL;
    sbuf b = {0};
    put_head(&b, m, chat ? "chat.completion" : "text_completion");
    sbuf_puts(&b, ",\"choices\":[{\"index\":0,");
    if (chat) {
        sbuf_puts(&b, "\"message\":{\"role\":\"assistant\",\"content\":");
        sb_json_str(&b, text ? text : "", len);
        sbuf_puts(&b, "}");
    } else {
        sbuf_puts(&b, "\"text\":");
        sb_json_str(&b, text ? text : "", len);
    }
    sbuf_puts(&b, ",\"logprobs\":null");
    put_finish(&b, finish == OAI_FINISH_NONE ? OAI_FINISH_STOP : finish);
    sbuf_puts(&b, "}]");
    put_usage(&b, usage);
    put_timings(&b, timings);
    sbuf_puts(&b, "}");
    return sbuf_take(&b);
}

char *oai_completion_json(const oai_meta *m, const char *text, size_t len, enum oai_finish finish,
                          const oai_usage *usage, const oai_timings *timings)
{
    return unary_json(m, false, text, len, finish, usage, timings);
}

char *oai_chat_json(const oai_meta *m, const char *text, size_t len, enum oai_finish finish,
                    const oai_usage *usage, const oai_timings *timings)
{
    return unary_json(m, true, text, len, finish, usage, timings);
}

char *oai_chunk_json(const oai_meta *m, const char *text, size_t len, bool first,
                     enum oai_finish finish, const oai_timings *timings)
{
    if (m == NULL || (text == NULL && len > 0)) return NULL;
    bool chat = m->kind == OAI_CHAT;
    sbuf b = {0};
    put_head(&b, m, chat ? "chat.completion.chunk" : "text_completion");
    sbuf_puts(&b, ",\"choices\":[{\"index\":0,");
    if (chat) {
        sbuf_puts(&b, "\"delta\":{");
        if (first) sbuf_puts(&b, "\"role\":\"assistant\"");
        if (first || len > 0) {
            if (first) sbuf_puts(&b, ",");
            sbuf_puts(&b, "\"content\":");
            sb_json_str(&b, text ? text : "", len);
        }
        sbuf_puts(&b, "}");
    } else {
        sbuf_puts(&b, "\"text\":");
        sb_json_str(&b, text ? text : "", len);
    }
    sbuf_puts(&b, ",\"logprobs\":null");
    put_finish(&b, finish);
    sbuf_puts(&b, "}]");
    if (m->include_usage) sbuf_puts(&b, ",\"usage\":null");
    put_timings(&b, timings);
    sbuf_puts(&b, "}");
    return sbuf_take(&b);
}

char *oai_usage_chunk_json(const oai_meta *m, const oai_usage *usage, const oai_timings *timings)
{
    if (m == NULL) return NULL;
    sbuf b = {0};
    put_head(&b, m, m->kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion");
    sbuf_puts(&b, ",\"choices\":[]");
    put_usage(&b, usage);
    put_timings(&b, timings);
    sbuf_puts(&b, "}");
    return sbuf_take(&b);
}

char *oai_sse_frame(const char *json)
{
    if (json == NULL) return NULL;
    sbuf b = {0};
    sbuf_puts(&b, "data: ");
    sbuf_puts(&b, json);
    sbuf_puts(&b, "\n\n");
    return sbuf_take(&b);
}

char *oai_sse_error(const oai_error *e)
{
    if (e == NULL) return NULL;
    sbuf b = {0};
    sbuf_puts(&b, "data: ");
    put_error(&b, e);
    sbuf_puts(&b, "\n\n" OAI_SSE_DONE);
    return sbuf_take(&b);
}

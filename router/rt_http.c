/* The router's HTTP front end: the OpenAI-compatible API on common/httpd, on
 * the loop thread. Parsing and the JSON shapes are router/oai; this file
 * routes, authenticates, tokenizes, and relays a request's tokens as text
 * (one response, or SSE chunks) with backpressure. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/httpd.h"
#include "common/log.h"
#include "router/oai.h"
#include "router/oai_text.h"
#include "router/rt_http.h"

#define MOD "router"

typedef struct rt_http {
    rt_ctx *c;
    httpd *srv;
    char **keys; /* accepted API keys */
    size_t n_keys;
    char *chat_template; /* --chat-template's text, or NULL */
    int32_t skip_ids[4];
    size_t n_skip;
} rt_http;

/* A completion's state at the HTTP front end. */
typedef struct rt_hreq {
    rt_http *h;
    httpd_req *hr;
    const char *endpoint; /* metrics label */
    oai_request q;
    oai_meta meta;
    char oai_id[96];
    oai_text *text;
    bool streaming; /* the SSE response has started */
    bool first;     /* next chunk is the first */
    bool client_gone;
    rt_req *r;
} rt_hreq;

static const char JSON[] = "application/json";

/* ------------------------------------------------------------ helpers -- */

static void rt__respond_error(httpd_req *hr, const oai_error *e, int retry_after_s)
{
    char *body = oai_error_json(e);
    char extra[64] = "";
    if (e->status == 429 && retry_after_s > 0)
        snprintf(extra, sizeof(extra), "Retry-After: %d\r\n", retry_after_s);
    if (e->status == 401) snprintf(extra, sizeof(extra), "WWW-Authenticate: Bearer\r\n");
    httpd_respond(hr, e->status, JSON, extra[0] ? extra : NULL, body ? body : "{}",
                  body ? strlen(body) : 2);
    free(body);
}

/* Constant time in the length of the candidate key. */
static bool rt__key_equal(const char *a, size_t la, const char *b)
{
    size_t lb = strlen(b);
    unsigned char d = (unsigned char)(la != lb);
    for (size_t i = 0; i < la; i++)
        d |= (unsigned char)(a[i] ^ (i < lb ? b[i] : 0));
    return d == 0;
}

static bool rt__authorized(const rt_http *h, httpd_req *hr)
{
    if (h->n_keys == 0) return true;
    const char *auth = httpd_req_header(hr, "Authorization");
    if (!auth || strncasecmp(auth, "Bearer ", 7) != 0) return false;
    const char *key = auth + 7;
    size_t len = strlen(key);
    bool ok = false;
    for (size_t i = 0; i < h->n_keys; i++) /* no early exit: every key is compared */
        ok |= rt__key_equal(key, len, h->keys[i]);
    return ok;
}

static int rt__status_of(int err)
{
    switch (err) {
    case TD_EINVAL:
    case TD_ETOOLONG:
    case TD_ERANGE:
    case TD_EFORMAT:
        return 400;
    case TD_ENOENT:
        return 404;
    case TD_EDECLINED:
    case TD_EAGAIN:
        return 429;
    case TD_EUNAVAILABLE:
    case TD_ECONNREFUSED:
    case TD_ECONNRESET:
    case TD_EMISMATCH:
        return 503;
    case TD_ETIMEDOUT:
        return 504;
    default:
        return 500;
    }
}

static void rt__error_of(oai_error *e, int err, const char *details, uint32_t retry_after_s)
{
    int status = rt__status_of(err);
    switch (status) {
    case 400:
        oai_error_set(e, 400, "invalid_request_error", NULL,
                      err == TD_ETOOLONG ? "context_length_exceeded" : NULL, "%s", details);
        break;
    case 429:
        oai_error_busy(e, (int)retry_after_s);
        break;
    case 503:
        oai_error_set(e, 503, "service_unavailable", NULL, NULL, "%s", details);
        break;
    case 504:
        oai_error_timeout(e);
        break;
    default:
        oai_error_set(e, status, "server_error", NULL, NULL, "%s", details);
        break;
    }
}

static void rt__timings(const rt_req *r, oai_timings *t)
{
    memset(t, 0, sizeof(*t));
    t->queue_us = (uint64_t)(r->t_dispatch - r->t_arrival) / 1000;
    t->tokenize_us = r->tokenize_us;
    t->prefill_queue_us = r->timings.prefill_queue_us;
    t->prefill_us = r->timings.prefill_us;
    t->transfer_us = r->timings.transfer_us;
    t->first_token_us = r->t_first ? (uint64_t)(r->t_first - r->t_arrival) / 1000 : 0;
    t->decode_us = r->timings.decode_us;
    t->e2e_us = (uint64_t)(td_now_ns() - r->t_arrival) / 1000;
}

/* ------------------------------------------------------ the front end -- */

static void rt__hreq_free(rt_hreq *x)
{
    oai_text_free(x->text);
    oai_request_free(&x->q);
    free(x);
}

/* Writes one SSE data frame; false when the client is gone. */
static bool rt__sse(rt_hreq *x, char *json)
{
    if (!json) return false;
    char *frame = oai_sse_frame(json);
    free(json);
    if (!frame) return false;
    int rc = httpd_stream_write(x->hr, frame, strlen(frame));
    free(frame);
    if (rc == TD_EAGAIN && x->r) x->r->paused = true; /* resumed by the drain callback */
    return rc == 0 || rc == TD_EAGAIN;
}

static void rt__start_stream(rt_hreq *x)
{
    if (x->streaming) return;
    x->streaming = true;
    x->first = true;
    httpd_stream_start(x->hr, 200, "text/event-stream", "Cache-Control: no-cache\r\n");
}

static void rt__h_tokens(rt_req *r, const uint32_t *ids, size_t n)
{
    rt_hreq *x = r->front_data;
    for (size_t i = 0; i < n; i++) {
        const char *piece = NULL;
        size_t len = 0;
        bool stopped = false;
        if (oai_text_push(x->text, (int32_t)ids[i], &piece, &len, &stopped) != 0) continue;
        if (x->q.stream && len > 0) {
            rt__start_stream(x);
            rt__sse(x, oai_chunk_json(&x->meta, piece, len, x->first, OAI_FINISH_NONE, NULL));
            x->first = false;
        }
        if (stopped) {
            /* A stop string: the text before it is out; end here. */
            rt_req_finish_early(r, TANDEM__V1__FINISH_REASON__FINISH_REASON_STOP_STRING);
            return;
        }
    }
}

static void rt__h_end(rt_req *r, int finish, int err, const char *details)
{
    rt_hreq *x = r->front_data;
    rt_ctx *c = x->h->c;
    if (err == 0 && !x->client_gone) {
        const char *tail = NULL;
        size_t tail_len = 0;
        oai_text_finish(x->text, &tail, &tail_len);
        enum oai_finish f = finish == TANDEM__V1__FINISH_REASON__FINISH_REASON_LENGTH
                                ? OAI_FINISH_LENGTH
                                : OAI_FINISH_STOP;
        oai_usage u = {.prompt_tokens = r->n_prompt, .completion_tokens = r->n_generated};
        oai_timings t;
        rt__timings(r, &t);
        const oai_timings *tp = x->q.want_timings ? &t : NULL;
        if (x->q.stream) {
            rt__start_stream(x);
            rt__sse(x, oai_chunk_json(&x->meta, tail ? tail : "", tail_len, x->first, f,
                                      x->q.include_usage ? NULL : tp));
            if (x->q.include_usage) rt__sse(x, oai_usage_chunk_json(&x->meta, &u, tp));
            httpd_stream_write(x->hr, OAI_SSE_DONE, strlen(OAI_SSE_DONE));
            httpd_stream_end(x->hr);
        } else {
            size_t len = 0;
            const char *all = oai_text_all(x->text, &len);
            char *body = x->q.kind == OAI_CHAT ? oai_chat_json(&x->meta, all, len, f, &u, tp)
                                               : oai_completion_json(&x->meta, all, len, f, &u, tp);
            if (body)
                httpd_respond(x->hr, 200, JSON, NULL, body, strlen(body));
            else
                httpd_respond(x->hr, 500, JSON, NULL, "{}", 2);
            free(body);
        }
        rt_metrics_outcome(c, x->endpoint, "ok");
    } else {
        oai_error e;
        rt__error_of(&e, err ? err : TD_ECANCELED, details ? details : "cancelled",
                     r->retry_after_s);
        if (x->client_gone) {
            /* Nobody to tell: end the response quietly. */
            if (x->streaming)
                httpd_stream_end(x->hr);
            else
                httpd_respond(x->hr, 499, JSON, NULL, "{}", 2);
        } else if (x->streaming) {
            /* After the first token: an error event, then [DONE]. */
            char *ev = oai_sse_error(&e);
            if (ev) httpd_stream_write(x->hr, ev, strlen(ev));
            free(ev);
            httpd_stream_write(x->hr, OAI_SSE_DONE, strlen(OAI_SSE_DONE));
            httpd_stream_end(x->hr);
        } else {
            rt__respond_error(x->hr, &e, (int)r->retry_after_s);
        }
        rt_metrics_outcome(c, x->endpoint, x->client_gone ? "client_gone" : td_err_name(err));
    }
    rt__hreq_free(x);
    rt_req_release(r);
}

static const rt_front_ops rt__http_front = {.tokens = rt__h_tokens, .end = rt__h_end};

static void rt__on_client_close(void *arg, httpd_req *hr)
{
    (void)hr;
    rt_hreq *x = arg;
    x->client_gone = true;
    if (x->r) rt_req_cancel(x->r); /* downstream at once: the workers free the blocks */
}

static void rt__on_drain(void *arg, httpd_req *hr)
{
    (void)hr;
    rt_hreq *x = arg;
    if (!x->r || !x->r->paused) return;
    x->r->paused = false;
    rt_req_on_wake(x->r);
}

static void rt__completion(rt_http *h, httpd_req *hr, enum oai_kind kind)
{
    rt_ctx *c = h->c;
    oai_error e;
    rt_hreq *x = calloc(1, sizeof(*x));
    if (!x) {
        oai_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
        rt__respond_error(hr, &e, 0);
        return;
    }
    x->h = h;
    x->hr = hr;
    x->endpoint = kind == OAI_CHAT ? "chat_completions" : "completions";
    size_t body_len = 0;
    const char *body = httpd_req_body(hr, &body_len);
    if (oai_parse(kind, body, body_len, &x->q, &e) != 0) goto fail;
    if (strcmp(x->q.model, c->model_name) != 0) {
        oai_error_model(&e, x->q.model);
        goto fail;
    }
    if (!c->tok) {
        oai_error_set(&e, 503, "service_unavailable", NULL, NULL,
                      "the router has no tokenizer (start it with --model or --tokenizer)");
        goto fail;
    }
    int64_t t0 = td_now_ns();
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (oai_prompt_tokens(c->tok, h->chat_template, &x->q, &ids, &n_ids, &e) != 0) goto fail;
    uint64_t tok_us = (uint64_t)(td_now_ns() - t0) / 1000;
    if (oai_check_limits(&x->q, ids, n_ids, tok_vocab_size(c->tok), (int)c->max_model_len, &e) !=
        0) {
        free(ids);
        goto fail;
    }
    if (oai_text_create(c->tok, (const char *const *)x->q.stop, x->q.n_stop, h->skip_ids, h->n_skip,
                        &x->text) != 0) {
        free(ids);
        oai_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
        goto fail;
    }
    rt_req *r = rt_req_new(c, &rt__http_front, x);
    if (!r) {
        free(ids);
        oai_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
        goto fail;
    }
    x->r = r;
    r->prompt = (uint32_t *)ids; /* ids < vocab: the same bits */
    r->n_prompt = (uint32_t)n_ids;
    r->tokenize_us = tok_us;
    r->max_tokens = (uint32_t)x->q.max_tokens;
    Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = x->q.temperature;
    sp.top_p = x->q.top_p;
    sp.top_k = x->q.top_k > 0 ? (uint32_t)x->q.top_k : 0;
    sp.seed = x->q.seed;
    sp.has_seed = x->q.has_seed;
    sp.min_tokens = (uint32_t)x->q.min_tokens;
    sp.ignore_eos = x->q.ignore_eos;
    r->sampling = sp;
    r->want_timings = x->q.want_timings;
    oai_make_id(kind, r->id, x->oai_id, sizeof(x->oai_id));
    x->meta = (oai_meta){.kind = kind,
                         .id = x->oai_id,
                         .model = c->model_name,
                         .created = (int64_t)time(NULL),
                         .include_usage = x->q.include_usage};
    httpd_req_on_close(hr, rt__on_client_close, x);
    httpd_req_on_drain(hr, rt__on_drain, x);
    rt_req_dispatch(r);
    return;
fail:
    rt__respond_error(hr, &e, 0);
    rt_metrics_outcome(c, x->endpoint, "bad_request");
    rt__hreq_free(x);
}

/* ------------------------------------------------------------- routing -- */

static void rt__respond_json(httpd_req *hr, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void rt__respond_json(httpd_req *hr, int status, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof(buf)) n = (int)sizeof(buf) - 1;
    httpd_respond(hr, status, JSON, NULL, buf, (size_t)n);
}

static void rt__on_request(void *arg, httpd_req *hr)
{
    rt_http *h = arg;
    rt_ctx *c = h->c;
    const char *method = httpd_req_method(hr), *path = httpd_req_path(hr);
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
    bool post = strcmp(method, "POST") == 0;
    oai_error e;
    if (strcmp(path, "/health") == 0) {
        if (!get) goto bad_method;
        uint32_t np = rt_ready_count(c, RT_PREFILL), nd = rt_ready_count(c, RT_DECODE);
        bool ok = np > 0 && nd > 0 && !c->stopping;
        rt__respond_json(hr, ok ? 200 : 503,
                         "{\"status\":\"%s\",\"prefill_ready\":%u,\"decode_ready\":%u}\n",
                         ok ? "ok" : "unavailable", np, nd);
        return;
    }
    if (strcmp(path, "/metrics") == 0) {
        if (!get) goto bad_method;
        char *text = NULL;
        size_t len = 0;
        if (met_render(c->metrics.reg, &text, &len) != 0) {
            httpd_respond(hr, 500, "text/plain", NULL, "", 0);
            return;
        }
        httpd_respond(hr, 200, MET_CONTENT_TYPE, NULL, text, len);
        free(text);
        return;
    }
    bool models = strcmp(path, "/v1/models") == 0;
    bool comp = strcmp(path, "/v1/completions") == 0;
    bool chat = strcmp(path, "/v1/chat/completions") == 0;
    if (!models && !comp && !chat) {
        oai_error_path(&e, method, path);
        rt__respond_error(hr, &e, 0);
        return;
    }
    if (!rt__authorized(h, hr)) {
        oai_error_auth(&e);
        rt__respond_error(hr, &e, 0);
        rt_metrics_outcome(c,
                           models ? "models"
                           : comp ? "completions"
                                  : "chat_completions",
                           "unauthorized");
        return;
    }
    if (models) {
        if (!get) goto bad_method;
        rt__respond_json(hr, 200,
                         "{\"object\":\"list\",\"data\":[{\"id\":\"%s\",\"object\":\"model\","
                         "\"created\":%lld,\"owned_by\":\"tandem\",\"max_model_len\":%u}]}\n",
                         c->model_name, (long long)time(NULL), c->max_model_len);
        return;
    }
    if (!post) goto bad_method;
    if (c->stopping) {
        oai_error_unavailable(&e);
        rt__respond_error(hr, &e, 0);
        return;
    }
    rt__completion(h, hr, chat ? OAI_CHAT : OAI_COMPLETIONS);
    return;
bad_method:
    oai_error_method(&e, method, path);
    rt__respond_error(hr, &e, 0);
}

/* ------------------------------------------------------------- set-up -- */

static int rt__load_keys(rt_http *h, const rt_opts *o)
{
    size_t cap = 8;
    h->keys = calloc(cap, sizeof(char *));
    if (!h->keys) return TD_ENOMEM;
    if (o->api_key && o->api_key[0]) h->keys[h->n_keys++] = strdup(o->api_key);
    if (o->api_keys_file) {
        FILE *f = fopen(o->api_keys_file, "r");
        if (!f) {
            fprintf(stderr, "tandem-router: cannot read --api-keys-file %s\n", o->api_keys_file);
            return TD_EIO;
        }
        char line[512];
        while (fgets(line, sizeof(line), f)) {
            size_t n = strcspn(line, "\r\n");
            line[n] = '\0';
            if (n == 0 || line[0] == '#') continue;
            if (h->n_keys == cap) {
                char **nk = realloc(h->keys, 2 * cap * sizeof(char *));
                if (!nk) {
                    fclose(f);
                    return TD_ENOMEM;
                }
                h->keys = nk;
                cap *= 2;
            }
            h->keys[h->n_keys++] = strdup(line);
        }
        fclose(f);
        if (h->n_keys == 0) {
            fprintf(stderr, "tandem-router: --api-keys-file %s holds no key\n", o->api_keys_file);
            return TD_EINVAL;
        }
    }
    return 0;
}

static char *rt__read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (len + 1 == cap) {
            char *nb = cap < (1u << 20) ? realloc(buf, cap * 2) : NULL;
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf) buf[len] = '\0';
    return buf;
}

int rt_http_start(rt_ctx *c, void **out, int *port)
{
    *out = NULL;
    rt_http *h = calloc(1, sizeof(*h));
    if (!h) return TD_ENOMEM;
    h->c = c;
    const rt_opts *o = c->opts;
    int rc = rt__load_keys(h, o);
    if (rc == 0 && o->chat_template) {
        h->chat_template = rt__read_file(o->chat_template);
        char err[256] = "";
        if (!h->chat_template) {
            fprintf(stderr, "tandem-router: cannot read --chat-template %s\n", o->chat_template);
            rc = TD_EIO;
        } else if (oai_chat_template_check(h->chat_template, err, sizeof(err)) != 0) {
            fprintf(stderr, "tandem-router: --chat-template %s: %s\n", o->chat_template, err);
            rc = TD_EFORMAT;
        }
    }
    /* Ids never shown as text: EOS, and BOS (llama2.c models stop there). */
    if (c->tok) {
        if (tok_eos_id(c->tok) >= 0) h->skip_ids[h->n_skip++] = tok_eos_id(c->tok);
        if (tok_bos_id(c->tok) >= 0) h->skip_ids[h->n_skip++] = tok_bos_id(c->tok);
    }
    if (rc == 0) {
        httpd_config hc = {.addr = o->http_listen,
                           .max_body = (size_t)o->max_body_bytes,
                           .head_timeout_ms = (int)o->http_head_timeout_ms,
                           .idle_timeout_ms = (int)o->http_idle_timeout_ms};
        rc = httpd_start_on_loop(c->loop, &hc, rt__on_request, h, &h->srv);
    }
    if (rc != 0) {
        rt_http_close(h);
        return rc;
    }
    *port = httpd_port(h->srv);
    *out = h;
    return 0;
}

void rt_http_stop_accepting(void *arg)
{
    (void)arg; /* the listener closes with rt_http_close; new requests get 503 meanwhile */
}

static void rt__closed(void *arg)
{
    *(int *)arg = 1;
}

void rt_http_close(void *arg)
{
    rt_http *h = arg;
    if (!h) return;
    if (h->srv) {
        int done = 0;
        httpd_close(h->srv, rt__closed, &done);
        while (!done)
            uv_run(h->c->loop, UV_RUN_ONCE);
    }
    for (size_t i = 0; i < h->n_keys; i++)
        free(h->keys[i]);
    free(h->keys);
    free(h->chat_template);
    free(h);
}

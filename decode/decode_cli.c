/* tandem-decode-cli: calls Decode.Generate on a decode worker, for people and
 * tests. One request from flags, or many from a JSONL file run concurrently;
 * prints one JSON object per request (tokens, finish reason, status,
 * timings), in input order. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "common/rpc.h"
#include "engine/tokenizer/tok.h"
#include "proto/health.pb-c.h"
#include "proto/tandem.pb-c.h"

struct cli_opts {
    const char *decode, *prefill, *prompt, *prompt_tokens, *tokenizer, *requests, *id, *health;
    int64_t max_tokens, min_tokens, top_k, seed, timeout_ms, cancel_after;
    double temperature, top_p;
    bool ignore_eos, has_seed, timings;
};

#define CLI_OPT(name, type, def, min, max, help, field)                                            \
    {                                                                                              \
        name, type, def, min, max, NULL, help, offsetof(struct cli_opts, field), 0                 \
    }

static const struct cfg_option cli_table[] = {
    CLI_OPT("decode", CFG_STRING, "127.0.0.1:50071", NULL, NULL, "Decode worker gRPC address",
            decode),
    CLI_OPT("prefill", CFG_STRING, "127.0.0.1:50061", NULL, NULL,
            "Prefill worker gRPC address(es), comma-separated: requests go round robin", prefill),
    CLI_OPT("prompt", CFG_STRING, NULL, NULL, NULL, "Prompt text (needs --tokenizer)", prompt),
    CLI_OPT("prompt-tokens", CFG_STRING, NULL, NULL, NULL, "Prompt as token ids, e.g. 1,2,3",
            prompt_tokens),
    CLI_OPT("tokenizer", CFG_STRING, NULL, NULL, NULL,
            "Tokenizer file: encodes --prompt (with BOS when the tokenizer adds it) and "
            "decodes the output",
            tokenizer),
    CLI_OPT("requests", CFG_STRING, NULL, NULL, NULL,
            "JSONL file: one request per line (id, prompt_tokens, max_tokens, temperature, "
            "top_p, top_k, seed, min_tokens, ignore_eos, prefill, timeout_ms, cancel_after)",
            requests),
    CLI_OPT("id", CFG_STRING, NULL, NULL, NULL, "Request id (default: cli-<pid>-<n>)", id),
    CLI_OPT("max-tokens", CFG_INT64, "64", "0", "16777216", "Tokens to generate at most",
            max_tokens),
    CLI_OPT("min-tokens", CFG_INT64, "0", "0", "16777216", "Tokens before EOS may end", min_tokens),
    CLI_OPT("temperature", CFG_DOUBLE, "0", "0", NULL, "Sampling temperature; 0 is greedy",
            temperature),
    CLI_OPT("top-p", CFG_DOUBLE, "1", "0", "1", "Nucleus mass; 1: off", top_p),
    CLI_OPT("top-k", CFG_INT64, "0", "0", "16777216", "Top-k; 0: off", top_k),
    CLI_OPT("seed", CFG_INT64, "0", "0", NULL, "Sampling seed (with --has-seed)", seed),
    CLI_OPT("has-seed", CFG_BOOL, "true", NULL, NULL, "Send --seed (false: the worker picks one)",
            has_seed),
    CLI_OPT("ignore-eos", CFG_BOOL, "false", NULL, NULL, "Do not stop at EOS", ignore_eos),
    CLI_OPT("timeout-ms", CFG_INT64, "60000", "0", NULL, "Deadline of each request; 0: none",
            timeout_ms),
    CLI_OPT("cancel-after", CFG_INT64, "0", "0", NULL,
            "Cancel the stream after this many tokens (tests); 0: never", cancel_after),
    CLI_OPT("timings", CFG_BOOL, "true", NULL, NULL, "Ask for per-request timings", timings),
    CLI_OPT("health", CFG_STRING, NULL, NULL, NULL,
            "Only ask ADDR's grpc.health.v1 service: prints SERVING or NOT_SERVING, exit 0 "
            "when serving",
            health),
};

/* --health: one grpc.health.v1.Health/Check call. */
static int health_check(const char *addr)
{
    rpc_client *c = NULL;
    if (rpc_client_create(addr, &c) != 0) return 2;
    Grpc__Health__V1__HealthCheckRequest q = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    q.service = "";
    ProtobufCMessage *resp = NULL;
    rpc_status st;
    int rc = rpc_client_unary(c, "/grpc.health.v1.Health/Check", &q.base,
                              &grpc__health__v1__health_check_response__descriptor,
                              td_now_ns() + 2000000000LL, &resp, &st);
    int serving = 0;
    if (rc == 0) {
        Grpc__Health__V1__HealthCheckResponse *r = (Grpc__Health__V1__HealthCheckResponse *)resp;
        serving = r->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
        printf("%s\n", serving ? "SERVING" : "NOT_SERVING");
        protobuf_c_message_free_unpacked(resp, NULL);
    } else {
        printf("UNREACHABLE %s\n", td_err_name(rc));
    }
    rpc_client_free(c);
    return serving ? 0 : 1;
}

typedef struct cli_req {
    char id[64];
    uint32_t *prompt;
    size_t n_prompt;
    const char *prefill;
    Tandem__V1__SamplingParams sp;
    uint64_t timeout_ms;
    int64_t cancel_after;
    rpc_stream *stream;
    bool done, cancelled;
    uint32_t *tokens;
    size_t n_tokens, cap;
    int finish;
    uint32_t cached;
    Tandem__V1__Timings timings;
    bool has_timings;
    int err;
    char details[256];
    int64_t t_start, t_first, t_end;
} cli_req;

static int cli_wake_fd = -1;

static void cli_notify(rpc_stream *s, void *arg)
{
    (void)s;
    (void)arg;
    uint64_t one = 1;
    (void)!write(cli_wake_fd, &one, sizeof(one));
}

static int parse_ids(const char *s, uint32_t **out, size_t *n)
{
    size_t cap = 16, len = 0;
    uint32_t *v = malloc(cap * sizeof(*v));
    if (!v) return TD_ENOMEM;
    for (const char *p = s; *p;) {
        char *end;
        errno = 0;
        unsigned long x = strtoul(p, &end, 10);
        if (errno || end == p || x > UINT32_MAX || (*end && *end != ',')) {
            fprintf(stderr, "tandem-decode-cli: bad token id near \"%s\"\n", p);
            free(v);
            return TD_EINVAL;
        }
        if (len == cap) {
            uint32_t *nv = realloc(v, (cap *= 2) * sizeof(*v));
            if (!nv) {
                free(v);
                return TD_ENOMEM;
            }
            v = nv;
        }
        v[len++] = (uint32_t)x;
        p = *end ? end + 1 : end;
    }
    *out = v;
    *n = len;
    return 0;
}

static const char *finish_name(int f)
{
    switch (f) {
    case TANDEM__V1__FINISH_REASON__FINISH_REASON_LENGTH:
        return "length";
    case TANDEM__V1__FINISH_REASON__FINISH_REASON_STOP:
        return "stop";
    case TANDEM__V1__FINISH_REASON__FINISH_REASON_CANCELLED:
        return "cancelled";
    case TANDEM__V1__FINISH_REASON__FINISH_REASON_ERROR:
        return "error";
    default:
        return "";
    }
}

static void print_result(const cli_req *r, tok_tokenizer *tok)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", r->id);
    cJSON *t = cJSON_AddArrayToObject(o, "tokens");
    for (size_t i = 0; i < r->n_tokens; i++)
        cJSON_AddItemToArray(t, cJSON_CreateNumber(r->tokens[i]));
    if (tok) {
        char *text = NULL;
        size_t len = 0;
        int32_t *ids = malloc((r->n_tokens + 1) * sizeof(int32_t));
        if (ids) {
            for (size_t i = 0; i < r->n_tokens; i++)
                ids[i] = (int32_t)r->tokens[i];
            if (tok_decode(tok, ids, r->n_tokens, 1, &text, &len) == 0)
                cJSON_AddStringToObject(o, "text", text);
            free(text);
            free(ids);
        }
    }
    cJSON_AddStringToObject(o, "finish_reason", r->err ? "error" : finish_name(r->finish));
    cJSON_AddStringToObject(o, "status", r->err ? td_err_name(r->err) : "OK");
    if (r->err) cJSON_AddStringToObject(o, "error", r->details);
    cJSON_AddNumberToObject(o, "cached_prompt_tokens", r->cached);
    cJSON_AddNumberToObject(o, "ttft_ms", r->t_first ? td_ns_to_ms(r->t_first - r->t_start) : -1);
    cJSON_AddNumberToObject(o, "e2e_ms", td_ns_to_ms(r->t_end - r->t_start));
    if (r->has_timings) {
        cJSON *tm = cJSON_AddObjectToObject(o, "timings");
        cJSON_AddNumberToObject(tm, "prefill_queue_us", (double)r->timings.prefill_queue_us);
        cJSON_AddNumberToObject(tm, "prefill_us", (double)r->timings.prefill_us);
        cJSON_AddNumberToObject(tm, "transfer_us", (double)r->timings.transfer_us);
        cJSON_AddNumberToObject(tm, "first_token_us", (double)r->timings.first_token_us);
        cJSON_AddNumberToObject(tm, "decode_us", (double)r->timings.decode_us);
        cJSON_AddNumberToObject(tm, "e2e_us", (double)r->timings.e2e_us);
    }
    char *s = cJSON_PrintUnformatted(o);
    if (s) printf("%s\n", s);
    free(s);
    cJSON_Delete(o);
}

static int start(rpc_client *c, cli_req *r, bool timings)
{
    Tandem__V1__RequestMeta meta = TANDEM__V1__REQUEST_META__INIT;
    meta.request_id = r->id;
    meta.timeout_ms = r->timeout_ms;
    Tandem__V1__DecodeRequest q = TANDEM__V1__DECODE_REQUEST__INIT;
    q.meta = &meta;
    q.n_prompt_token_ids = r->n_prompt;
    q.prompt_token_ids = r->prompt;
    q.sampling = &r->sp;
    q.prefill_address = (char *)r->prefill;
    q.want_timings = timings;
    int64_t deadline = r->timeout_ms ? td_now_ns() + (int64_t)r->timeout_ms * 1000000 + 1000000000
                                     : RPC_NO_DEADLINE;
    r->t_start = td_now_ns();
    return rpc_client_stream(c, "/tandem.v1.Decode/Generate", &q.base,
                             &tandem__v1__decode_response__descriptor, deadline, cli_notify, NULL,
                             &r->stream);
}

/* Takes what arrived on r's stream; 1 when it ended. */
static int drain(cli_req *r)
{
    for (;;) {
        ProtobufCMessage *msg = NULL;
        int rc = rpc_stream_poll(r->stream, &msg);
        if (rc == RPC_PENDING) return 0;
        if (rc != 0 || !msg) {
            r->t_end = td_now_ns();
            if (rc != 0) {
                r->err = rc;
                const rpc_status *st = rpc_stream_status(r->stream);
                snprintf(r->details, sizeof(r->details), "%s", st ? st->details : "");
            }
            return 1;
        }
        Tandem__V1__DecodeResponse *m = (Tandem__V1__DecodeResponse *)msg;
        if (!r->t_first && m->n_token_ids) r->t_first = td_now_ns();
        for (size_t i = 0; i < m->n_token_ids; i++) {
            if (r->n_tokens == r->cap) {
                size_t cap = r->cap ? r->cap * 2 : 64;
                uint32_t *nt = realloc(r->tokens, cap * sizeof(uint32_t));
                if (!nt) break;
                r->tokens = nt;
                r->cap = cap;
            }
            r->tokens[r->n_tokens++] = m->token_ids[i];
        }
        if (m->finish_reason) {
            r->finish = m->finish_reason;
            r->cached = m->cached_prompt_tokens;
            if (m->timings) {
                r->timings = *m->timings;
                r->has_timings = true;
            }
        }
        protobuf_c_message_free_unpacked(msg, NULL);
        if (r->cancel_after > 0 && (int64_t)r->n_tokens >= r->cancel_after && !r->cancelled) {
            r->cancelled = true;
            rpc_stream_cancel(r->stream);
        }
    }
}

/* Reads the JSONL requests. */
static int load_requests(const char *path, const struct cli_opts *o, char **prefills, int n_pf,
                         cli_req **out, size_t *n_out)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "tandem-decode-cli: cannot open %s: %s\n", path, strerror(errno));
        return TD_EIO;
    }
    size_t cap = 64, n = 0;
    cli_req *v = calloc(cap, sizeof(*v));
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    int rc = v ? 0 : TD_ENOMEM;
    for (int lineno = 1; rc == 0 && (len = getline(&line, &lcap, f)) > 0; lineno++) {
        if (len <= 1) continue;
        cJSON *j = cJSON_Parse(line);
        if (!j || !cJSON_IsObject(j)) {
            fprintf(stderr, "tandem-decode-cli: %s:%d: not a JSON object\n", path, lineno);
            cJSON_Delete(j);
            rc = TD_EFORMAT;
            break;
        }
        if (n == cap) {
            cli_req *nv = realloc(v, (cap *= 2) * sizeof(*v));
            if (!nv) {
                cJSON_Delete(j);
                rc = TD_ENOMEM;
                break;
            }
            v = nv;
        }
        cli_req *r = &v[n++];
        memset(r, 0, sizeof(*r));
        cJSON *x = cJSON_GetObjectItem(j, "id");
        if (cJSON_IsString(x))
            snprintf(r->id, sizeof(r->id), "%s", x->valuestring);
        else
            snprintf(r->id, sizeof(r->id), "cli-%d-%zu", (int)getpid(), n);
        cJSON *pt = cJSON_GetObjectItem(j, "prompt_tokens");
        int np = cJSON_IsArray(pt) ? cJSON_GetArraySize(pt) : 0;
        r->prompt = malloc(((size_t)np + 1) * sizeof(uint32_t));
        if (!r->prompt) rc = TD_ENOMEM;
        for (int i = 0; r->prompt && i < np; i++)
            r->prompt[i] = (uint32_t)cJSON_GetArrayItem(pt, i)->valuedouble;
        r->n_prompt = (size_t)np;
        Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
        x = cJSON_GetObjectItem(j, "max_tokens");
        sp.max_tokens = cJSON_IsNumber(x) ? (uint32_t)x->valuedouble : (uint32_t)o->max_tokens;
        x = cJSON_GetObjectItem(j, "min_tokens");
        sp.min_tokens = cJSON_IsNumber(x) ? (uint32_t)x->valuedouble : (uint32_t)o->min_tokens;
        x = cJSON_GetObjectItem(j, "temperature");
        sp.temperature = cJSON_IsNumber(x) ? (float)x->valuedouble : (float)o->temperature;
        x = cJSON_GetObjectItem(j, "top_p");
        sp.top_p = cJSON_IsNumber(x) ? (float)x->valuedouble : (float)o->top_p;
        x = cJSON_GetObjectItem(j, "top_k");
        sp.top_k = cJSON_IsNumber(x) ? (uint32_t)x->valuedouble : (uint32_t)o->top_k;
        x = cJSON_GetObjectItem(j, "seed");
        sp.seed = cJSON_IsNumber(x) ? (uint64_t)x->valuedouble : (uint64_t)o->seed;
        sp.has_seed = true;
        x = cJSON_GetObjectItem(j, "ignore_eos");
        sp.ignore_eos = cJSON_IsBool(x) ? cJSON_IsTrue(x) : o->ignore_eos;
        r->sp = sp;
        x = cJSON_GetObjectItem(j, "timeout_ms");
        r->timeout_ms = cJSON_IsNumber(x) ? (uint64_t)x->valuedouble : (uint64_t)o->timeout_ms;
        x = cJSON_GetObjectItem(j, "cancel_after");
        r->cancel_after = cJSON_IsNumber(x) ? (int64_t)x->valuedouble : o->cancel_after;
        x = cJSON_GetObjectItem(j, "prefill");
        r->prefill = cJSON_IsString(x) ? strdup(x->valuestring) : prefills[(n - 1) % (size_t)n_pf];
        cJSON_Delete(j);
    }
    free(line);
    fclose(f);
    if (rc != 0) {
        for (size_t i = 0; i < n; i++)
            free(v[i].prompt);
        free(v);
        return rc;
    }
    *out = v;
    *n_out = n;
    return 0;
}

int main(int argc, char **argv)
{
    struct cli_opts o;
    cfg *c = NULL;
    int rc = cfg_create(&c, "tandem-decode-cli", cli_table,
                        sizeof(cli_table) / sizeof(cli_table[0]), &o);
    if (rc != 0) return 2;
    rc = cfg_parse(c, argc, argv);
    if (rc == CFG_HELP) {
        printf("%s\nExample:\n  tandem-decode-cli --decode 127.0.0.1:50071 --prefill "
               "127.0.0.1:50061 --prompt-tokens 1,403,407 --max-tokens 32\n",
               cfg_help(c));
        cfg_free(c);
        return 0;
    }
    if (rc != 0) {
        fprintf(stderr, "tandem-decode-cli: %s\n", cfg_error(c));
        cfg_free(c);
        return 2;
    }
    if (o.health) {
        rc = health_check(o.health);
        cfg_free(c);
        return rc;
    }
    tok_tokenizer *tok = NULL;
    if (o.tokenizer) {
        char err[256] = "";
        if (tok_load(o.tokenizer, &tok, err, sizeof(err)) != 0) {
            fprintf(stderr, "tandem-decode-cli: tokenizer %s: %s\n", o.tokenizer, err);
            cfg_free(c);
            return 2;
        }
    }
    /* Prefill addresses, round robin. */
    char *pf_copy = strdup(o.prefill);
    char *prefills[64];
    int n_pf = 0;
    for (char *save = NULL, *t = strtok_r(pf_copy, ",", &save); t && n_pf < 64;
         t = strtok_r(NULL, ",", &save))
        prefills[n_pf++] = t;
    cli_req *reqs = NULL;
    size_t n_reqs = 0;
    if (n_pf == 0) {
        fprintf(stderr, "tandem-decode-cli: --prefill is empty\n");
        rc = TD_EINVAL;
    } else if (o.requests) {
        rc = load_requests(o.requests, &o, prefills, n_pf, &reqs, &n_reqs);
    } else {
        reqs = calloc(1, sizeof(*reqs));
        n_reqs = 1;
        rc = reqs ? 0 : TD_ENOMEM;
        if (rc == 0 && o.prompt_tokens) {
            rc = parse_ids(o.prompt_tokens, &reqs->prompt, &reqs->n_prompt);
        } else if (rc == 0 && o.prompt) {
            if (!tok) {
                fprintf(stderr, "tandem-decode-cli: --prompt needs --tokenizer\n");
                rc = TD_EINVAL;
            } else {
                int32_t *ids = NULL;
                size_t n = 0;
                rc = tok_encode(tok, o.prompt, strlen(o.prompt),
                                tok_adds_bos(tok) ? TOK_ADD_BOS : 0, &ids, &n);
                reqs->prompt = (uint32_t *)ids;
                reqs->n_prompt = n;
            }
        } else if (rc == 0) {
            fprintf(stderr, "tandem-decode-cli: give --prompt-tokens, --prompt or --requests\n");
            rc = TD_EINVAL;
        }
        if (rc == 0) {
            if (o.id)
                snprintf(reqs->id, sizeof(reqs->id), "%s", o.id);
            else
                snprintf(reqs->id, sizeof(reqs->id), "cli-%d-1", (int)getpid());
            Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
            sp.max_tokens = (uint32_t)o.max_tokens;
            sp.min_tokens = (uint32_t)o.min_tokens;
            sp.temperature = (float)o.temperature;
            sp.top_p = (float)o.top_p;
            sp.top_k = (uint32_t)o.top_k;
            sp.seed = (uint64_t)o.seed;
            sp.has_seed = o.has_seed;
            sp.ignore_eos = o.ignore_eos;
            reqs->sp = sp;
            reqs->prefill = prefills[0];
            reqs->timeout_ms = (uint64_t)o.timeout_ms;
            reqs->cancel_after = o.cancel_after;
        }
    }
    rpc_client *client = NULL;
    cli_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (rc == 0) rc = rpc_client_create(o.decode, &client);
    for (size_t i = 0; rc == 0 && i < n_reqs; i++) {
        rc = start(client, &reqs[i], o.timings);
        if (rc != 0)
            fprintf(stderr, "tandem-decode-cli: cannot start %s: %s\n", reqs[i].id,
                    td_strerror(rc));
    }
    size_t open = rc == 0 ? n_reqs : 0;
    while (open > 0) {
        struct pollfd p = {.fd = cli_wake_fd, .events = POLLIN};
        (void)poll(&p, 1, 100);
        uint64_t v;
        (void)!read(cli_wake_fd, &v, sizeof(v));
        for (size_t i = 0; i < n_reqs; i++)
            if (!reqs[i].done && drain(&reqs[i])) {
                reqs[i].done = true;
                open--;
            }
    }
    int failed = 0;
    for (size_t i = 0; i < n_reqs; i++) {
        if (rc == 0) print_result(&reqs[i], tok);
        failed |= reqs[i].err != 0;
        rpc_stream_free(reqs[i].stream);
        free(reqs[i].prompt);
        free(reqs[i].tokens);
    }
    free(reqs);
    rpc_client_free(client);
    if (cli_wake_fd >= 0) close(cli_wake_fd);
    free(pf_copy);
    tok_free(tok);
    cfg_free(c);
    if (rc != 0) return 2;
    return failed ? 1 : 0;
}

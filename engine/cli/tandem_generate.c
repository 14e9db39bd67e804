/* tandem-generate: single-process text generation with the engine, for
 * checking the model code against llama2.c and an independent reference, and
 * for measuring the CPU backend (--bench). See docs/engine.md. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "common/log.h"
#include "engine/backend/backend.h"
#include "engine/cli/gen_bench.h"
#include "engine/model.h"
#include "engine/runtime/eng.h"
#include "engine/sampler.h"
#include "engine/tokenizer/tok.h"

typedef struct gen_args {
    const char *model;
    const char *tokenizer;
    const char *prompt;
    const char *prompt_tokens;
    const char *logits_out;
    const char *backend;      /* "cpu" or "cuda", from --device (or --backend) */
    int device;               /* device ordinal for cuda */
    const char *const *stops; /* n_stops strings, owned by the cfg */
    int n_stops;
    int max_tokens;
    int min_tokens;
    int ignore_eos;
    float temperature;
    int top_k;
    float top_p;
    unsigned long long seed;
    int json;
    int threads;
    int bench;
    enum be_matmul matmul;
    enum kv_dtype kv_dtype;
} gen_args;

/* The options as common/config parses them (flags or a --config file). */
struct gen_opts {
    const char *model, *tokenizer, *prompt, *prompt_tokens, *logits_out, *backend, *device;
    const char *matmul, *kv_dtype;
    struct cfg_list stop;
    int64_t max_tokens, min_tokens, top_k, seed, threads;
    double temperature, top_p;
    bool ignore_eos, json, bench;
};

#define GEN_OPT(name, type, def, min, max, choices, help, field)                                   \
    {                                                                                              \
        name, type, def, min, max, choices, help, offsetof(struct gen_opts, field), 0              \
    }

static const struct cfg_option gen_table[] = {
    GEN_OPT("model", CFG_STRING, NULL, NULL, NULL, NULL,
            "Checkpoint: HF directory, .safetensors or llama2.c .bin (required unless --bench)",
            model),
    GEN_OPT("tokenizer", CFG_STRING, NULL, NULL, NULL, NULL,
            "Tokenizer file (default: tokenizer.json/.bin or tok<vocab>.bin beside the model)",
            tokenizer),
    GEN_OPT("prompt", CFG_STRING, NULL, NULL, NULL, NULL, "Prompt text (default: BOS alone)",
            prompt),
    GEN_OPT("prompt-tokens", CFG_STRING, NULL, NULL, NULL, NULL,
            "Prompt as token ids, e.g. 1,2,3 (instead of --prompt)", prompt_tokens),
    GEN_OPT("max-tokens", CFG_INT64, "256", "0", "2147483647", NULL, "Tokens to generate at most",
            max_tokens),
    GEN_OPT("min-tokens", CFG_INT64, "0", "0", "2147483647", NULL,
            "Tokens to generate before EOS or a stop string may end", min_tokens),
    GEN_OPT("temperature", CFG_DOUBLE, "0", "0", NULL, NULL, "Sampling temperature; 0 is greedy",
            temperature),
    GEN_OPT("top-k", CFG_INT64, "0", "0", "2147483647", NULL, "Keep the K likeliest tokens; 0: off",
            top_k),
    GEN_OPT("top-p", CFG_DOUBLE, "1", "0", "1", NULL, "Nucleus sampling mass; 1: off", top_p),
    GEN_OPT("seed", CFG_INT64, "0", "0", NULL, NULL, "Sampling RNG seed", seed),
    GEN_OPT("ignore-eos", CFG_BOOL, "false", NULL, NULL, NULL, "Do not stop at EOS", ignore_eos),
    GEN_OPT("stop", CFG_LIST, NULL, NULL, NULL, NULL, "Stop string (the output ends before it)",
            stop),
    GEN_OPT("json", CFG_BOOL, "false", NULL, NULL, NULL,
            "Print one JSON object (token ids, text, timings) instead of the text", json),
    GEN_OPT("threads", CFG_INT64, "1", "1", "256", NULL, "CPU backend threads", threads),
    GEN_OPT("kv-dtype", CFG_STRING, "f32", NULL, NULL, "f32|f16", "KV cache element type",
            kv_dtype),
    GEN_OPT("matmul", CFG_STRING, "det", NULL, NULL, "det|blas",
            "Matmul: deterministic (bitwise reproducible) or BLAS", matmul),
    GEN_OPT("logits-out", CFG_STRING, NULL, NULL, NULL, NULL,
            "Write float32 little-endian logits [N][vocab] to FILE", logits_out),
    GEN_OPT("backend", CFG_STRING, NULL, NULL, NULL, "cpu|cuda",
            "Compute backend by name (overrides --device)", backend),
    GEN_OPT("device", CFG_STRING, "auto", NULL, NULL, NULL,
            "auto|cpu|cuda[:N]: auto takes CUDA when built and a GPU is present, else the CPU",
            device),
    GEN_OPT("bench", CFG_BOOL, "false", NULL, NULL, NULL,
            "Measure the CPU backend (on --model, or a random stories15M-shaped model)", bench),
};

static const char gen_notes[] =
    "\nExamples:\n"
    "  tandem-generate --model PATH --prompt \"Once upon a time\" --max-tokens 200\n"
    "  tandem-generate --model PATH --prompt-tokens 1,2,3 --temperature 0 --json\n"
    "  tandem-generate --bench [--model PATH]\n"
    "Without a prompt, generation starts from BOS alone. --temperature 0 is greedy.\n"
    "--logits-out writes float32 little-endian logits [N][vocab], row i being the\n"
    "step that produced generated token i. --stop may be given several times.\n"
    "The --config file uses the format of common/config.h (KEY = VALUE lines).\n";

/* Parses argv into a, through the option struct o (filled by the cfg).
 * Returns 0 with *cfg_out set (it owns a's strings: free it after the last
 * use of a), CFG_HELP after printing the help, or a negative TD_E* code after
 * printing the error. */
static int parse_args(int argc, char **argv, struct gen_opts *o, gen_args *a, cfg **cfg_out)
{
    memset(a, 0, sizeof(*a));
    *cfg_out = NULL;
    cfg *c = NULL;
    int rc =
        cfg_create(&c, "tandem-generate", gen_table, sizeof(gen_table) / sizeof(gen_table[0]), o);
    if (rc != 0) return rc;
    rc = cfg_parse(c, argc, argv);
    if (rc == CFG_HELP) {
        printf("%s%s", cfg_help(c), gen_notes);
        cfg_free(c);
        return CFG_HELP;
    }
    int npos = 0;
    char *const *pos = cfg_positional(c, &npos);
    if (rc == 0 && npos > 0) {
        fprintf(stderr, "tandem-generate: unexpected argument '%s' (see --help)\n", pos[0]);
        rc = TD_EINVAL;
    } else if (rc != 0) {
        fprintf(stderr, "tandem-generate: %s\n", cfg_error(c));
    } else if (!o->bench && !o->model) {
        fprintf(stderr, "tandem-generate: --model is required\n");
        rc = TD_EINVAL;
    } else if (o->prompt && o->prompt_tokens) {
        fprintf(stderr, "tandem-generate: give --prompt or --prompt-tokens, not both\n");
        rc = TD_EINVAL;
    } else if (o->stop.n > INT_MAX) {
        fprintf(stderr, "tandem-generate: too many --stop strings\n");
        rc = TD_EINVAL;
    }
    if (rc != 0) {
        cfg_free(c);
        return rc;
    }
    a->model = o->model;
    a->tokenizer = o->tokenizer;
    a->prompt = o->prompt;
    a->prompt_tokens = o->prompt_tokens;
    a->logits_out = o->logits_out;
    if (o->backend) {
        a->backend = o->backend;
    } else {
        char err[256] = "";
        rc = be_device_resolve(o->device, 0, &a->backend, &a->device, err, sizeof(err));
        if (rc != 0) {
            fprintf(stderr, "tandem-generate: %s\n", err);
            cfg_free(c);
            return rc;
        }
    }
    a->stops = (const char *const *)o->stop.v;
    a->n_stops = (int)o->stop.n;
    a->max_tokens = (int)o->max_tokens; /* bounds in the table keep these in int range */
    a->min_tokens = (int)o->min_tokens;
    a->top_k = (int)o->top_k;
    a->threads = (int)o->threads;
    a->ignore_eos = o->ignore_eos;
    a->temperature = (float)o->temperature;
    a->top_p = (float)o->top_p;
    a->seed = (unsigned long long)o->seed;
    a->json = o->json;
    a->bench = o->bench;
    a->matmul = strcmp(o->matmul, "blas") == 0 ? BE_MATMUL_BLAS : BE_MATMUL_DETERMINISTIC;
    a->kv_dtype = strcmp(o->kv_dtype, "f16") == 0 ? KV_DTYPE_F16 : KV_DTYPE_F32;
    *cfg_out = c;
    return 0;
}

static int file_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

/* Every failure prints one line naming its cause: gen_fail prints it and
 * notes that it did; main prints the code's name for any failure that
 * arrives unreported. */
static int g_reported;

static int gen_fail(int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("tandem-generate: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    g_reported = 1;
    return rc;
}

/* The tokenizer: --tokenizer, else tokenizer.json / tokenizer.bin /
 * tok<vocab>.bin beside the model (llama2.c's naming for small vocabularies). */
static int load_tokenizer(const gen_args *a, const mdl_model *m, tok_tokenizer **tok)
{
    char path[4096], err[512] = "";
    struct stat st;
    const char *found = a->tokenizer;
    if (!found) {
        char dir[4096];
        snprintf(dir, sizeof(dir), "%s", a->model);
        if (!(stat(dir, &st) == 0 && S_ISDIR(st.st_mode))) {
            char *slash = strrchr(dir, '/');
            if (slash)
                *slash = '\0';
            else
                snprintf(dir, sizeof(dir), ".");
        }
        const char *names[3] = {"tokenizer.json", "tokenizer.bin", NULL};
        char tokn[64];
        snprintf(tokn, sizeof(tokn), "tok%d.bin", m->cfg.vocab_size);
        names[2] = tokn;
        for (int i = 0; i < 3 && !found; i++) {
            int n = snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
            if (n > 0 && (size_t)n < sizeof(path) && file_exists(path)) found = path;
        }
        /* A GGUF file carries its tokenizer. */
        if (!found && m->cfg.format == MDL_FORMAT_GGUF) found = a->model;
        if (!found)
            return gen_fail(TD_ENOENT, "no tokenizer found beside %s; pass --tokenizer", a->model);
    }
    int rc = tok_load(found, tok, err, sizeof(err));
    if (rc != 0) return gen_fail(rc, "tokenizer %s: %s (%s)", found, err, td_strerror(rc));
    /* Both directions: a llama2.c checkpoint is made for one tokenizer. */
    rc = tok_check_model_vocab(*tok, m->cfg.vocab_size, m->cfg.format == MDL_FORMAT_LLAMA2C, err,
                               sizeof(err));
    if (rc != 0) return gen_fail(rc, "tokenizer %s: %s", found, err);
    return 0;
}

static int parse_token_list(const char *s, int vocab, int32_t **out, size_t *n)
{
    size_t cap = 16, len = 0;
    int32_t *ids = malloc(cap * sizeof(*ids));
    if (!ids) return TD_ENOMEM;
    const char *p = s;
    while (*p) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        int32_t v;
        int rc = tok_parse_id(p, (size_t)(end - p), vocab, &v);
        if (rc != 0) {
            free(ids);
            return gen_fail(TD_EINVAL, "--prompt-tokens: '%.*s' is %s", (int)(end - p), p,
                            rc == TD_ERANGE ? "outside the model's vocabulary"
                                            : "not a token id (a decimal number)");
        }
        if (len == cap) {
            cap *= 2;
            int32_t *n2 = realloc(ids, cap * sizeof(*ids));
            if (!n2) {
                free(ids);
                return TD_ENOMEM;
            }
            ids = n2;
        }
        ids[len++] = v;
        p = *end ? end + 1 : end;
    }
    *out = ids;
    *n = len;
    return 0;
}

static void print_json(const int32_t *prompt, size_t n_prompt, const int32_t *gen, size_t n_gen,
                       const char *text, const char *finish, double prefill_ms, double decode_ms)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *pt = cJSON_AddArrayToObject(o, "prompt_tokens");
    for (size_t i = 0; i < n_prompt; i++)
        cJSON_AddItemToArray(pt, cJSON_CreateNumber(prompt[i]));
    cJSON *gt = cJSON_AddArrayToObject(o, "tokens");
    for (size_t i = 0; i < n_gen; i++)
        cJSON_AddItemToArray(gt, cJSON_CreateNumber(gen[i]));
    cJSON_AddStringToObject(o, "text", text ? text : "");
    cJSON_AddStringToObject(o, "finish_reason", finish);
    cJSON *t = cJSON_AddObjectToObject(o, "timings");
    cJSON_AddNumberToObject(t, "prefill_ms", prefill_ms);
    cJSON_AddNumberToObject(t, "decode_ms", decode_ms);
    char *s = cJSON_PrintUnformatted(o);
    if (s) printf("%s\n", s);
    free(s);
    cJSON_Delete(o);
}

static const char *finish_name(enum smp_finish f)
{
    switch (f) {
    case SMP_STOP_EOS:
    case SMP_STOP_TOKEN:
        return "stop";
    case SMP_STOP_LENGTH:
        return "length";
    default:
        return "length";
    }
}

/* --logits-out: each sampled row's raw logits, appended as float32. */
typedef struct gen_logits_tap {
    FILE *f;
    int err;
} gen_logits_tap;

static void gen_write_logits(void *arg, uint64_t id, const float *logits, int vocab)
{
    gen_logits_tap *t = arg;
    if (!t->err && fwrite(logits, sizeof(float), (size_t)vocab, t->f) != (size_t)vocab)
        t->err = TD_EIO;
}

static int generate(const gen_args *a, const mdl_model *m)
{
    const mdl_config *mc = &m->cfg;
    int rc;
    tok_tokenizer *tok = NULL;
    eng *en = NULL;
    gen_logits_tap tap = {.f = NULL, .err = 0};
    tok_stream *st = NULL;
    int32_t *prompt = NULL, *gen = NULL;
    char *text = NULL;
    size_t n_prompt = 0, n_gen = 0, text_len = 0, text_cap = 0;
    char piece[1024];
    enum smp_finish finish = SMP_STOP_LENGTH;
    int stopped_by_string = 0;
    size_t printed = 0; /* bytes of text already written to stdout */

    /* The tokenizer is needed for text in or out, not for --prompt-tokens --json
     * without text... we still try, and only fail when text is required. */
    int need_tok = a->prompt != NULL || !a->json || a->n_stops > 0;
    rc = load_tokenizer(a, m, &tok);
    if (rc != 0 && (need_tok || a->tokenizer || rc == TD_EMISMATCH)) goto out;
    rc = 0;

    int32_t bos =
        tok && tok_bos_id(tok) >= 0 ? tok_bos_id(tok) : (mc->bos_id >= 0 ? mc->bos_id : 1);
    int32_t eos = mc->eos_id >= 0 ? mc->eos_id : (tok ? tok_eos_id(tok) : -1);
    if (a->prompt_tokens) {
        rc = parse_token_list(a->prompt_tokens, mc->vocab_size, &prompt, &n_prompt);
        if (rc != 0) goto out;
    } else if (a->prompt && a->prompt[0]) {
        int flags = (tok_adds_bos(tok) || mc->format == MDL_FORMAT_LLAMA2C) ? TOK_ADD_BOS : 0;
        rc = tok_encode(tok, a->prompt, strlen(a->prompt), flags, &prompt, &n_prompt);
        if (rc != 0) {
            gen_fail(rc, "encoding the prompt: %s", td_strerror(rc));
            goto out;
        }
    }
    if (n_prompt == 0) { /* like llama2.c with no prompt: BOS alone */
        free(prompt);
        prompt = malloc(sizeof(int32_t));
        if (!prompt) {
            rc = TD_ENOMEM;
            goto out;
        }
        prompt[0] = bos;
        n_prompt = 1;
    }
    if (n_prompt >= (size_t)mc->max_seq_len) {
        rc = n_prompt == (size_t)mc->max_seq_len
                 ? gen_fail(TD_ETOOLONG,
                            "prompt of %zu tokens fills the context of %d: no room to generate",
                            n_prompt, mc->max_seq_len)
                 : gen_fail(TD_ETOOLONG, "prompt of %zu tokens exceeds the context of %d", n_prompt,
                            mc->max_seq_len);
        goto out;
    }
    int max_tokens = a->max_tokens;
    if ((size_t)max_tokens > (size_t)mc->max_seq_len - n_prompt) {
        max_tokens = mc->max_seq_len - (int)n_prompt;
        td_log_warn("generate", "max_tokens_capped", "max_tokens=%d context=%d", max_tokens,
                    mc->max_seq_len);
    }

    smp_params sp;
    smp_params_defaults(&sp);
    sp.temperature = a->temperature;
    sp.top_k = a->top_k;
    sp.top_p = a->top_p;
    sp.seed = a->seed;
    sp.min_tokens = a->min_tokens;
    sp.ignore_eos = a->ignore_eos;
    sp.eos_id = eos;
    /* Stop ids: the config's further EOS ids, and BOS for llama2.c
     * checkpoints, since llama2.c stops when the model emits BOS; none with
     * --ignore-eos, which leaves max_tokens the only end. */
    int32_t stop_ids[MDL_MAX_EOS + 1];
    int n_stop = 0;
    if (!a->ignore_eos)
        for (int i = 0; i < mc->n_eos_extra; i++)
            stop_ids[n_stop++] = mc->eos_extra[i];
    if (mc->format == MDL_FORMAT_LLAMA2C && !a->ignore_eos) stop_ids[n_stop++] = bos;
    sp.stop_ids = stop_ids;
    sp.n_stop_ids = n_stop;

    /* The engine runtime the workers run, holding this one request: a pool
     * of exactly its blocks, prompt chunks of 512 tokens. */
    eng_config ec;
    eng_config_defaults(&ec);
    ec.backend = a->backend;
    ec.device = a->device;
    ec.n_threads = a->threads;
    ec.matmul = a->matmul;
    ec.kv_dtype = a->kv_dtype;
    ec.max_num_seqs = 1;
    ec.max_seqs = 1;
    ec.max_num_batched_tokens = 512;
    ec.max_model_len = (uint32_t)(n_prompt + (size_t)max_tokens);
    if (ec.max_model_len < 2) ec.max_model_len = 2;
    if (a->logits_out) {
        tap.f = fopen(a->logits_out, "wb");
        if (!tap.f) {
            rc = gen_fail(TD_EIO, "cannot write %s: %s", a->logits_out, strerror(errno));
            goto out;
        }
        ec.on_logits = gen_write_logits;
        ec.on_logits_arg = &tap;
    }
    char err[512] = "";
    rc = eng_open(m, &ec, &en, err, sizeof(err));
    if (rc != 0) {
        gen_fail(rc, "backend %s: %s", a->backend, err);
        goto out;
    }
    gen = malloc(((size_t)max_tokens + 1) * sizeof(int32_t));
    if (!gen) {
        rc = TD_ENOMEM;
        goto out;
    }
    if (tok) {
        rc = tok_stream_create(tok, &st);
        if (rc != 0) goto out;
        /* Prime the stream with the prompt so the first generated piece is
         * decoded in context (e.g. the space after BOS). */
        for (size_t i = 0; i < n_prompt; i++) {
            size_t w = 0;
            rc = tok_stream_push(st, prompt[i], piece, sizeof(piece), &w);
            if (rc != 0) {
                gen_fail(rc, "detokenizing prompt id %d: %s", prompt[i], td_strerror(rc));
                goto out;
            }
        }
    }

    int64_t t0 = td_now_ns(), t_first = t0;
    if (max_tokens > 0) {
        eng_request req = {.id = 1,
                           .prompt = prompt,
                           .n_prompt = (uint32_t)n_prompt,
                           .max_tokens = (uint32_t)max_tokens,
                           .sampling = sp};
        rc = eng_add(en, &req);
        if (rc != 0) {
            gen_fail(rc, "cannot start the request: %s", td_strerror(rc));
            goto out;
        }
    }
    for (int running = max_tokens > 0; running;) {
        const eng_event *evs;
        uint32_t n_evs;
        rc = eng_step(en, &evs, &n_evs, NULL);
        if (rc != 0) {
            gen_fail(rc, "engine step failed: %s", td_strerror(rc));
            goto out;
        }
        if (tap.err) {
            rc = gen_fail(tap.err, "short write to %s", a->logits_out);
            goto out;
        }
        for (uint32_t i = 0; i < n_evs; i++) {
            const eng_event *ev = &evs[i];
            if (ev->finish == ENG_FINISH_ERROR) {
                if (ev->err == TD_ERANGE)
                    rc = gen_fail(ev->err,
                                  "logits contain NaN at step %zu: the weights or the computation "
                                  "are not finite",
                                  n_gen);
                else
                    rc = gen_fail(ev->err, "generation failed at step %zu: %s", n_gen,
                                  td_strerror(ev->err));
                goto out;
            }
            if (n_gen == 0) t_first = td_now_ns();
            int32_t next = ev->token;
            gen[n_gen++] = next;
            if (ev->finish != ENG_FINISH_NONE) {
                running = 0;
                finish = ev->finish == ENG_FINISH_STOP ? SMP_STOP_EOS : SMP_STOP_LENGTH;
            }
            /* A stop token ends the text without being shown. */
            int is_stop_token = ev->finish == ENG_FINISH_STOP;
            if (st && !is_stop_token) {
                size_t w = 0;
                rc = tok_stream_push(st, next, piece, sizeof(piece), &w);
                if (rc != 0 && next >= tok_vocab_size(tok)) {
                    gen_fail(rc, "the model generated id %d, which the tokenizer (%d tokens) lacks",
                             next, tok_vocab_size(tok));
                    goto out;
                }
                if (rc != 0) {
                    gen_fail(rc, "detokenizing id %d: %s", next, td_strerror(rc));
                    goto out;
                }
                if (w > 0) {
                    if (text_len + w + 1 > text_cap) {
                        size_t cap = (text_cap ? text_cap * 2 : 4096) + w;
                        char *nt = realloc(text, cap);
                        if (!nt) {
                            rc = TD_ENOMEM;
                            goto out;
                        }
                        text = nt;
                        text_cap = cap;
                    }
                    memcpy(text + text_len, piece, w);
                    text_len += w;
                    text[text_len] = '\0';
                    size_t cut;
                    if (a->n_stops &&
                        tok_stop_find(text, text_len, a->stops, (size_t)a->n_stops, &cut)) {
                        text_len = cut;
                        text[cut] = '\0';
                        stopped_by_string = 1;
                    }
                    if (!a->json) {
                        /* Stream what can no longer become part of a stop string. */
                        size_t hold =
                            tok_stop_holdback(text, text_len, a->stops, (size_t)a->n_stops);
                        if (stopped_by_string) hold = 0;
                        if (text_len - hold > printed) {
                            fwrite(text + printed, 1, text_len - hold - printed, stdout);
                            fflush(stdout);
                            printed = text_len - hold;
                        }
                    }
                }
            }
            if (stopped_by_string && running) {
                (void)eng_abort(en, ev->id);
                running = 0;
            }
        }
    }
    int64_t t_end = td_now_ns();
    if (!a->json) {
        printf("\n");
        fflush(stdout);
    } else {
        print_json(prompt, n_prompt, gen, n_gen, text,
                   stopped_by_string ? "stop" : finish_name(finish), td_ns_to_ms(t_first - t0),
                   td_ns_to_ms(t_end - t_first));
    }
    if (n_gen > 1)
        td_log_info("generate", "done", "prompt_tokens=%zu tokens=%zu decode_tok_s=%.1f", n_prompt,
                    n_gen, (double)(n_gen - 1) / td_ns_to_s(t_end - t_first));
    rc = 0;
out:
    if (tap.f && fclose(tap.f) != 0 && rc == 0) rc = TD_EIO;
    tok_stream_free(st);
    eng_close(en);
    tok_free(tok);
    free(prompt);
    free(gen);
    free(text);
    return rc;
}

int main(int argc, char **argv)
{
    gen_args a;
    struct gen_opts o;
    cfg *opts = NULL;
    int prc = parse_args(argc, argv, &o, &a, &opts);
    if (prc == CFG_HELP) return 0;
    if (prc != 0) return 2;
    mdl_model *m = NULL;
    char err[512] = "";
    if (a.model) {
        int rc = mdl_load_ex(a.model, MDL_LOAD_KEEP_DTYPE, &m, err, sizeof(err));
        if (rc != 0) {
            fprintf(stderr, "tandem-generate: cannot load %s: %s (%s)\n", a.model, err,
                    td_err_name(rc));
            cfg_free(opts);
            return 1;
        }
    }
    int rc = a.bench ? gen_bench_run(m) : generate(&a, m);
    if (rc != 0 && !a.bench && !g_reported)
        fprintf(stderr, "tandem-generate: failed: %s (%s)\n", td_strerror(rc), td_err_name(rc));
    mdl_free(m);
    cfg_free(opts);
    return rc == 0 ? 0 : 1;
}

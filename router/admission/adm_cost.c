/* The cost model: its file, its defaults, and the TTFT / TPOT predictions
 * that queue_threshold and burst share. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "router/admission/adm_int.h"

/* One table of the file's keys, in file order. */
#define ADM__COST_FIELDS(X)                                                                        \
    X(prefill_us_fixed)                                                                            \
    X(prefill_us_per_token)                                                                        \
    X(prefill_us_per_token_ctx)                                                                    \
    X(decode_step_us_fixed)                                                                        \
    X(decode_step_us_per_seq)                                                                      \
    X(decode_step_us_per_ctx_token)                                                                \
    X(transfer_us_per_block)                                                                       \
    X(transfer_us_fixed)                                                                           \
    X(prefill_extra_when_decoding)                                                                 \
    X(decode_extra_when_prefilling)                                                                \
    X(host_slow_share)                                                                             \
    X(host_slow_factor)                                                                            \
    X(host_slow_mean_us)

static const struct {
    const char *key;
    size_t off;
} adm__cost_keys[] = {
#define ADM__COST_KEY(f) {#f, offsetof(adm_cost, f)},
    ADM__COST_FIELDS(ADM__COST_KEY)
#undef ADM__COST_KEY
};
#define ADM__N_COST_KEYS (sizeof(adm__cost_keys) / sizeof(adm__cost_keys[0]))

static double *adm__cost_field(adm_cost *c, size_t i)
{
    return (double *)((char *)c + adm__cost_keys[i].off);
}

void adm_cost_defaults(adm_cost *c)
{
    /* The 15m test model (dim 288, 6 layers), one compute thread per worker,
     * on the 2-core CPU host of docs/workers.md and docs/engine.md:
     * - prefill: 64 prompt tokens took 16,955 us (median, docs/workers.md) and
     *   a 200-token prompt about 48 ms of its 52.5 ms TTFT: a line through
     *   both gives 228 us/token + 2.4 ms per batch;
     * - decode steps at batch 1, 8 and 32 (280, 939, 1159 tok/s, prompt 16:
     *   3.6, 8.5 and 27.6 ms, docs/engine.md) fit 2.2 ms + 0.8 ms/sequence;
     *   attention over one context token is ~7 kflop (6 layers x 2 x 288
     *   x 2), 0.5 us at the ~14 GFLOP/s the kernels reach;
     * - KV transfer plus hand-off of 64 tokens (4 blocks of 16): 710 us. */
    *c = (adm_cost){
        .prefill_us_fixed = 2400.0,
        .prefill_us_per_token = 228.0,
        .decode_step_us_fixed = 2200.0,
        .decode_step_us_per_seq = 800.0,
        .decode_step_us_per_ctx_token = 0.5,
        .transfer_us_per_block = 178.0,
    };
}

bool adm__cost_valid(const adm_cost *c)
{
    adm_cost tmp = *c;
    for (size_t i = 0; i < ADM__N_COST_KEYS; i++) {
        double v = *adm__cost_field(&tmp, i);
        if (!isfinite(v) || v < 0) return false;
    }
    return true;
}

const char *adm_cost_host_problem(const adm_cost *c)
{
    if (c->host_slow_share <= 0 && c->host_slow_factor <= 0) return NULL;
    if (c->host_slow_share < 1 && c->host_slow_factor >= 1 && c->host_slow_mean_us > 0) return NULL;
    return "host_slow_share must be in [0, 1), host_slow_factor >= 1 and host_slow_mean_us > 0 "
           "when either of the first two is set";
}

bool adm__cost_knows_prefill(const adm_cost *c)
{
    return c->prefill_us_fixed + c->prefill_us_per_token > 0;
}

bool adm__cost_knows_decode(const adm_cost *c)
{
    return c->decode_step_us_fixed + c->decode_step_us_per_seq + c->decode_step_us_per_ctx_token >
           0;
}

/* ---- the file ---- */

static char *adm__trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    return s;
}

int adm_cost_load(const char *path, adm_cost *out, char *err, size_t errlen)
{
    if (!path || !out) return td_err_fail(err, errlen, TD_EINVAL, "no path");
    FILE *f = fopen(path, "r");
    if (!f) {
        int e = errno;
        return td_err_fail(err, errlen, td_err_from_errno(e), "%s: %s", path, strerror(e));
    }
    adm_cost c = {0};
    bool seen[ADM__N_COST_KEYS] = {false};
    char line[512];
    int rc = 0;
    for (unsigned lineno = 1; fgets(line, sizeof(line), f); lineno++) {
        if (!strchr(line, '\n') && !feof(f)) {
            rc = td_err_fail(err, errlen, TD_EFORMAT, "%s:%u: line too long", path, lineno);
            break;
        }
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        char *s = adm__trim(line);
        if (*s == '\0') continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            rc = td_err_fail(err, errlen, TD_EFORMAT, "%s:%u: expected key = value", path, lineno);
            break;
        }
        *eq = '\0';
        char *key = adm__trim(s), *val = adm__trim(eq + 1);
        size_t i = 0;
        while (i < ADM__N_COST_KEYS && strcmp(adm__cost_keys[i].key, key) != 0)
            i++;
        if (i == ADM__N_COST_KEYS) {
            rc = td_err_fail(err, errlen, TD_EFORMAT, "%s:%u: unknown key '%s'", path, lineno, key);
            break;
        }
        if (seen[i]) {
            rc = td_err_fail(err, errlen, TD_EFORMAT, "%s:%u: key '%s' given twice", path, lineno,
                             key);
            break;
        }
        char *end = NULL;
        errno = 0;
        double v = strtod(val, &end);
        if (*val == '\0' || *end != '\0' || errno == ERANGE || !isfinite(v) || v < 0) {
            rc = td_err_fail(err, errlen, TD_EFORMAT,
                             "%s:%u: bad value '%s' for key '%s' (a finite number >= 0)", path,
                             lineno, val, key);
            break;
        }
        seen[i] = true;
        *adm__cost_field(&c, i) = v;
    }
    if (rc == 0 && ferror(f)) rc = td_err_fail(err, errlen, TD_EIO, "%s: read error", path);
    const char *host = rc == 0 ? adm_cost_host_problem(&c) : NULL;
    if (host) rc = td_err_fail(err, errlen, TD_EFORMAT, "%s: %s", path, host);
    fclose(f);
    if (rc == 0) *out = c;
    return rc;
}

int adm_cost_save(const char *path, const adm_cost *c)
{
    if (!path || !c) return TD_EINVAL;
    FILE *f = fopen(path, "w");
    if (!f) return td_err_from_errno(errno);
    adm_cost tmp = *c;
    fprintf(f, "# tandem admission cost model, microseconds (docs/admission.md)\n");
    for (size_t i = 0; i < ADM__N_COST_KEYS; i++)
        fprintf(f, "%s = %.17g\n", adm__cost_keys[i].key, *adm__cost_field(&tmp, i));
    int rc = ferror(f) ? TD_EIO : 0;
    if (fclose(f) != 0 && rc == 0) rc = td_err_from_errno(errno);
    return rc;
}

/* ---- predictions ---- */

double adm__prefill_ahead(const adm_input *in, double extra_tokens)
{
    uint64_t a = in->queued_prefill_tokens > in->inflight_prefill_tokens
                     ? in->queued_prefill_tokens
                     : in->inflight_prefill_tokens;
    return (double)a + extra_tokens;
}

double adm__prefill_slowdown(const adm_cost *c, const adm_input *in)
{
    return in->running_seqs > 0 ? 1 + c->prefill_extra_when_decoding : 1;
}

double adm__prefill_wait_us(const adm_cost *c, const adm_input *in, double extra_tokens,
                            double extra_pairs)
{
    double ahead = adm__prefill_ahead(in, 0);
    if (ahead + extra_tokens <= 0) return 0;
    /* Attention pairs of the work ahead: the router's own prompts exactly;
     * tokens the heartbeats report beyond them (another router's) at the
     * router's mean pairs per token, or as one prompt when it has none. */
    double own = (double)in->inflight_prefill_tokens;
    double per_token = own > 0 ? (double)in->inflight_prefill_pairs / own : (ahead + 1) / 2;
    double pairs = (double)in->inflight_prefill_pairs + (ahead - own) * per_token + extra_pairs;
    double us =
        (ahead + extra_tokens) * c->prefill_us_per_token + pairs * c->prefill_us_per_token_ctx;
    return (us / (double)in->ready_prefill + c->prefill_us_fixed) * adm__prefill_slowdown(c, in);
}

double adm__prefill_own_us(const adm_cost *c, double prompt_tokens)
{
    return c->prefill_us_fixed + c->prefill_us_per_token * prompt_tokens +
           c->prefill_us_per_token_ctx * prompt_tokens * (prompt_tokens + 1) / 2;
}

/* Time until seqs (>= 1) sequences of each decode worker have left its
 * batch, at step_us a step with n sequences in it. From the router's own
 * sequences' remaining tokens when it has enough of them: the
 * (seqs * ready_decode)-th fewest, as the workers' batches share them out.
 * Otherwise a steady state: each of n sequences lives mean_out steps, so
 * one finishes every mean_out * step_us / n. */
static double adm__finish_us(const adm_input *in, double seqs, double mean_out, double step_us,
                             double n)
{
    double k = seqs * (in->ready_decode ? in->ready_decode : 1);
    if (in->own_remaining && k >= 1 && k <= in->n_own_remaining)
        return (double)in->own_remaining[(size_t)k - 1] * step_us;
    return seqs * fmax(mean_out, 1) * step_us / n;
}

void adm__predict(const adm_cost *c, const adm_input *in, double extra_tokens, double extra_pairs,
                  double extra_seqs, double mean_prompt, double mean_out, double prefill_share,
                  double slo_ttft_us, double slo_tpot_us, adm__pred *out)
{
    const double prompt = in->prompt_tokens, bs = in->block_size, n_dec = in->ready_decode;
    *out = (adm__pred){0};

    /* TTFT: the work ahead, then its own prefill batch and KV transfer. */
    double own_prefill = adm__prefill_own_us(c, prompt) * adm__prefill_slowdown(c, in);
    double prompt_blocks = bs > 0 ? ceil(prompt / bs) : 0;
    double transfer = c->transfer_us_fixed + prompt_blocks * c->transfer_us_per_block;
    out->wait_us = adm__prefill_wait_us(c, in, extra_tokens, extra_pairs);
    out->ttft_us = out->wait_us + own_prefill + transfer;
    out->ttft_budget_us = fmax(slo_ttft_us, own_prefill + transfer);

    /* TPOT: one step of a decode worker's batch with it added; the others'
     * sequences and context are spread evenly over the decode workers. The
     * others are the sequences on the decode workers now (running and
     * waiting, adm_fresh_load), each at the recent mean prompt plus half the
     * mean output (the used blocks are a heartbeat old): heartbeats come once a second, and every
     * request admitted since the last one is already on its way to a batch. Its own context is
     * taken at mid-generation. Co-located workers: the prefill work ahead of
     * it is done before its own prefill, so before it decodes; what runs
     * beside its steps is the prefill of later arrivals, prefill_share of
     * the time. */
    double seqs = (double)in->running_seqs + in->waiting_seqs;
    double others = (seqs + extra_seqs) / n_dec;
    double n = others + 1;
    double used_blocks = in->total_kv_blocks > in->free_kv_blocks
                             ? (double)(in->total_kv_blocks - in->free_kv_blocks)
                             : 0;
    double others_ctx = seqs * (mean_prompt + mean_out / 2);
    double own_ctx = prompt + in->max_tokens / 2.0;
    double ctx = others_ctx / n_dec + own_ctx;
    double share = prefill_share > 0 ? fmin(prefill_share, 1) : 0; /* also NaN */
    out->tpot_us = (c->decode_step_us_fixed + c->decode_step_us_per_seq * n +
                    c->decode_step_us_per_ctx_token * ctx) *
                   (1 + c->decode_extra_when_prefilling * share);
    out->tpot_budget_us = fmax(slo_tpot_us, c->decode_step_us_fixed + c->decode_step_us_per_seq +
                                                c->decode_step_us_per_ctx_token * own_ctx);

    /* KV: its prompt's blocks must be free on a decode worker. */
    double free_per_worker = (double)in->free_kv_blocks / n_dec;
    out->kv_short = bs > 0 && in->total_kv_blocks > 0 && prompt_blocks > free_per_worker;

    out->meets = out->ttft_us <= out->ttft_budget_us && out->tpot_us <= out->tpot_budget_us &&
                 !out->kv_short;
    if (out->meets) return;

    /* Drain: prefill excess goes at the prefill rate (what is ahead only
     * shrinks; later arrivals queue behind). Decode excess goes as sequences
     * finish (adm__finish_us). */
    double drain_prefill = fmax(0, out->ttft_us - out->ttft_budget_us);
    double drain_decode = 0;
    if (out->tpot_us > out->tpot_budget_us) {
        double per_seq = c->decode_step_us_per_seq + c->decode_step_us_per_ctx_token * ctx / n;
        double seqs = ceil((out->tpot_us - out->tpot_budget_us) / per_seq);
        drain_decode =
            seqs <= others + 1e-9 ? adm__finish_us(in, seqs, mean_out, out->tpot_us, n) : INFINITY;
    }
    if (out->kv_short) {
        double drain_kv = INFINITY;
        if (others > 0 && used_blocks > 0) {
            double blocks_per_seq = used_blocks / n_dec / others;
            double seqs = ceil((prompt_blocks - free_per_worker) / blocks_per_seq);
            drain_kv = adm__finish_us(in, seqs, mean_out, out->tpot_us, n);
        }
        drain_decode = fmax(drain_decode, drain_kv);
    }
    out->drain_us = fmax(drain_prefill, drain_decode);
}

uint32_t adm__retry_s(double drain_us)
{
    if (!(drain_us < (double)ADM_RETRY_MAX_S * 1e6)) return ADM_RETRY_MAX_S; /* also NaN */
    double s = ceil(drain_us / 1e6);
    return s < 1 ? 1 : (uint32_t)s;
}

void adm__admit(adm_decision *out, const char *reason)
{
    *out = (adm_decision){.verdict = ADM_ADMIT, .reason = reason};
}

void adm__reject(adm_decision *out, uint32_t retry_after_s, const char *reason)
{
    *out = (adm_decision){.verdict = ADM_REJECT,
                          .retry_after_s = retry_after_s ? retry_after_s : 1,
                          .reason = reason};
}

void adm__hold(adm_decision *out, int64_t until_ns, const char *reason)
{
    *out = (adm_decision){.verdict = ADM_HOLD, .hold_until_ns = until_ns, .reason = reason};
}

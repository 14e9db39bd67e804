/* tandem-tokenize: encode text or decode ids with any supported tokenizer.
 *
 *   tandem-tokenize PATH [--bos] [--special] TEXT      prints ids
 *   tandem-tokenize PATH --decode [--raw] ID...        prints text
 *   tandem-tokenize PATH --pieces [--bos] TEXT         prints id<TAB>piece lines
 *   tandem-tokenize PATH --bench N TEXT                encodes and decodes N times
 * TEXT of the form @FILE reads the text from FILE.
 */
#include "engine/tokenizer/tok.h"

#include "common/clock.h"
#include "common/err.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int usage(void)
{
    fprintf(stderr, "usage: tandem-tokenize PATH [--bos] [--special] [--pieces] TEXT|@FILE\n"
                    "       tandem-tokenize PATH --decode [--raw] ID...\n"
                    "       tandem-tokenize PATH --bench N TEXT|@FILE\n");
    return 2;
}

/* TEXT, or the contents of FILE for "@FILE"; *owned is set when malloc'd. */
static char *text_arg(const char *arg, size_t *len, char **owned)
{
    *owned = NULL;
    if (arg[0] != '@') {
        *len = strlen(arg);
        return (char *)arg;
    }
    FILE *f = fopen(arg + 1, "rb");
    if (f == NULL) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        char *b = realloc(buf, cap * 2);
        if (b == NULL) {
            free(buf);
            buf = NULL;
        }
        buf = b;
        cap *= 2;
    }
    fclose(f);
    *len = n;
    *owned = buf;
    return buf;
}

/* CPU time of this thread: on a shared machine, steadier than wall time. */
static int64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * TD_NS_PER_S + ts.tv_nsec;
}

static int bench(const tok_tokenizer *tok, long iters, const char *text, size_t len)
{
    /* with BOS where the model adds it, so the round trip can be exact */
    int flags = tok_adds_bos(tok) ? TOK_ADD_BOS : 0;
    int32_t *ids = NULL;
    size_t n = 0;
    int64_t w0 = td_now_ns(), t0 = cpu_ns();
    for (long i = 0; i < iters; i++) {
        free(ids);
        if (tok_encode(tok, text, len, flags, &ids, &n) < 0) return 1;
    }
    int64_t t1 = cpu_ns();
    char *out = NULL;
    size_t out_len = 0;
    for (long i = 0; i < iters; i++) {
        free(out);
        if (tok_decode(tok, ids, n, 1, &out, &out_len) < 0) return 1;
    }
    int64_t t2 = cpu_ns(), w2 = td_now_ns();
    double enc_s = td_ns_to_s(t1 - t0), dec_s = td_ns_to_s(t2 - t1);
    /* rates per CPU second of this thread */
    printf("bytes=%zu tokens=%zu iters=%ld encode_MBps=%.2f encode_tokens_per_s=%.0f "
           "decode_MBps=%.2f wall_over_cpu=%.2f roundtrip=%s\n",
           len, n, iters, (double)len * (double)iters / enc_s / 1e6,
           (double)n * (double)iters / enc_s, (double)len * (double)iters / dec_s / 1e6,
           td_ns_to_s(w2 - w0) / (enc_s + dec_s),
           out_len == len && memcmp(out, text, len) == 0 ? "exact" : "lossy");
    free(ids);
    free(out);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) return usage();
    char err[512];
    tok_tokenizer *tok = NULL;
    int rc = tok_load(argv[1], &tok, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "tandem-tokenize: %s (%s)\n", err, td_err_name(rc));
        return 1;
    }
    int decode = 0, flags = 0, pieces = 0, skip_special = 1, i = 2;
    long iters = 0;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (!strcmp(argv[i], "--decode"))
            decode = 1;
        else if (!strcmp(argv[i], "--bos"))
            flags |= TOK_ADD_BOS;
        else if (!strcmp(argv[i], "--special"))
            flags |= TOK_PARSE_SPECIAL;
        else if (!strcmp(argv[i], "--pieces"))
            pieces = 1;
        else if (!strcmp(argv[i], "--raw"))
            skip_special = 0;
        else if (!strcmp(argv[i], "--bench") && i + 1 < argc)
            iters = strtol(argv[++i], NULL, 10);
        else {
            tok_free(tok);
            return usage();
        }
    }
    int status = 0;
    if (decode) {
        size_t n = (size_t)(argc - i);
        int32_t *ids = calloc(n ? n : 1, sizeof(int32_t));
        if (ids == NULL) {
            tok_free(tok);
            return 1;
        }
        for (size_t k = 0; k < n; k++)
            ids[k] = (int32_t)strtol(argv[i + (int)k], NULL, 10);
        char *text = NULL;
        size_t len = 0;
        rc = tok_decode(tok, ids, n, skip_special, &text, &len);
        if (rc < 0) {
            fprintf(stderr, "tandem-tokenize: decode: %s\n", td_strerror(rc));
            status = 1;
        } else {
            fwrite(text, 1, len, stdout);
            fputc('\n', stdout);
        }
        free(text);
        free(ids);
    } else {
        if (i >= argc) {
            tok_free(tok);
            return usage();
        }
        size_t text_len;
        char *owned;
        const char *text = text_arg(argv[i], &text_len, &owned);
        if (text == NULL) {
            fprintf(stderr, "tandem-tokenize: cannot read %s\n", argv[i] + 1);
            tok_free(tok);
            return 1;
        }
        if (iters > 0) {
            status = bench(tok, iters, text, text_len);
            free(owned);
            tok_free(tok);
            return status;
        }
        int32_t *ids = NULL;
        size_t n = 0;
        rc = tok_encode(tok, text, text_len, flags, &ids, &n);
        free(owned);
        if (rc < 0) {
            fprintf(stderr, "tandem-tokenize: encode: %s\n", td_strerror(rc));
            status = 1;
        }
        for (size_t k = 0; k < n; k++) {
            if (pieces) {
                const char *p;
                size_t pl;
                tok_piece(tok, ids[k], &p, &pl);
                printf("%d\t%.*s\n", ids[k], (int)pl, p);
            } else {
                printf("%s%d", k ? " " : "", ids[k]);
            }
        }
        if (!pieces) printf("\n");
        free(ids);
    }
    tok_free(tok);
    return status;
}

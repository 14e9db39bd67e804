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
#include "common/config.h"
#include "common/err.h"

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct tok_cli_opts {
    bool decode, bos, special, pieces, raw;
    int64_t bench;
};

#define TOK_OPT(name, type, def, min, help, field)                                                 \
    {                                                                                              \
        name, type, def, min, NULL, NULL, help, offsetof(struct tok_cli_opts, field), 0            \
    }

static const struct cfg_option tok_table[] = {
    TOK_OPT("decode", CFG_BOOL, "false", NULL, "Decode the ID... arguments to text", decode),
    TOK_OPT("raw", CFG_BOOL, "false", NULL, "With --decode: keep special tokens in the text", raw),
    TOK_OPT("bos", CFG_BOOL, "false", NULL, "Encode with BOS first", bos),
    TOK_OPT("special", CFG_BOOL, "false", NULL, "Parse special-token text as special tokens",
            special),
    TOK_OPT("pieces", CFG_BOOL, "false", NULL, "Print id<TAB>piece lines", pieces),
    TOK_OPT("bench", CFG_INT64, "0", "0", "Encode and decode TEXT N times and print rates", bench),
};
#define TOK_NOPTS (sizeof(tok_table) / sizeof(tok_table[0]))

static const char tok_notes[] =
    "\nusage: tandem-tokenize PATH [--bos] [--special] [--pieces] TEXT|@FILE\n"
    "       tandem-tokenize PATH --decode [--raw] ID...\n"
    "       tandem-tokenize PATH --bench N TEXT|@FILE\n"
    "Options come between PATH and the TEXT or IDs, which are taken as given\n"
    "(even when they start with '-'). --config FILE uses the format of\n"
    "common/config.h.\n";

static int usage(void)
{
    fputs(tok_notes + 1, stderr);
    return 2;
}

/* The options end at the first argument after PATH that is neither a flag
 * nor a flag's value, or at "--": TEXT may start with '-'. Returns how many
 * arguments cfg_parse gets; *rest: the index of the first TEXT/ID. */
static int options_end(int argc, char **argv, int *rest)
{
    int i = 2;
    while (i < argc && strncmp(argv[i], "--", 2) == 0) {
        if (argv[i][2] == '\0') {
            *rest = i + 1;
            return i;
        }
        const char *name = argv[i] + 2;
        bool takes_value = !strchr(name, '=') && strcmp(name, "help") != 0;
        if (takes_value && strcmp(name, "config") != 0) {
            takes_value = false;
            for (size_t k = 0; k < TOK_NOPTS; k++)
                if (strcmp(tok_table[k].name, name) == 0)
                    takes_value = tok_table[k].type != CFG_BOOL;
        }
        i += takes_value ? 2 : 1;
    }
    if (i > argc) i = argc;
    *rest = i;
    return i;
}

/* Largest @FILE read (a file without end, such as /dev/zero, stops here). */
#define TOK_CLI_MAX_TEXT ((size_t)256 << 20)

/* TEXT, or the contents of FILE for "@FILE"; *owned is set when malloc'd.
 * NULL with errno set when FILE cannot be read (EFBIG past TOK_CLI_MAX_TEXT). */
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
        if (cap >= TOK_CLI_MAX_TEXT) {
            free(buf);
            buf = NULL;
            errno = EFBIG;
            break;
        }
        char *b = realloc(buf, cap * 2);
        if (b == NULL) {
            free(buf);
            errno = ENOMEM;
        }
        buf = b;
        cap *= 2;
    }
    int e = errno;
    fclose(f);
    errno = e;
    *len = n;
    *owned = buf;
    return buf;
}

static int bench(const tok_tokenizer *tok, long iters, const char *text, size_t len)
{
    /* with BOS where the model adds it, so the round trip can be exact */
    int flags = tok_adds_bos(tok) ? TOK_ADD_BOS : 0;
    int32_t *ids = NULL;
    size_t n = 0;
    int64_t w0 = td_now_ns(), t0 = td_thread_cpu_ns();
    for (long i = 0; i < iters; i++) {
        free(ids);
        int rc = tok_encode(tok, text, len, flags, &ids, &n);
        if (rc < 0) {
            fprintf(stderr, "tandem-tokenize: bench: encode: %s\n", td_strerror(rc));
            return 1;
        }
    }
    int64_t t1 = td_thread_cpu_ns();
    char *out = NULL;
    size_t out_len = 0;
    for (long i = 0; i < iters; i++) {
        free(out);
        int rc = tok_decode(tok, ids, n, 1, &out, &out_len);
        if (rc < 0) {
            fprintf(stderr, "tandem-tokenize: bench: decode: %s\n", td_strerror(rc));
            free(ids);
            return 1;
        }
    }
    int64_t t2 = td_thread_cpu_ns(), w2 = td_now_ns();
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

/* Encodes args[0] (TEXT or @FILE) or decodes the nargs ids in args, as the
 * options say, printing to stdout. Returns the exit status. */
static int run(const tok_tokenizer *tok, int decode, int flags, int pieces, int skip_special,
               long iters, int nargs, char *const *args)
{
    int rc;
    int status = 0;
    if (decode) {
        size_t n = (size_t)nargs;
        int32_t *ids = calloc(n ? n : 1, sizeof(int32_t));
        if (ids == NULL) {
            fprintf(stderr, "tandem-tokenize: out of memory\n");
            return 1;
        }
        for (size_t k = 0; k < n; k++) {
            int prc = tok_parse_id(args[k], strlen(args[k]), tok_vocab_size(tok), &ids[k]);
            if (prc == TD_ERANGE) {
                fprintf(stderr, "tandem-tokenize: id '%s' is outside the vocabulary (0..%d)\n",
                        args[k], tok_vocab_size(tok) - 1);
            } else if (prc < 0) {
                fprintf(stderr, "tandem-tokenize: '%s' is not a token id (a decimal number)\n",
                        args[k]);
            }
            if (prc < 0) {
                free(ids);
                return 1;
            }
        }
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
        size_t text_len;
        char *owned;
        const char *text = text_arg(args[0], &text_len, &owned);
        if (text == NULL) {
            fprintf(stderr, "tandem-tokenize: cannot read %s: %s\n", args[0] + 1,
                    errno == EFBIG ? "larger than 256 MiB" : strerror(errno));
            return 1;
        }
        if (iters > 0) {
            status = bench(tok, iters, text, text_len);
            free(owned);
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
    return status;
}

int main(int argc, char **argv)
{
    struct tok_cli_opts o;
    cfg *c = NULL;
    if (cfg_create(&c, "tandem-tokenize PATH", tok_table, TOK_NOPTS, &o) != 0) {
        fprintf(stderr, "tandem-tokenize: out of memory\n");
        return 1;
    }
    int end = argc, first = argc;
    if (argc >= 2) end = options_end(argc, argv, &first);
    /* argv[1] (PATH) is a positional of cfg_parse; TEXT/IDs from argv[first]
     * on are not parsed at all. */
    int rc = cfg_parse(c, end, argv);
    if (rc == CFG_HELP) {
        printf("%s%s", cfg_help(c), tok_notes);
        cfg_free(c);
        return 0;
    }
    int npos = 0;
    char *const *pos = cfg_positional(c, &npos);
    if (rc != 0) {
        fprintf(stderr, "tandem-tokenize: %s\n", cfg_error(c));
        cfg_free(c);
        return 2;
    }
    /* Decoding zero ids is fine; encoding needs TEXT. */
    if (npos != 1 || (!o.decode && first >= argc)) {
        cfg_free(c);
        return usage();
    }
    char *const *rest = argv + first;
    int nrest = argc - first;
    char err[512];
    tok_tokenizer *tok = NULL;
    rc = tok_load(pos[0], &tok, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "tandem-tokenize: %s (%s)\n", err, td_err_name(rc));
        cfg_free(c);
        return 1;
    }
    if (o.bos && !o.decode && tok_bos_id(tok) < 0) {
        /* Prepending some other id would silently change the text. */
        fprintf(stderr,
                "tandem-tokenize: --bos: %s has no BOS token (its configs name none that the "
                "vocabulary holds)\n",
                pos[0]);
        tok_free(tok);
        cfg_free(c);
        return 1;
    }
    int decode = o.decode, pieces = o.pieces, skip_special = !o.raw;
    int flags = (o.bos ? TOK_ADD_BOS : 0) | (o.special ? TOK_PARSE_SPECIAL : 0);
    long iters = (long)o.bench;
    int status = run(tok, decode, flags, pieces, skip_special, iters, nrest, rest);
    tok_free(tok);
    cfg_free(c);
    return status;
}

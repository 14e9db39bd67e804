/* tandem-tokenize: encode text or decode ids with any supported tokenizer.
 *
 *   tandem-tokenize PATH [--bos] [--special] TEXT      prints ids
 *   tandem-tokenize PATH --decode [--raw] ID...        prints text
 *   tandem-tokenize PATH --pieces [--bos] TEXT         prints id<TAB>piece lines
 */
#include "engine/tokenizer/tok.h"

#include "common/err.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int usage(void)
{
    fprintf(stderr, "usage: tandem-tokenize PATH [--bos] [--special] [--pieces] TEXT\n"
                    "       tandem-tokenize PATH --decode [--raw] ID...\n");
    return 2;
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
        int32_t *ids = NULL;
        size_t n = 0;
        rc = tok_encode(tok, argv[i], strlen(argv[i]), flags, &ids, &n);
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

/* make-test-model: writes a random, deterministic Llama-family checkpoint in
 * a real on-disk format, for tests and benchmarks.
 *
 *   make-test-model --format hf|llama2c --shape NAME --dtype f32|f16|bf16
 *                   --seed N --out PATH [--shards K]
 *
 * hf: PATH is a directory (created) with config.json, model.safetensors (or K
 * shards and an index), tokenizer.json, tokenizer_config.json and
 * generation_config.json. llama2c: PATH is the .bin file; tokenizer.bin is
 * written beside it. The same seed and shape give the same function in both
 * formats. See docs/test-models.md. */
#include "tools/mtm.h"

#include "common/err.h"

#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f, "usage: make-test-model --format hf|llama2c --shape NAME --dtype f32|f16|bf16\n"
               "                       --seed N --out PATH [--shards K]\n"
               "       make-test-model --list-shapes\n"
               "hf writes a directory at PATH; llama2c writes PATH and tokenizer.bin beside it\n"
               "(f32 only). --shards K (hf only) splits the weights into K safetensors files.\n");
}

static void list_shapes(FILE *f)
{
    fprintf(f, "%-13s %5s %6s %6s %5s %5s %6s %5s %5s  %s\n", "shape", "dim", "hidden", "layers",
            "heads", "kv", "vocab", "seq", "hd", "about");
    for (const mtm_shape *s = mtm_shapes; s->name; s++)
        fprintf(f, "%-13s %5d %6d %6d %5d %5d %6d %5d %5d  %s\n", s->name, s->dim, s->hidden,
                s->n_layers, s->n_heads, s->n_kv_heads, s->vocab, s->seq_len, s->head_dim,
                s->about);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"format", required_argument, NULL, 'f'},
        {"shape", required_argument, NULL, 's'},
        {"dtype", required_argument, NULL, 'd'},
        {"seed", required_argument, NULL, 'r'},
        {"out", required_argument, NULL, 'o'},
        {"shards", required_argument, NULL, 'k'},
        {"list-shapes", no_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *format = NULL, *shape_name = NULL, *dtype = "f32", *seed_text = NULL, *out = NULL,
               *shards_text = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'f':
            format = optarg;
            break;
        case 's':
            shape_name = optarg;
            break;
        case 'd':
            dtype = optarg;
            break;
        case 'r':
            seed_text = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'k':
            shards_text = optarg;
            break;
        case 'l':
            list_shapes(stdout);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "make-test-model: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (!format || !shape_name || !seed_text || !out) {
        fprintf(stderr, "make-test-model: --format, --shape, --seed and --out are required\n");
        usage(stderr);
        return 2;
    }

    const mtm_shape *shape = mtm_shape_find(shape_name);
    if (!shape) {
        fprintf(stderr, "make-test-model: unknown shape '%s'; known shapes:\n", shape_name);
        list_shapes(stderr);
        return 2;
    }
    enum mtm_dtype dt;
    if (strcmp(dtype, "f32") == 0)
        dt = MTM_F32;
    else if (strcmp(dtype, "f16") == 0)
        dt = MTM_F16;
    else if (strcmp(dtype, "bf16") == 0)
        dt = MTM_BF16;
    else {
        fprintf(stderr, "make-test-model: unknown dtype '%s' (expected f32, f16 or bf16)\n", dtype);
        return 2;
    }
    char *end = NULL;
    errno = 0;
    unsigned long long seed = strtoull(seed_text, &end, 0);
    if (errno != 0 || end == seed_text || *end != '\0' || seed_text[0] == '-') {
        fprintf(stderr, "make-test-model: --seed '%s' is not a non-negative 64-bit integer\n",
                seed_text);
        return 2;
    }
    long shards = 1;
    if (shards_text) {
        errno = 0;
        shards = strtol(shards_text, &end, 10);
        if (errno != 0 || end == shards_text || *end != '\0' || shards < 1 || shards > 99999) {
            fprintf(stderr, "make-test-model: --shards '%s' is not an integer in [1, 99999]\n",
                    shards_text);
            return 2;
        }
    }

    int rc;
    if (strcmp(format, "hf") == 0) {
        rc = mtm_write_hf(shape, (uint64_t)seed, dt, (int)shards, out);
    } else if (strcmp(format, "llama2c") == 0) {
        if (dt != MTM_F32) {
            fprintf(stderr,
                    "make-test-model: the llama2c format stores f32 only (got --dtype %s)\n",
                    dtype);
            return 2;
        }
        if (shards_text && shards != 1) {
            fprintf(stderr, "make-test-model: --shards applies to the hf format only\n");
            return 2;
        }
        rc = mtm_write_llama2c(shape, (uint64_t)seed, out);
    } else {
        fprintf(stderr, "make-test-model: unknown format '%s' (expected hf or llama2c)\n", format);
        return 2;
    }
    if (rc != 0) {
        fprintf(stderr, "make-test-model: failed: %s\n", td_strerror(rc));
        return rc == TD_EINVAL || rc == TD_EUNSUPPORTED ? 2 : 1;
    }
    return 0;
}

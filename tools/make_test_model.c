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

#include "common/config.h"
#include "common/err.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mtm_opts {
    const char *format, *shape, *dtype, *out;
    int64_t seed, shards;
    bool list_shapes;
};

#define MTM_OPT(name, type, def, min, max, choices, help, field)                                   \
    {                                                                                              \
        name, type, def, min, max, choices, help, offsetof(struct mtm_opts, field), 0              \
    }

static const struct cfg_option mtm_table[] = {
    MTM_OPT("format", CFG_STRING, NULL, NULL, NULL, "hf|llama2c",
            "hf: a directory at --out; llama2c: the .bin at --out, tokenizer.bin beside it",
            format),
    MTM_OPT("shape", CFG_STRING, NULL, NULL, NULL, NULL, "Model shape (see --list-shapes)", shape),
    MTM_OPT("dtype", CFG_STRING, "f32", NULL, NULL, "f32|f16|bf16",
            "Weight type (llama2c: f32 only)", dtype),
    MTM_OPT("seed", CFG_INT64, NULL, "0", NULL, NULL, "Random seed (same seed, same weights)",
            seed),
    MTM_OPT("out", CFG_STRING, NULL, NULL, NULL, NULL, "Output path", out),
    MTM_OPT("shards", CFG_INT64, "1", "1", "99999", NULL,
            "hf only: split the weights into K safetensors files", shards),
    MTM_OPT("list-shapes", CFG_BOOL, "false", NULL, NULL, NULL, "Print the known shapes and exit",
            list_shapes),
};

static const char mtm_notes[] =
    "\nExample: make-test-model --format hf --shape tiny --dtype f32 --seed 1 --out DIR\n"
    "--format, --shape, --seed and --out are required (unless --list-shapes).\n"
    "The --config file uses the format of common/config.h (KEY = VALUE lines).\n";

static void list_shapes(FILE *f)
{
    fprintf(f, "%-13s %5s %6s %6s %5s %5s %6s %5s %5s  %s\n", "shape", "dim", "hidden", "layers",
            "heads", "kv", "vocab", "seq", "hd", "about");
    for (const mtm_shape *s = mtm_shapes; s->name; s++)
        fprintf(f, "%-13s %5d %6d %6d %5d %5d %6d %5d %5d  %s\n", s->name, s->dim, s->hidden,
                s->n_layers, s->n_heads, s->n_kv_heads, s->vocab, s->seq_len, s->head_dim,
                s->about);
}

/* Writes the model o describes. Returns the exit status. */
static int mtm_run(const struct mtm_opts *o)
{
    const mtm_shape *shape = mtm_shape_find(o->shape);
    if (!shape) {
        fprintf(stderr, "make-test-model: unknown shape '%s'; known shapes:\n", o->shape);
        list_shapes(stderr);
        return 2;
    }
    enum mtm_dtype dt;
    if (strcmp(o->dtype, "f32") == 0)
        dt = MTM_F32;
    else if (strcmp(o->dtype, "f16") == 0)
        dt = MTM_F16;
    else if (strcmp(o->dtype, "bf16") == 0)
        dt = MTM_BF16;
    else {
        fprintf(stderr, "make-test-model: unknown dtype '%s' (expected f32, f16 or bf16)\n",
                o->dtype);
        return 2;
    }
    int rc;
    if (strcmp(o->format, "hf") == 0) {
        rc = mtm_write_hf(shape, (uint64_t)o->seed, dt, (int)o->shards, o->out);
    } else if (strcmp(o->format, "llama2c") == 0) {
        if (dt != MTM_F32) {
            fprintf(stderr,
                    "make-test-model: the llama2c format stores f32 only (got --dtype %s)\n",
                    o->dtype);
            return 2;
        }
        if (o->shards != 1) {
            fprintf(stderr, "make-test-model: --shards applies to the hf format only\n");
            return 2;
        }
        rc = mtm_write_llama2c(shape, (uint64_t)o->seed, o->out);
    } else {
        fprintf(stderr, "make-test-model: unknown format '%s' (expected hf or llama2c)\n",
                o->format);
        return 2;
    }
    if (rc != 0) {
        fprintf(stderr, "make-test-model: failed: %s\n", td_strerror(rc));
        return rc == TD_EINVAL || rc == TD_EUNSUPPORTED ? 2 : 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct mtm_opts o;
    cfg *c = NULL;
    if (cfg_create(&c, "make-test-model", mtm_table, sizeof(mtm_table) / sizeof(mtm_table[0]),
                   &o) != 0)
        return 1;
    int rc = cfg_parse(c, argc, argv);
    int npos = 0;
    char *const *pos = cfg_positional(c, &npos);
    int status = 2;
    if (rc == CFG_HELP) {
        printf("%s%s", cfg_help(c), mtm_notes);
        status = 0;
    } else if (rc != 0) {
        fprintf(stderr, "make-test-model: %s\n", cfg_error(c));
    } else if (npos > 0) {
        fprintf(stderr, "make-test-model: unexpected argument '%s' (see --help)\n", pos[0]);
    } else if (o.list_shapes) {
        list_shapes(stdout);
        status = 0;
    } else if (!o.format || !o.shape || !o.out || strcmp(cfg_source(c, "seed"), "default") == 0) {
        /* Not CFG_REQUIRED in the table: --list-shapes needs none of them. */
        fprintf(stderr, "make-test-model: --format, --shape, --seed and --out are required\n");
    } else {
        status = mtm_run(&o);
    }
    cfg_free(c);
    return status;
}

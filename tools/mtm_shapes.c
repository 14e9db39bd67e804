/* mtm_shapes: the table of model shapes make-test-model knows. */
#include "tools/mtm.h"

#include <string.h>

/* clang-format off */
const mtm_shape mtm_shapes[] = {
    /* name         arch             dim hidden L  H  KV vocab  seq  hd  theta  eps  tied bias */
    {"tiny",        MTM_ARCH_LLAMA,   64, 172, 2, 4, 2,   512, 256, 16, 1e4, 1e-5, 1, 0,
     "Llama, GQA 4:2, tied classifier"},
    {"tiny-mha",    MTM_ARCH_LLAMA,   64, 172, 2, 4, 4,   512, 256, 16, 1e4, 1e-5, 1, 0,
     "Llama, multi-head attention (n_kv == n_heads)"},
    {"tiny-untied", MTM_ARCH_LLAMA,   64, 172, 2, 4, 2,   512, 256, 16, 1e4, 1e-5, 0, 0,
     "Llama, GQA 4:2, separate lm_head"},
    {"tiny-qwen2",  MTM_ARCH_QWEN2,   64, 172, 2, 4, 2,   512, 256, 16, 1e6, 1e-6, 0, 1,
     "Qwen2, q/k/v biases, untied, rope_theta 1e6"},
    {"tiny-mistral",MTM_ARCH_MISTRAL, 64, 172, 2, 4, 2,   512, 256, 32, 1e4, 1e-5, 1, 0,
     "Mistral, head_dim 32 != dim/n_heads (q width 128)"},
    {"15m",         MTM_ARCH_LLAMA,  288, 768, 6, 6, 6, 32000, 256, 48, 1e4, 1e-5, 1, 0,
     "llama2.c stories15M geometry, tied, vocab 32000"},
    {"15m-4k",      MTM_ARCH_LLAMA,  288, 768, 6, 6, 6, 32000, 4096, 48, 1e4, 1e-5, 1, 0,
     "15m with a 4,096-token context, for replaying real traces"},
    {"tiny-4k",     MTM_ARCH_LLAMA,   64, 172, 2, 4, 2,   512, 4096, 16, 1e4, 1e-5, 1, 0,
     "tiny with a 4,096-token context, for replaying real traces"},
    {NULL, MTM_ARCH_LLAMA, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL},
};
/* clang-format on */

const mtm_shape *mtm_shape_find(const char *name)
{
    for (const mtm_shape *s = mtm_shapes; s->name; s++)
        if (strcmp(s->name, name) == 0) return s;
    return NULL;
}

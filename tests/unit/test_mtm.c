/* Unit tests for make-test-model's internals (tools/mtm.h): half-precision
 * rounding, the RoPE row permutation, deterministic weights and the BPE
 * vocabulary. The files themselves are checked by
 * tests/integration/test_make_test_model.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "tools/mtm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static float f32_of_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Independent half decoder, used to check rounding is to the nearest value. */
static double f16_value(uint16_t h)
{
    int e = (h >> 10) & 0x1F, m = h & 0x3FF;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}

static void test_f16_known_values(void **state)
{
    (void)state;
    assert_int_equal(mtm_f32_to_f16(1.0f), 0x3C00);
    assert_int_equal(mtm_f32_to_f16(-2.0f), 0xC000);
    assert_int_equal(mtm_f32_to_f16(0.0f), 0x0000);
    assert_int_equal(mtm_f32_to_f16(-0.0f), 0x8000);
    assert_int_equal(mtm_f32_to_f16(65504.0f), 0x7BFF);
    assert_int_equal(mtm_f32_to_f16(65519.0f), 0x7BFF); /* below the rounding edge */
    assert_int_equal(mtm_f32_to_f16(65520.0f), 0x7C00); /* rounds to infinity */
    assert_int_equal(mtm_f32_to_f16(0.1f), 0x2E66);
    assert_int_equal(mtm_f32_to_f16(1.0f + 0x1p-11f), 0x3C00);     /* tie, to even */
    assert_int_equal(mtm_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3C02); /* tie, to even */
    assert_int_equal(mtm_f32_to_f16(0x1p-14f), 0x0400);            /* smallest normal */
    assert_int_equal(mtm_f32_to_f16(0x1p-24f), 0x0001);            /* smallest subnormal */
    assert_int_equal(mtm_f32_to_f16(0x1p-25f), 0x0000);            /* tie, to even (0) */
    assert_int_equal(mtm_f32_to_f16(3 * 0x1p-25f), 0x0002);        /* tie, to even (2) */
    assert_int_equal(mtm_f32_to_f16(0x1.8p-24f), 0x0002);
    assert_int_equal(mtm_f32_to_f16(0x1p-14f - 0x1p-24f), 0x03FF); /* largest subnormal */
    assert_int_equal(mtm_f32_to_f16(f32_of_bits(0x7F800000u)), 0x7C00);
    assert_int_equal(mtm_f32_to_f16(f32_of_bits(0x7FC00000u)) & 0x7E00, 0x7E00);
}

static void test_f16_rounds_to_nearest(void **state)
{
    (void)state;
    /* Every float32 exponent in half's range and beyond, many mantissas. */
    for (uint32_t u = 0x30000000u; u < 0x47800000u; u += 0x1357u) {
        float f = f32_of_bits(u);
        uint16_t h = mtm_f32_to_f16(f);
        double err = fabs(f16_value(h) - f);
        if (h > 0) assert_true(err <= fabs(f16_value((uint16_t)(h - 1)) - f));
        if (h < 0x7BFF) assert_true(err <= fabs(f16_value((uint16_t)(h + 1)) - f));
        assert_int_equal(mtm_f32_to_f16(-f), h | 0x8000);
    }
}

static void test_bf16(void **state)
{
    (void)state;
    assert_int_equal(mtm_f32_to_bf16(1.0f), 0x3F80);
    assert_int_equal(mtm_f32_to_bf16(-1.0f), 0xBF80);
    assert_int_equal(mtm_f32_to_bf16(f32_of_bits(0x3F808000u)), 0x3F80); /* tie, to even */
    assert_int_equal(mtm_f32_to_bf16(f32_of_bits(0x3F818000u)), 0x3F82); /* tie, to even */
    assert_int_equal(mtm_f32_to_bf16(f32_of_bits(0x3F808001u)), 0x3F81);
    assert_int_equal(mtm_f32_to_bf16(f32_of_bits(0x7F7FFFFFu)), 0x7F80); /* max rounds to inf */
    uint16_t nan = mtm_f32_to_bf16(f32_of_bits(0x7F800001u));
    assert_true((nan & 0x7F80) == 0x7F80 && (nan & 0x007F) != 0); /* still a NaN */
}

static void test_permute_rope_rows(void **state)
{
    (void)state;
    /* 2 heads of head_dim 4, 2 columns: per head, HF rows (0,1,2,3) come
     * from llama2.c rows (0,2,1,3). */
    float src[16], dst[16];
    for (int i = 0; i < 16; i++)
        src[i] = (float)i;
    mtm_permute_rope_rows(src, dst, 2, 4, 2);
    static const int row_from[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    for (int r = 0; r < 8; r++)
        for (int c = 0; c < 2; c++)
            assert_true(dst[r * 2 + c] == src[row_from[r] * 2 + c]);
}

static uint64_t fnv1a_bytes(const void *p, size_t n, uint64_t h)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static void test_weights_deterministic_and_scaled(void **state)
{
    (void)state;
    const mtm_shape *s = mtm_shape_find("tiny");
    assert_non_null(s);
    size_t rows, cols;
    mtm_tensor_dims(s, MTM_T_EMBED, &rows, &cols);
    assert_int_equal(rows, 512);
    assert_int_equal(cols, 64);
    size_t n = rows * cols;
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    assert_non_null(a);
    assert_non_null(b);

    mtm_tensor_fill(s, 1, MTM_T_EMBED, -1, a);
    mtm_tensor_fill(s, 1, MTM_T_EMBED, -1, b);
    assert_memory_equal(a, b, n * sizeof *a);
    mtm_tensor_fill(s, 2, MTM_T_EMBED, -1, b);
    assert_memory_not_equal(a, b, n * sizeof *a);

    double sum = 0, sq = 0;
    for (size_t i = 0; i < n; i++)
        sum += a[i], sq += (double)a[i] * a[i];
    double mean = sum / (double)n, sd = sqrt(sq / (double)n - mean * mean);
    assert_true(fabs(mean) < 0.002);
    assert_true(sd > 0.028 && sd < 0.032);

    /* Per-layer tensors differ between layers and kinds. */
    mtm_tensor_fill(s, 1, MTM_T_WQ, 0, a);
    mtm_tensor_fill(s, 1, MTM_T_WQ, 1, b);
    assert_memory_not_equal(a, b, 64 * 64 * sizeof *a);
    mtm_tensor_fill(s, 1, MTM_T_WK, 0, b);
    assert_memory_not_equal(a, b, 64 * 32 * sizeof *a);

    mtm_tensor_fill(s, 1, MTM_T_FINAL_NORM, -1, a);
    for (int i = 0; i < 64; i++)
        assert_true(a[i] > 0.75f && a[i] < 1.25f);

    /* Golden checksum of every tensor of tiny, seed 1: the weights are a
     * contract across machines and versions (tests and benchmarks compare
     * against numbers measured on them). Change only on purpose. */
    uint64_t h = 0xcbf29ce484222325ull;
    for (int k = 0; k < MTM_T_COUNT; k++) {
        mtm_tensor_dims(s, (enum mtm_tensor)k, &rows, &cols);
        for (int l = -1; l < s->n_layers; l++) {
            mtm_tensor_fill(s, 1, (enum mtm_tensor)k, l, a);
            h = fnv1a_bytes(a, rows * cols * sizeof *a, h);
        }
    }
    print_message("weights checksum 0x%016llx\n", (unsigned long long)h);
    assert_true(h == 0x7957d73fb63d64e5ull);
    free(a);
    free(b);
}

static void test_vocab(void **state)
{
    (void)state;
    static const int sizes[] = {259, 512, 32000};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        mtm_vocab v, w;
        assert_int_equal(mtm_vocab_build(sizes[k], 7, &v), 0);
        assert_int_equal(mtm_vocab_build(sizes[k], 7, &w), 0);
        assert_int_equal(v.n, sizes[k]);
        assert_string_equal(v.piece[1], "<s>");
        assert_string_equal(v.piece[2], "</s>");
        for (int b = 0; b < 256; b++) {
            assert_int_equal(v.len[3 + b], 1);
            assert_int_equal((unsigned char)v.piece[3 + b][0], b);
        }
        for (int id = MTM_VOCAB_FIRST_MERGE; id < v.n; id++) {
            const int *m = v.merge[id - MTM_VOCAB_FIRST_MERGE];
            assert_true(m[0] >= 3 && m[0] < id && m[1] >= 3 && m[1] < id);
            assert_int_equal(v.len[id], v.len[m[0]] + v.len[m[1]]);
            assert_memory_equal(v.piece[id], v.piece[m[0]], (size_t)v.len[m[0]]);
            assert_memory_equal(v.piece[id] + v.len[m[0]], v.piece[m[1]], (size_t)v.len[m[1]]);
            for (int i = 0; i < v.len[id]; i++) /* printable ASCII: llama2.c can hold it */
                assert_true(v.piece[id][i] >= 0x20 && v.piece[id][i] < 0x7F);
            assert_int_equal(w.len[id], v.len[id]);
            assert_memory_equal(w.piece[id], v.piece[id], (size_t)v.len[id]);
        }
        /* All pieces distinct (sorted check on a copy of pointers). */
        if (v.n <= 512)
            for (int i = 3; i < v.n; i++)
                for (int j = i + 1; j < v.n; j++)
                    assert_false(v.len[i] == v.len[j] &&
                                 memcmp(v.piece[i], v.piece[j], (size_t)v.len[i]) == 0);
        if (sizes[k] == 32000) { /* golden: the vocabulary is a contract too */
            uint64_t h = 0xcbf29ce484222325ull;
            for (int id = 0; id < v.n; id++)
                h = fnv1a_bytes(v.piece[id], (size_t)v.len[id] + 1, h);
            print_message("vocab checksum 0x%016llx\n", (unsigned long long)h);
            assert_true(h == 0xcc5d6911e7c8a92aull);
        }
        mtm_vocab_free(&v);
        mtm_vocab_free(&w);
    }
    mtm_vocab bad;
    assert_int_equal(mtm_vocab_build(100, 7, &bad), -1 /* TD_EINVAL */);
    mtm_vocab_free(&bad); /* zeroed on failure: freeing is safe */
}

static void test_shapes(void **state)
{
    (void)state;
    assert_null(mtm_shape_find("no-such-shape"));
    const mtm_shape *t = mtm_shape_find("tiny");
    assert_non_null(t);
    assert_int_equal(t->dim, 64);
    assert_int_equal(t->hidden, 172);
    assert_int_equal(t->n_layers, 2);
    assert_int_equal(t->n_heads, 4);
    assert_int_equal(t->n_kv_heads, 2);
    assert_int_equal(t->vocab, 512);
    assert_int_equal(t->seq_len, 256);
    const mtm_shape *m = mtm_shape_find("15m");
    assert_non_null(m);
    assert_int_equal(m->dim, 288);
    assert_int_equal(m->hidden, 768);
    assert_int_equal(m->n_layers, 6);
    assert_int_equal(m->vocab, 32000);
    int n = 0;
    for (const mtm_shape *s = mtm_shapes; s->name; s++, n++) {
        assert_int_equal(s->n_heads % s->n_kv_heads, 0);
        assert_int_equal(s->head_dim % 2, 0);
        assert_true(s->vocab >= MTM_VOCAB_FIRST_MERGE);
    }
    assert_true(n >= 5);
    assert_int_equal(mtm_shape_find("tiny-mha")->n_kv_heads, mtm_shape_find("tiny-mha")->n_heads);
    assert_true(mtm_shape_find("tiny-qwen2")->qkv_bias && !mtm_shape_find("tiny-qwen2")->tied);
    assert_true(mtm_shape_find("tiny-qwen2")->rope_theta == 1e6);
    assert_false(mtm_shape_find("tiny-untied")->tied);
    /* The long-context shapes: the same geometry, a 4,096-token context. */
    const struct {
        const char *name, *base;
    } long_ctx[] = {{"15m-4k", "15m"}, {"tiny-4k", "tiny"}};
    for (size_t i = 0; i < 2; i++) {
        const mtm_shape *l = mtm_shape_find(long_ctx[i].name),
                        *b = mtm_shape_find(long_ctx[i].base);
        assert_non_null(l);
        assert_int_equal(l->seq_len, 4096);
        assert_int_equal(l->arch, b->arch);
        assert_int_equal(l->dim, b->dim);
        assert_int_equal(l->hidden, b->hidden);
        assert_int_equal(l->n_layers, b->n_layers);
        assert_int_equal(l->n_heads, b->n_heads);
        assert_int_equal(l->n_kv_heads, b->n_kv_heads);
        assert_int_equal(l->head_dim, b->head_dim);
        assert_int_equal(l->vocab, b->vocab);
        assert_int_equal(l->tied, b->tied);
        assert_true(l->rope_theta == b->rope_theta && l->rms_eps == b->rms_eps);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_known_values),
        cmocka_unit_test(test_f16_rounds_to_nearest),
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_permute_rope_rows),
        cmocka_unit_test(test_weights_deterministic_and_scaled),
        cmocka_unit_test(test_vocab),
        cmocka_unit_test(test_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

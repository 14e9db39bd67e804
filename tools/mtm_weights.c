/* mtm_weights: the canonical random weights of a test model. */
#include "tools/mtm.h"

#include <string.h>

/* splitmix64 (Steele, Lea, Flood 2014): a full-period 64-bit generator whose
 * output is a bijective mix of a counter, so each tensor gets an independent,
 * portable stream from its own starting state. */
static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [-0.5, 0.5), exact in double (53 random bits). */
static double uniform_centered(uint64_t *state)
{
    return (double)(splitmix64(state) >> 11) * (1.0 / 9007199254740992.0) - 0.5;
}

/* Bell-shaped noise with mean 0 and variance 1: the sum of four centred
 * uniforms (variance 4/12) times sqrt(3). Only additions and one
 * multiplication, so the bits do not depend on the platform's libm. */
static double noise(uint64_t *state)
{
    const double sqrt3 = 1.7320508075688772;
    double s = 0.0;
    for (int i = 0; i < 4; i++)
        s += uniform_centered(state);
    return s * sqrt3;
}

/* Square root without libm, for scale factors (Newton's method from an
 * integer argument; converges to the correctly rounded root in practice and
 * is the same code on every machine). */
static double det_sqrt(double x)
{
    double r = x > 1.0 ? x : 1.0;
    for (int i = 0; i < 200; i++) {
        double next = 0.5 * (r + x / r);
        if (next == r) break;
        r = next;
    }
    return r;
}

void mtm_tensor_dims(const mtm_shape *s, enum mtm_tensor t, size_t *rows, size_t *cols)
{
    size_t dim = (size_t)s->dim, hidden = (size_t)s->hidden, vocab = (size_t)s->vocab;
    size_t q = (size_t)s->n_heads * (size_t)s->head_dim;
    size_t kv = (size_t)s->n_kv_heads * (size_t)s->head_dim;
    size_t r = 1, c = 1;
    switch (t) {
    case MTM_T_EMBED:
    case MTM_T_LM_HEAD:
        r = vocab, c = dim;
        break;
    case MTM_T_ATTN_NORM:
    case MTM_T_FFN_NORM:
    case MTM_T_FINAL_NORM:
        r = dim;
        break;
    case MTM_T_WQ:
        r = q, c = dim;
        break;
    case MTM_T_WK:
    case MTM_T_WV:
        r = kv, c = dim;
        break;
    case MTM_T_WO:
        r = dim, c = q;
        break;
    case MTM_T_W1:
    case MTM_T_W3:
        r = hidden, c = dim;
        break;
    case MTM_T_W2:
        r = dim, c = hidden;
        break;
    case MTM_T_BQ:
        r = q;
        break;
    case MTM_T_BK:
    case MTM_T_BV:
        r = kv;
        break;
    case MTM_T_COUNT:
        break;
    }
    *rows = r;
    *cols = c;
}

void mtm_tensor_fill(const mtm_shape *s, uint64_t seed, enum mtm_tensor t, int layer, float *out)
{
    size_t rows, cols;
    mtm_tensor_dims(s, t, &rows, &cols);
    size_t n = rows * cols;

    /* Scales keep every sublayer's output near unit RMS whatever the width
     * (std 1/sqrt(fan_in) for projections), so activations stay sane through
     * the residual stream. The embedding is small next to the sublayer
     * outputs: with a tied classifier a large embedding would make every
     * token predict itself, and greedy decoding would repeat one token.
     * Q and K are twice as large so attention is sharp enough to depend on
     * position and context (measured: about 25 distinct tokens in 32 greedy
     * steps on the tiny shapes, instead of one token repeated). */
    double mean = 0.0, std = 0.0;
    switch (t) {
    case MTM_T_EMBED:
        std = 0.03;
        break;
    case MTM_T_WQ:
    case MTM_T_WK:
        std = 2.0 / det_sqrt((double)cols);
        break;
    case MTM_T_ATTN_NORM:
    case MTM_T_FFN_NORM:
    case MTM_T_FINAL_NORM:
        mean = 1.0, std = 0.05; /* near 1 but not 1, so a skipped weight shows */
        break;
    case MTM_T_BQ:
    case MTM_T_BK:
    case MTM_T_BV:
        std = 0.2;
        break;
    default:
        std = 1.0 / det_sqrt((double)cols);
        break;
    }

    /* Stream start: seed mixed with (tensor kind, layer) so every tensor is
     * independent of which others a format writes, and in what order. */
    uint64_t st = seed;
    uint64_t key = ((uint64_t)t << 32) ^ (uint64_t)(uint32_t)(layer + 1);
    st = splitmix64(&st) ^ key;
    st = splitmix64(&st);
    for (size_t i = 0; i < n; i++)
        out[i] = (float)(mean + std * noise(&st));
}

void mtm_permute_rope_rows(const float *src, float *dst, int n_heads, int hd, size_t cols)
{
    int half = hd / 2;
    for (int h = 0; h < n_heads; h++) {
        const float *hs = src + (size_t)h * (size_t)hd * cols;
        float *hdst = dst + (size_t)h * (size_t)hd * cols;
        for (int i = 0; i < half; i++) {
            memcpy(hdst + (size_t)i * cols, hs + (size_t)(2 * i) * cols, cols * sizeof(float));
            memcpy(hdst + (size_t)(i + half) * cols, hs + (size_t)(2 * i + 1) * cols,
                   cols * sizeof(float));
        }
    }
}

uint16_t mtm_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) /* NaN: keep it a quiet NaN */
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

uint16_t mtm_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t absu = u & 0x7FFFFFFFu;
    if (absu > 0x7F800000u) /* NaN */
        return (uint16_t)(sign | 0x7E00u);
    if (absu >= 0x477FF000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7C00u);
    int exp = (int)(absu >> 23) - 127;
    uint32_t mant = absu & 0x7FFFFFu;
    if (exp >= -14) { /* normal half */
        uint32_t h = ((uint32_t)(exp + 15) << 10) | (mant >> 13);
        uint32_t rest = mant & 0x1FFFu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
            h++; /* a carry into the exponent is still correct */
        return (uint16_t)(sign | h);
    }
    if (exp < -25) /* below half the smallest subnormal */
        return (uint16_t)sign;
    /* Subnormal half: value = m * 2^-24 with m = (1.mant) * 2^(exp+24). */
    uint32_t full = mant | 0x800000u; /* 24-bit significand, value full * 2^(exp-23) */
    int shift = -exp - 1;             /* 14..24: bits dropped to reach units of 2^-24 */
    uint32_t m = full >> shift;
    uint32_t rest = full & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (m & 1u))) m++;
    return (uint16_t)(sign | m);
}

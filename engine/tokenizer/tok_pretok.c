/* UTF-8 decoding, Unicode classes and the pre-tokenizer regexes of GPT-2,
 * Llama 3 and Qwen2, written as direct matchers (leftmost-first alternation,
 * as the backtracking engines behind tokenizer.json do it). */
#include "engine/tokenizer/tok_internal.h"
#include "engine/tokenizer/tok_unicode_tables.h"

#include <string.h>

/* Expected range of the second byte of a sequence led by b, and its length;
 * len 0 marks a byte that never starts a valid sequence. */
static void utf8_lead(uint8_t b, size_t *len, uint8_t *lo, uint8_t *hi)
{
    *lo = 0x80;
    *hi = 0xBF;
    if (b < 0x80) {
        *len = 1;
    } else if (b >= 0xC2 && b <= 0xDF) {
        *len = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        *len = 3;
        if (b == 0xE0) *lo = 0xA0; /* no overlong forms */
        if (b == 0xED) *hi = 0x9F; /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        *len = 4;
        if (b == 0xF0) *lo = 0x90;
        if (b == 0xF4) *hi = 0x8F; /* nothing above U+10FFFF */
    } else {
        *len = 0;
    }
}

size_t tok__utf8_next(const uint8_t *s, size_t n, size_t i, uint32_t *cp)
{
    uint8_t b = s[i], lo, hi;
    size_t len;
    utf8_lead(b, &len, &lo, &hi);
    if (len == 1) {
        *cp = b;
        return 1;
    }
    if (len == 0 || i + len > n) goto bad;
    if (s[i + 1] < lo || s[i + 1] > hi) goto bad;
    for (size_t k = 2; k < len; k++)
        if ((s[i + k] & 0xC0) != 0x80) goto bad;
    if (len == 2)
        *cp = ((uint32_t)(b & 0x1F) << 6) | (s[i + 1] & 0x3F);
    else if (len == 3)
        *cp = ((uint32_t)(b & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
    else
        *cp = ((uint32_t)(b & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) |
              ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
    return len;
bad:
    *cp = 0xFFFD; /* classified as "other": neither letter, number nor space */
    return 1;
}

size_t tok__utf8_sanitize(const uint8_t *in, size_t n, char *out, bool final, size_t *used)
{
    static const char repl[3] = {(char)0xEF, (char)0xBF, (char)0xBD};
    size_t i = 0, w = 0;
    while (i < n) {
        uint8_t lo, hi;
        size_t len;
        utf8_lead(in[i], &len, &lo, &hi);
        if (len == 1) {
            if (out) out[w] = (char)in[i];
            w++;
            i++;
            continue;
        }
        /* k: how many bytes of a valid sequence are present */
        size_t k = 0;
        if (len > 0) {
            k = 1;
            while (k < len && i + k < n) {
                uint8_t c = in[i + k];
                bool ok = (k == 1) ? (c >= lo && c <= hi) : ((c & 0xC0) == 0x80);
                if (!ok) break;
                k++;
            }
        }
        if (len > 0 && k == len) {
            if (out) memcpy(out + w, in + i, len);
            w += len;
            i += len;
        } else if (len > 0 && i + k == n && !final) {
            break; /* may complete with the next bytes */
        } else {
            /* one U+FFFD per maximal invalid subpart */
            if (out) memcpy(out + w, repl, 3);
            w += 3;
            i += k ? k : 1;
        }
    }
    *used = i;
    return w;
}

static bool in_ranges(const uint32_t (*r)[2], size_t n, uint32_t cp)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0])
            hi = mid;
        else if (cp > r[mid][1])
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

bool tok__is_letter(uint32_t cp)
{
    if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in_ranges(tok__letter_ranges, sizeof(tok__letter_ranges) / sizeof(tok__letter_ranges[0]),
                     cp);
}

bool tok__is_number(uint32_t cp)
{
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in_ranges(tok__number_ranges, sizeof(tok__number_ranges) / sizeof(tok__number_ranges[0]),
                     cp);
}

const char *tok__unicode_version(void)
{
    return TOK__UNICODE_VERSION;
}

bool tok__is_space(uint32_t cp)
{
    if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
           cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

enum cls { C_LETTER, C_NUMBER, C_SPACE, C_OTHER };

static enum cls classify(uint32_t cp)
{
    if (tok__is_letter(cp)) return C_LETTER;
    if (tok__is_number(cp)) return C_NUMBER;
    if (tok__is_space(cp)) return C_SPACE;
    return C_OTHER;
}

/* End of the run of class c starting at i, at most max code points. */
static size_t run(const uint8_t *s, size_t n, size_t i, enum cls c, size_t max)
{
    size_t count = 0;
    while (i < n && count < max) {
        uint32_t cp;
        size_t l = tok__utf8_next(s, n, i, &cp);
        if (classify(cp) != c) break;
        i += l;
        count++;
    }
    return i;
}

/* 's 't 're 've 'm 'll 'd at s[i] == '\''; returns the match length or 0. */
static size_t contraction(const uint8_t *s, size_t n, size_t i, bool icase)
{
    if (i + 1 >= n) return 0;
    uint8_t a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
    if (icase) {
        if (a >= 'A' && a <= 'Z') a = (uint8_t)(a + 32);
        if (b >= 'A' && b <= 'Z') b = (uint8_t)(b + 32);
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

/* \s+(?!\S) then \s+ at a white-space code point: a run of white space that
 * is followed by a non-space gives its last code point to the next token. */
static size_t space_run(const uint8_t *s, size_t n, size_t i)
{
    size_t j = i, last = i;
    while (j < n) {
        uint32_t cp;
        size_t l = tok__utf8_next(s, n, j, &cp);
        if (!tok__is_space(cp)) break;
        last = j;
        j += l;
    }
    if (j == n || last == i) return j - i;
    return last - i;
}

static size_t split_gpt2(const uint8_t *s, size_t n, size_t i)
{
    if (s[i] == '\'') {
        size_t c = contraction(s, n, i, false);
        if (c) return c;
    }
    size_t k = (s[i] == ' ' && i + 1 < n) ? i + 1 : i;
    uint32_t cp;
    tok__utf8_next(s, n, k, &cp);
    enum cls c = classify(cp);
    if (k > i && c == C_SPACE) { /* the optional space leads nowhere */
        k = i;
        c = C_SPACE;
    }
    if (c != C_SPACE) return run(s, n, k, c, SIZE_MAX) - i;
    return space_run(s, n, i);
}

static bool is_crlf(uint32_t cp)
{
    return cp == '\r' || cp == '\n';
}

static size_t split_llama3(const uint8_t *s, size_t n, size_t i, size_t max_digits)
{
    if (s[i] == '\'') {
        size_t c = contraction(s, n, i, true);
        if (c) return c;
    }
    uint32_t cp;
    size_t l0 = tok__utf8_next(s, n, i, &cp);
    enum cls c0 = classify(cp);
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (c0 == C_LETTER) return run(s, n, i, C_LETTER, SIZE_MAX) - i;
    if (c0 != C_NUMBER && !is_crlf(cp) && i + l0 < n) {
        uint32_t cp1;
        tok__utf8_next(s, n, i + l0, &cp1);
        if (tok__is_letter(cp1)) return run(s, n, i + l0, C_LETTER, SIZE_MAX) - i;
    }
    /* \p{N}{1,3} */
    if (c0 == C_NUMBER) return run(s, n, i, C_NUMBER, max_digits) - i;
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t k = i;
    if (cp == ' ' && i + 1 < n) {
        uint32_t cp1;
        tok__utf8_next(s, n, i + 1, &cp1);
        if (classify(cp1) == C_OTHER) k = i + 1;
    }
    if (k > i || c0 == C_OTHER) {
        size_t j = run(s, n, k, C_OTHER, SIZE_MAX);
        while (j < n && (s[j] == '\r' || s[j] == '\n'))
            j++;
        return j - i;
    }
    /* c0 is white space. \s*[\r\n]+ : up to the last line break of the run */
    size_t j = i, end_nl = 0;
    while (j < n) {
        uint32_t c;
        size_t l = tok__utf8_next(s, n, j, &c);
        if (!tok__is_space(c)) break;
        j += l;
        if (is_crlf(c)) end_nl = j;
    }
    if (end_nl > 0) return end_nl - i;
    return space_run(s, n, i);
}

static size_t split_metaspace(const uint8_t *s, size_t n, size_t i)
{
    /* a piece runs from one U+2581 (E2 96 81) to the next */
    size_t j = i + 1;
    while (j + 2 < n && !(s[j] == 0xE2 && s[j + 1] == 0x96 && s[j + 2] == 0x81))
        j++;
    if (j + 2 >= n) j = n;
    return j - i;
}

size_t tok__split_next(enum tok__split k, const uint8_t *s, size_t n, size_t i)
{
    switch (k) {
    case TOK__SPLIT_GPT2:
        return split_gpt2(s, n, i);
    case TOK__SPLIT_LLAMA3:
        return split_llama3(s, n, i, 3);
    case TOK__SPLIT_QWEN2:
        return split_llama3(s, n, i, 1);
    case TOK__SPLIT_METASPACE:
        return split_metaspace(s, n, i);
    }
    return n - i;
}

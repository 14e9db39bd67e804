#include "common/sbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"

/* Room for n more bytes and the NUL. */
static int sbuf__reserve(sbuf *b, size_t n)
{
    if (b->rc < 0) return b->rc;
    if (b->n + n + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->rc = TD_ENOMEM;
        return b->rc;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

void sbuf_put(sbuf *b, const char *s, size_t n)
{
    if (sbuf__reserve(b, n) != 0) return;
    if (n > 0) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

void sbuf_puts(sbuf *b, const char *s)
{
    sbuf_put(b, s, strlen(s));
}

void sbuf_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || sbuf__reserve(b, (size_t)n) != 0) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)n;
}

char *sbuf_take(sbuf *b)
{
    if (b->rc == 0 && !b->p) sbuf_put(b, "", 0);
    char *p = b->rc == 0 ? b->p : NULL;
    if (!p) free(b->p);
    *b = (sbuf){0};
    return p;
}

void sbuf_free(sbuf *b)
{
    free(b->p);
    *b = (sbuf){0};
}

/* sbuf: a growing string, for building messages, JSON and help texts.
 *
 * Zero-initialise one (sbuf b = {0}), append, then take the string. The
 * first allocation failure sticks (b.rc = TD_ENOMEM): later appends do
 * nothing and sbuf_take returns NULL, so a caller checks once at the end.
 * Once anything was appended, b.p is NUL-terminated and b.n bytes long.
 * Not thread-safe; the buffer belongs to whoever holds the sbuf. */
#ifndef TANDEM_COMMON_SBUF_H
#define TANDEM_COMMON_SBUF_H

#include <stddef.h>

typedef struct sbuf {
    char *p;    /* the text, NUL-terminated (NULL before the first append) */
    size_t n;   /* bytes, without the NUL */
    size_t cap; /* bytes allocated */
    int rc;     /* 0, or TD_ENOMEM after a failed allocation */
} sbuf;

void sbuf_put(sbuf *b, const char *s, size_t n);
void sbuf_puts(sbuf *b, const char *s);
void sbuf_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The string, now the caller's (free it), "" when nothing was appended; NULL
 * after an allocation failure (nothing is leaked). b is empty afterwards. */
char *sbuf_take(sbuf *b);

/* Frees the buffer; b is empty afterwards. */
void sbuf_free(sbuf *b);

#endif

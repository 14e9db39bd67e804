#include "arena.h"

#include "err.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#define ARENA_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ARENA_ASAN 1
#endif
#endif

#ifdef ARENA_ASAN
#include <sanitizer/asan_interface.h>
#define ARENA_POISON(p, n)   ASAN_POISON_MEMORY_REGION((p), (n))
#define ARENA_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define ARENA_POISON(p, n)   ((void)(p), (void)(n))
#define ARENA_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define ARENA_DEFAULT_CHUNK (64u * 1024u)

struct arena__chunk {
    struct arena__chunk *next;
    size_t size; /* payload bytes */
    /* The payload follows, aligned like max_align_t (malloc's guarantee). */
    _Alignas(max_align_t) unsigned char data[];
};

int arena_init(arena *a, size_t chunk_bytes)
{
    if (!a) return TD_EINVAL;
    memset(a, 0, sizeof(*a));
    a->chunk_bytes = chunk_bytes ? chunk_bytes : ARENA_DEFAULT_CHUNK;
    if (a->chunk_bytes > SIZE_MAX / 2) return TD_EINVAL;
    return 0;
}

void arena_close(arena *a)
{
    if (!a) return;
    struct arena__chunk *c = a->first;
    while (c) {
        struct arena__chunk *next = c->next;
        ARENA_UNPOISON(c->data, c->size);
        free(c);
        c = next;
    }
    memset(a, 0, sizeof(*a));
}

/* Offset in c's payload where an allocation of size/align starting at pos
 * would begin, or SIZE_MAX when it does not fit. */
static size_t fit(const struct arena__chunk *c, size_t pos, size_t size, size_t align)
{
    uintptr_t base = (uintptr_t)c->data;
    uintptr_t here = base + pos;
    uintptr_t start = (here + (align - 1)) & ~(uintptr_t)(align - 1);
    size_t off = (size_t)(start - base);
    if (off > c->size || size > c->size - off) return SIZE_MAX;
    return off;
}

static struct arena__chunk *chunk_new(size_t payload)
{
    if (payload > SIZE_MAX - sizeof(struct arena__chunk)) return NULL;
    struct arena__chunk *c = malloc(sizeof(*c) + payload);
    if (!c) return NULL;
    c->next = NULL;
    c->size = payload;
    ARENA_POISON(c->data, payload);
    return c;
}

void *arena_alloc(arena *a, size_t size, size_t align)
{
    if (!a || align == 0 || (align & (align - 1)) != 0 || align > ARENA_MAX_ALIGN) return NULL;
    if (size == 0) size = 1; /* every allocation gets its own byte, so pointers stay distinct */

    for (;;) {
        struct arena__chunk *c = a->cur;
        if (c) {
            size_t off = fit(c, a->pos, size, align);
            if (off != SIZE_MAX) {
                a->used += off - a->pos + size;
                a->pos = off + size;
                ARENA_UNPOISON(c->data + off, size);
                return c->data + off;
            }
            /* Reuse the next kept chunk when the request fits there; else a
             * new chunk goes in between, and the kept one waits its turn. */
            if (c->next && fit(c->next, 0, size, align) != SIZE_MAX) {
                a->cur = c->next;
                a->pos = 0;
                continue;
            }
        }
        /* Room for the worst-case padding, so the request fits for sure. */
        if (size > SIZE_MAX - align) return NULL;
        size_t need = size + align;
        struct arena__chunk *n = chunk_new(need > a->chunk_bytes ? need : a->chunk_bytes);
        if (!n) return NULL;
        if (c) {
            n->next = c->next;
            c->next = n;
        } else {
            /* No chunk yet (cur is only NULL when first is NULL). */
            n->next = a->first;
            a->first = n;
        }
        a->reserved += n->size;
        a->cur = n;
        a->pos = 0;
    }
}

void *arena_calloc(arena *a, size_t size, size_t align)
{
    void *p = arena_alloc(a, size, align);
    if (p) memset(p, 0, size);
    return p;
}

void *arena_alloc_array(arena *a, size_t n, size_t elem_size, size_t align)
{
    if (elem_size != 0 && n > SIZE_MAX / elem_size) return NULL;
    return arena_alloc(a, n * elem_size, align);
}

char *arena_strndup(arena *a, const char *s, size_t n)
{
    if (!s) return NULL;
    size_t len = strnlen(s, n);
    if (len == SIZE_MAX) return NULL;
    char *p = arena_alloc(a, len + 1, 1);
    if (!p) return NULL;
    memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

void arena_reset(arena *a)
{
    if (!a) return;
#ifdef ARENA_ASAN
    for (struct arena__chunk *c = a->first; c; c = c->next)
        ARENA_POISON(c->data, c->size);
#endif
    a->cur = a->first;
    a->pos = 0;
    a->used = 0;
}

size_t arena_used(const arena *a)
{
    return a ? a->used : 0;
}

size_t arena_reserved(const arena *a)
{
    return a ? a->reserved : 0;
}

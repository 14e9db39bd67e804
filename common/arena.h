/* arena: a bump allocator scoped by a lifetime (one request, one engine step).
 *
 * Allocation moves a pointer forward inside a chunk; nothing is freed one by
 * one. arena_reset() forgets every allocation in O(1) and keeps the chunks, so
 * an arena that has reached its working size allocates nothing from malloc
 * again. When a chunk is full the arena moves to the next kept chunk, or
 * mallocs a new one (chunk_bytes, or larger for a big request).
 *
 * Not thread-safe: one arena belongs to one thread at a time.
 *
 * Under AddressSanitizer the unused part of every chunk is poisoned, and
 * arena_reset() poisons everything again, so a use after reset or a write past
 * the end of an allocation is reported.
 */
#ifndef TANDEM_COMMON_ARENA_H
#define TANDEM_COMMON_ARENA_H

#include <stddef.h>

/* Largest alignment arena_alloc accepts (bytes). */
#define ARENA_MAX_ALIGN 4096

struct arena__chunk;

/* Embeddable; treat every field as private. Zero-initialised is NOT valid:
 * call arena_init. */
typedef struct arena {
    struct arena__chunk *first; /* oldest chunk; chunks form a singly linked list */
    struct arena__chunk *cur;   /* chunk allocations come from now */
    size_t pos;                 /* bytes used in cur's payload */
    size_t chunk_bytes;         /* payload size of a normal chunk */
    size_t used;                /* bytes handed out since the last reset (with padding) */
    size_t reserved;            /* payload bytes of all chunks held */
} arena;

/* Prepares a with normal chunks of chunk_bytes payload (0: 64 KiB). Allocates
 * nothing until the first arena_alloc. Returns 0 or TD_EINVAL. */
int arena_init(arena *a, size_t chunk_bytes);

/* Frees every chunk. a may be reused after another arena_init. NULL is fine. */
void arena_close(arena *a);

/* Returns size bytes aligned to align (a power of two <= ARENA_MAX_ALIGN), or
 * NULL when align is invalid, the size overflows, or malloc fails. The memory
 * is not zeroed and stays valid until the next arena_reset/arena_close; the
 * arena owns it. size 0 returns a valid unique pointer. */
void *arena_alloc(arena *a, size_t size, size_t align);

/* arena_alloc, then zeroes the bytes. */
void *arena_calloc(arena *a, size_t size, size_t align);

/* Array of n elements of elem_size bytes, overflow-checked. Not zeroed. */
void *arena_alloc_array(arena *a, size_t n, size_t elem_size, size_t align);

/* Copies the first n bytes of s (stopping early at a NUL) into the arena,
 * NUL-terminated. s is read only. NULL on failure. */
char *arena_strndup(arena *a, const char *s, size_t n);

/* Forgets every allocation; keeps the chunks for reuse. O(1) (under ASan it
 * also walks the chunks to poison them). */
void arena_reset(arena *a);

/* Bytes handed out since the last reset, alignment padding included. */
size_t arena_used(const arena *a);

/* Payload bytes held in chunks (what the arena costs in memory). */
size_t arena_reserved(const arena *a);

#endif

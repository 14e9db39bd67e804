/* The BPE merge loop shared by both vocabularies: a word is a linked list of
 * symbols and a binary heap holds candidate merges of adjacent pairs, so a
 * word of n symbols costs O(n log n), not the O(n^2) of rescanning all pairs
 * after every merge. Stale heap entries are detected and skipped on pop. */
#include "engine/tokenizer/tok_internal.h"

#include "common/err.h"

#include <stdlib.h>
#include <string.h>

struct tok__heap_ent {
    double prio; /* lower merges first: rank, or -score for llama2.c */
    int32_t pos; /* index of the left symbol; ties go to the leftmost */
    int32_t left, right, merged;
};

void tok__bpe_scratch_free(tok__bpe_scratch *s)
{
    free(s->sym);
    free(s->heap);
    memset(s, 0, sizeof(*s));
}

int tok__bpe_reserve(tok__bpe_scratch *s, size_t n_sym)
{
    if (n_sym > s->sym_cap) {
        size_t cap = s->sym_cap ? s->sym_cap : 64;
        while (cap < n_sym)
            cap *= 2;
        tok__sym *p = realloc(s->sym, cap * sizeof(*p));
        if (p == NULL) return TD_ENOMEM;
        s->sym = p;
        s->sym_cap = cap;
    }
    /* each merge pushes at most two entries; n_sym - 1 initial pairs */
    size_t hn = n_sym * 3 + 4;
    if (hn > s->heap_cap) {
        struct tok__heap_ent *h = realloc(s->heap, hn * sizeof(*h));
        if (h == NULL) return TD_ENOMEM;
        s->heap = h;
        s->heap_cap = hn;
    }
    return 0;
}

void tok__check_split_words(tok_tokenizer *t, const char *mark, size_t mark_len)
{
    t->split_words = false;
    if (mark_len == 0 || mark_len > sizeof(t->word_mark) || t->vocab.slots == NULL) return;
    /* every piece reachable by merging is in the vocabulary map */
    for (uint32_t h = 0; h <= t->vocab.mask; h++) {
        int32_t id = t->vocab.slots[h];
        if (id < 0) continue;
        const char *p = t->arena + t->piece_off[id];
        size_t n = t->piece_len[id], i = 0;
        while (i + mark_len <= n && memcmp(p + i, mark, mark_len) == 0)
            i += mark_len;
        for (; i + mark_len <= n; i++)
            if (memcmp(p + i, mark, mark_len) == 0) return;
    }
    memcpy(t->word_mark, mark, mark_len);
    t->word_mark_len = (uint8_t)mark_len;
    t->split_words = true;
}

size_t tok__word_end(const tok_tokenizer *t, const char *text, size_t n, size_t i)
{
    size_t m = t->word_mark_len;
    while (i + m <= n && memcmp(text + i, t->word_mark, m) == 0)
        i += m;
    while (i < n && !(i + m <= n && memcmp(text + i, t->word_mark, m) == 0))
        i++;
    return i;
}

static bool ent_less(const struct tok__heap_ent *a, const struct tok__heap_ent *b)
{
    if (a->prio != b->prio) return a->prio < b->prio;
    return a->pos < b->pos;
}

static void heap_push(struct tok__heap_ent *h, size_t *n, struct tok__heap_ent e)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!ent_less(&e, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static struct tok__heap_ent heap_pop(struct tok__heap_ent *h, size_t *n)
{
    struct tok__heap_ent top = h[0];
    struct tok__heap_ent last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && ent_less(&h[c + 1], &h[c])) c++;
        if (!ent_less(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0) h[i] = last;
    return top;
}

/* Looks up the merge of symbols a and b (adjacent); true when one exists. */
static bool pair_of(const tok_tokenizer *t, tok__bpe_scratch *s, const char *text, int32_t a,
                    int32_t b, struct tok__heap_ent *e)
{
    const tok__sym *sa = &s->sym[a], *sb = &s->sym[b];
    e->pos = a;
    e->left = sa->id;
    e->right = sb->id;
    if (t->kind == TOK__KIND_BPE) {
        int32_t rank;
        if (sa->id < 0 || sb->id < 0) return false;
        if (!tok__mmap_find(&t->merges, sa->id, sb->id, &rank, &e->merged)) return false;
        e->prio = rank;
        return true;
    }
    /* llama2.c: the concatenated text must be a piece; the best score wins.
     * Adjacent symbols are contiguous in the text, so no copy is needed. */
    int32_t id = tok__vmap_find(t, text + sa->off, (size_t)sa->len + sb->len);
    if (id < 0) return false;
    e->merged = id;
    e->prio = -(double)t->scores[id];
    return true;
}

int tok__bpe_merge(const tok_tokenizer *t, tok__bpe_scratch *s, const char *text, size_t n,
                   tok__ids *out)
{
    if (n == 0) return 0;
    struct tok__heap_ent *h = s->heap;
    size_t hn = 0;
    struct tok__heap_ent e;
    for (size_t i = 0; i + 1 < n; i++)
        if (pair_of(t, s, text, (int32_t)i, (int32_t)i + 1, &e)) heap_push(h, &hn, e);
    while (hn > 0) {
        e = heap_pop(h, &hn);
        tok__sym *a = &s->sym[e.pos];
        /* stale: the left symbol was merged away or changed, or its right
         * neighbour is no longer the pair this entry was made for */
        if (a->len == 0 || a->id != e.left || a->next < 0) continue;
        tok__sym *b = &s->sym[a->next];
        if (b->id != e.right) continue;
        a->id = e.merged;
        a->len += b->len;
        a->next = b->next;
        if (b->next >= 0) s->sym[b->next].prev = e.pos;
        b->len = 0;
        b->id = -1;
        if (a->prev >= 0 && pair_of(t, s, text, a->prev, e.pos, &e)) heap_push(h, &hn, e);
        if (a->next >= 0 && pair_of(t, s, text, (int32_t)(a - s->sym), a->next, &e))
            heap_push(h, &hn, e);
    }
    for (int32_t i = 0; i >= 0; i = s->sym[i].next) {
        int rc = tok__ids_push(out, s->sym[i].id);
        if (rc < 0) return rc;
    }
    return 0;
}

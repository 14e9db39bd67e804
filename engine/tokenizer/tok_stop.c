/* tok_stop: stop-string matching on detokenized text, shared by the engine's
 * tandem-generate and the router (which never links the engine). */
#include "engine/tokenizer/tok.h"

#include <string.h>

int tok_stop_find(const char *text, size_t len, const char *const *stops, size_t n, size_t *cut)
{
    int found = 0;
    size_t best = 0;
    for (size_t i = 0; i < n; i++) {
        size_t sl = strlen(stops[i]);
        if (sl == 0 || sl > len) continue;
        /* Only starts before the best match so far can improve on it. */
        for (size_t at = 0; at + sl <= len && (!found || at < best); at++) {
            if (memcmp(text + at, stops[i], sl) == 0) {
                found = 1;
                best = at;
                break;
            }
        }
    }
    if (found) *cut = best;
    return found;
}

size_t tok_stop_holdback(const char *text, size_t len, const char *const *stops, size_t n)
{
    size_t hold = 0;
    for (size_t i = 0; i < n; i++) {
        size_t sl = strlen(stops[i]);
        /* Longest proper prefix of stops[i] that ends text, longer than hold. */
        for (size_t k = sl > 0 ? sl - 1 : 0; k > hold; k--) {
            if (k <= len && memcmp(text + len - k, stops[i], k) == 0) {
                hold = k;
                break;
            }
        }
    }
    return hold;
}

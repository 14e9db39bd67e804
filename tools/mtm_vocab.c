/* mtm_vocab: a deterministic byte-level BPE vocabulary and its tokenizer files.
 *
 * Merges come first from byte-pair counting on a small built-in English text
 * (so common words become single tokens and a prompt encodes to a sensible
 * number of ids), then, once no pair occurs twice, from pairs of letter tokens
 * drawn from the seeded generator until the vocabulary has the model's size.
 * All merged tokens are printable ASCII, so the same vocabulary is expressible
 * both as a byte-level tokenizer.json and as a llama2.c tokenizer.bin. */
#include "tools/mtm.h"

#include "common/err.h"

#include <stdlib.h>
#include <string.h>

static const char corpus[] =
    "Once upon a time there was a little robot named Pip. Pip lived in a small "
    "house by the sea with an old cat and a big red ball. Every morning Pip "
    "went to the window and looked at the water. The water was blue and the sky "
    "was bright. One day a bird came to the window and said hello. Pip was happy "
    "to have a new friend. The bird told Pip about the forest, the hills and the "
    "town where the people make bread. They walked together to the town and saw "
    "the market. There were apples, green pears, warm bread and sweet cakes. Pip "
    "wanted to buy a cake for the cat, but Pip had no money. The baker smiled and "
    "gave Pip a cake anyway, because Pip had helped her carry water the day before. "
    "When they came home the cat was sleeping in the sun. Pip put the cake next to "
    "the cat and sat down. The bird sang a song about the sea, the sun and the "
    "stars. In the evening the sky turned orange and then dark, and the first "
    "stars came out. Pip counted them: one, two, three, four, five, six, seven. "
    "The cat woke up, ate the cake and said thank you. They all sat together and "
    "watched the night. It was the best day, and Pip wanted every day to be like "
    "this one. The next morning it was raining, so they stayed inside and played "
    "with the ball. The ball rolled under the table and the cat ran after it. "
    "Pip laughed, the bird laughed, and even the old cat laughed. In 2024 there "
    "were 365 days, and 12 months, and Pip loved each one of them.\n";

typedef struct word {
    int count;
    int n;
    int ids[64];
} word;

static int is_letter(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* Splits the corpus into words (" ?letters", digits, " ?one other char"),
 * each as a list of byte-token ids, with repeated words counted once. */
static int split_words(word **out, int *n_out)
{
    size_t n = sizeof corpus - 1;
    int cap = 512, nw = 0;
    word *w = calloc((size_t)cap, sizeof *w);
    if (!w) return TD_ENOMEM;
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        if (corpus[i] == ' ' && i + 1 < n && corpus[i + 1] != ' ') i++;
        if (is_letter((unsigned char)corpus[i])) {
            while (i < n && is_letter((unsigned char)corpus[i]))
                i++;
        } else if (is_digit((unsigned char)corpus[i])) {
            while (i < n && is_digit((unsigned char)corpus[i]))
                i++;
        } else {
            i++;
        }
        size_t len = i - start;
        if (len > 64) len = 64;
        int found = -1;
        for (int k = 0; k < nw && found < 0; k++) {
            if ((size_t)w[k].n != len) continue;
            int same = 1;
            for (size_t j = 0; j < len && same; j++)
                same = w[k].ids[j] == 3 + (unsigned char)corpus[start + j];
            if (same) found = k;
        }
        if (found >= 0) {
            w[found].count++;
            continue;
        }
        if (nw == cap) {
            word *grown = realloc(w, (size_t)cap * 2 * sizeof *w);
            if (!grown) {
                free(w);
                return TD_ENOMEM;
            }
            w = grown;
            cap *= 2;
        }
        w[nw].count = 1;
        w[nw].n = (int)len;
        for (size_t j = 0; j < len; j++)
            w[nw].ids[j] = 3 + (unsigned char)corpus[start + j];
        nw++;
    }
    *out = w;
    *n_out = nw;
    return 0;
}

/* Open-addressing set of token strings -> id, for the uniqueness check. */
typedef struct strset {
    int *slot; /* [cap] token id or -1 */
    size_t cap;
} strset;

static uint64_t fnv1a(const char *p, int n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static int strset_find(const strset *s, const mtm_vocab *v, const char *p, int n)
{
    size_t i = fnv1a(p, n) & (s->cap - 1);
    while (s->slot[i] >= 0) {
        int id = s->slot[i];
        if (v->len[id] == n && memcmp(v->piece[id], p, (size_t)n) == 0) return id;
        i = (i + 1) & (s->cap - 1);
    }
    return -1;
}

static void strset_add(strset *s, const mtm_vocab *v, int id)
{
    size_t i = fnv1a(v->piece[id], v->len[id]) & (s->cap - 1);
    while (s->slot[i] >= 0)
        i = (i + 1) & (s->cap - 1);
    s->slot[i] = id;
}

static uint64_t next_rand(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int set_piece(mtm_vocab *v, int id, const char *p, int n)
{
    v->piece[id] = malloc((size_t)n + 1);
    if (!v->piece[id]) return TD_ENOMEM;
    memcpy(v->piece[id], p, (size_t)n);
    v->piece[id][n] = '\0';
    v->len[id] = n;
    return 0;
}

/* Adds merge (a, b) as token id; returns 0, 1 when the string already
 * exists (nothing added), or TD_ENOMEM. */
static int add_merge(mtm_vocab *v, strset *set, int id, int a, int b)
{
    char buf[128];
    int n = v->len[a] + v->len[b];
    if (n > (int)sizeof buf) return 1;
    memcpy(buf, v->piece[a], (size_t)v->len[a]);
    memcpy(buf + v->len[a], v->piece[b], (size_t)v->len[b]);
    if (strset_find(set, v, buf, n) >= 0) return 1;
    if (set_piece(v, id, buf, n) != 0) return TD_ENOMEM;
    v->merge[id - MTM_VOCAB_FIRST_MERGE][0] = a;
    v->merge[id - MTM_VOCAB_FIRST_MERGE][1] = b;
    strset_add(set, v, id);
    return 0;
}

/* Pair counts for one round of merging: open addressing keyed by the id
 * pair; the corpus has far fewer than PAIR_CAP distinct pairs. */
enum { PAIR_CAP = 1 << 14 };
typedef struct pair_table {
    uint64_t key[PAIR_CAP]; /* (a << 32) | b */
    int cnt[PAIR_CAP];      /* 0: empty slot */
} pair_table;

/* One round of pair counting on the words; returns the count of the most
 * frequent pair whose concatenation is not a token yet (ties: smallest ids),
 * stored in *pa, *pb; 0 when there is none. */
static int best_pair(pair_table *pt, const word *w, int nw, const strset *set, const mtm_vocab *v,
                     int *pa, int *pb)
{
    uint64_t *key = pt->key;
    int *cnt = pt->cnt;
    memset(cnt, 0, sizeof pt->cnt);
    int best = 0;
    for (int k = 0; k < nw; k++) {
        for (int j = 0; j + 1 < w[k].n; j++) {
            uint64_t kk = ((uint64_t)(uint32_t)w[k].ids[j] << 32) | (uint32_t)w[k].ids[j + 1];
            size_t i = (size_t)((kk * 0x9E3779B97F4A7C15ull) >> 50);
            while (cnt[i] != 0 && key[i] != kk)
                i = (i + 1) & (PAIR_CAP - 1);
            key[i] = kk;
            cnt[i] += w[k].count;
        }
    }
    for (size_t i = 0; i < PAIR_CAP; i++) {
        if (cnt[i] < 2) continue;
        int a = (int)(key[i] >> 32), b = (int)(uint32_t)key[i];
        char buf[128];
        int n = v->len[a] + v->len[b];
        if (n > (int)sizeof buf) continue;
        memcpy(buf, v->piece[a], (size_t)v->len[a]);
        memcpy(buf + v->len[a], v->piece[b], (size_t)v->len[b]);
        if (strset_find(set, v, buf, n) >= 0) continue;
        if (cnt[i] > best || (cnt[i] == best && (a < *pa || (a == *pa && b < *pb)))) {
            best = cnt[i];
            *pa = a;
            *pb = b;
        }
    }
    return best;
}

static void apply_merge(word *w, int nw, int a, int b, int id)
{
    for (int k = 0; k < nw; k++) {
        int o = 0;
        for (int j = 0; j < w[k].n; j++) {
            if (j + 1 < w[k].n && w[k].ids[j] == a && w[k].ids[j + 1] == b) {
                w[k].ids[o++] = id;
                j++;
            } else {
                w[k].ids[o++] = w[k].ids[j];
            }
        }
        w[k].n = o;
    }
}

/* A token usable in filler merges: letters only, optionally after one space. */
static int letter_token(const mtm_vocab *v, int id, int allow_space)
{
    const char *p = v->piece[id];
    int n = v->len[id], i = 0;
    if (allow_space && n > 1 && p[0] == ' ') i = 1;
    if (i == n) return 0;
    for (; i < n; i++)
        if (!is_letter((unsigned char)p[i])) return 0;
    return 1;
}

int mtm_vocab_build(int n, uint64_t seed, mtm_vocab *v)
{
    memset(v, 0, sizeof *v);
    if (n < MTM_VOCAB_FIRST_MERGE || n > 1 << 20) {
        fprintf(stderr, "make-test-model: vocabulary size %d outside [%d, %d]\n", n,
                MTM_VOCAB_FIRST_MERGE, 1 << 20);
        return TD_EINVAL;
    }
    int rc = TD_ENOMEM;
    word *w = NULL;
    int nw = 0;
    strset set = {0};
    pair_table *pt = malloc(sizeof *pt);
    v->n = n;
    v->piece = calloc((size_t)n, sizeof *v->piece);
    v->len = calloc((size_t)n, sizeof *v->len);
    v->merge = calloc((size_t)(n - MTM_VOCAB_FIRST_MERGE) + 1, sizeof *v->merge);
    set.cap = 1024;
    while (set.cap < (size_t)n * 4)
        set.cap *= 2;
    set.slot = malloc(set.cap * sizeof *set.slot);
    if (!v->piece || !v->len || !v->merge || !set.slot || !pt) goto out;
    memset(set.slot, 0xFF, set.cap * sizeof *set.slot);

    static const char *specials[3] = {"<unk>", "<s>", "</s>"};
    for (int i = 0; i < 3; i++)
        if (set_piece(v, i, specials[i], (int)strlen(specials[i])) != 0) goto out;
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        if (set_piece(v, 3 + b, &c, 1) != 0) goto out;
        strset_add(&set, v, 3 + b);
    }

    if ((rc = split_words(&w, &nw)) != 0) goto out;
    int id = MTM_VOCAB_FIRST_MERGE;
    while (id < n) {
        int a = 1 << 30, b = 1 << 30;
        if (best_pair(pt, w, nw, &set, v, &a, &b) < 2) break;
        if ((rc = add_merge(v, &set, id, a, b)) < 0) goto out;
        apply_merge(w, nw, a, b, id);
        id++;
    }

    /* Filler merges from the seeded generator. */
    uint64_t st = seed ^ 0x746F6B656E697A65ull;
    long attempts = 0;
    while (id < n) {
        if (++attempts > 1000L * n) {
            fprintf(stderr, "make-test-model: could not find %d distinct merges\n", n);
            rc = TD_EINTERNAL;
            goto out;
        }
        int a = 3 + (int)(next_rand(&st) % (uint64_t)(id - 3));
        int b = 3 + (int)(next_rand(&st) % (uint64_t)(id - 3));
        if (!letter_token(v, a, 1) || !letter_token(v, b, 0) || v->len[a] + v->len[b] > 12)
            continue;
        rc = add_merge(v, &set, id, a, b);
        if (rc < 0) goto out;
        if (rc == 0) id++;
    }
    rc = 0;
out:
    free(pt);
    free(w);
    free(set.slot);
    if (rc != 0) {
        if (rc == TD_ENOMEM)
            fprintf(stderr, "make-test-model: out of memory building the vocabulary\n");
        mtm_vocab_free(v);
    }
    return rc;
}

void mtm_vocab_free(mtm_vocab *v)
{
    if (v->piece)
        for (int i = 0; i < v->n; i++)
            free(v->piece[i]);
    free(v->piece);
    free(v->len);
    free(v->merge);
    memset(v, 0, sizeof *v);
}

/* GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves,
 * the rest map to U+0100 upwards in byte order. */
static unsigned byte_codepoint(int b)
{
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))
        return (unsigned)b;
    unsigned k = 0;
    for (int c = 0; c < b; c++)
        if (!((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF))) k++;
    return 256u + k;
}

/* Writes a codepoint as a JSON string character (escaped where needed). */
static void put_json_cp(FILE *f, unsigned cp)
{
    if (cp == '"' || cp == '\\')
        fprintf(f, "\\%c", (char)cp);
    else if (cp < 0x20)
        fprintf(f, "\\u%04x", cp);
    else if (cp < 0x80)
        fputc((int)cp, f);
    else if (cp < 0x800)
        fprintf(f, "%c%c", (char)(0xC0 | (cp >> 6)), (char)(0x80 | (cp & 0x3F)));
    else
        fprintf(f, "%c%c%c", (char)(0xE0 | (cp >> 12)), (char)(0x80 | ((cp >> 6) & 0x3F)),
                (char)(0x80 | (cp & 0x3F)));
}

/* A token as its byte-level string (specials as their text). */
static void put_byte_level(FILE *f, const mtm_vocab *v, int id, const unsigned *map)
{
    for (int i = 0; i < v->len[id]; i++) {
        unsigned char c = (unsigned char)v->piece[id][i];
        put_json_cp(f, id < 3 ? c : map[c]);
    }
}

int mtm_write_tokenizer_json(const mtm_vocab *v, const char *path)
{
    unsigned map[256];
    for (int b = 0; b < 256; b++)
        map[b] = byte_codepoint(b);
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return TD_EIO;
    }
    fputs("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n", f);
    fputs("  \"added_tokens\": [\n", f);
    for (int i = 0; i < 3; i++)
        fprintf(f,
                "    {\"id\": %d, \"content\": \"%s\", \"single_word\": false, \"lstrip\": "
                "false, \"rstrip\": false, \"normalized\": false, \"special\": true}%s\n",
                i, v->piece[i], i < 2 ? "," : "");
    fputs("  ],\n  \"normalizer\": null,\n", f);
    fputs("  \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
          "\"trim_offsets\": true, \"use_regex\": true},\n",
          f);
    fputs("  \"post_processor\": null,\n", f);
    fputs("  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, "
          "\"trim_offsets\": true, \"use_regex\": true},\n",
          f);
    fputs("  \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, "
          "\"continuing_subword_prefix\": null, \"end_of_word_suffix\": null, "
          "\"fuse_unk\": false, \"byte_fallback\": false, \"ignore_merges\": false,\n",
          f);
    fputs("    \"vocab\": {\n", f);
    for (int id = 0; id < v->n; id++) {
        fputs("      \"", f);
        put_byte_level(f, v, id, map);
        fprintf(f, "\": %d%s\n", id, id + 1 < v->n ? "," : "");
    }
    fputs("    },\n    \"merges\": [\n", f);
    for (int id = MTM_VOCAB_FIRST_MERGE; id < v->n; id++) {
        const int *m = v->merge[id - MTM_VOCAB_FIRST_MERGE];
        fputs("      \"", f);
        put_byte_level(f, v, m[0], map);
        fputc(' ', f);
        put_byte_level(f, v, m[1], map);
        fprintf(f, "\"%s\n", id + 1 < v->n ? "," : "");
    }
    fputs("    ]\n  }\n}\n", f);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        fprintf(stderr, "make-test-model: write error on %s\n", path);
        return TD_EIO;
    }
    return 0;
}

int mtm_write_tokenizer_config(const mtm_shape *s, const char *path)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return TD_EIO;
    }
    fprintf(f,
            "{\n  \"add_bos_token\": true,\n  \"add_eos_token\": false,\n"
            "  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\",\n  \"unk_token\": \"<unk>\",\n"
            "  \"model_max_length\": %d,\n  \"clean_up_tokenization_spaces\": false,\n"
            "  \"tokenizer_class\": \"PreTrainedTokenizerFast\",\n"
            "  \"added_tokens_decoder\": {\n",
            s->seq_len);
    static const char *sp[3] = {"<unk>", "<s>", "</s>"};
    for (int i = 0; i < 3; i++)
        fprintf(f,
                "    \"%d\": {\"content\": \"%s\", \"lstrip\": false, \"normalized\": false, "
                "\"rstrip\": false, \"single_word\": false, \"special\": true}%s\n",
                i, sp[i], i < 2 ? "," : "");
    fputs("  }\n}\n", f);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        fprintf(stderr, "make-test-model: write error on %s\n", path);
        return TD_EIO;
    }
    return 0;
}

int mtm_write_tokenizer_bin(const mtm_vocab *v, const char *path)
{
    /* llama2.c looks single characters up by their text and falls back to id
     * 3 + byte, so printable ASCII bytes are stored as themselves (same id)
     * and merges can find their parts by concatenation; other bytes use the
     * "<0xHH>" form its decoder understands. BOS/EOS carry llama2.c's
     * newline-wrapped text. Merge priority is the score: -rank. */
    char tmp[16];
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return TD_EIO;
    }
    int rc = 0;
    int32_t max_len = 6;
    for (int id = 0; id < v->n; id++)
        if (v->len[id] > max_len) max_len = v->len[id];
    if ((rc = mtm_fwrite(f, &max_len, 4, path)) != 0) goto out;
    for (int id = 0; id < v->n && rc == 0; id++) {
        const char *p = v->piece[id];
        int32_t len = v->len[id];
        float score = 0.0f;
        if (id == 1 || id == 2) {
            p = id == 1 ? "\n<s>\n" : "\n</s>\n";
            len = (int32_t)strlen(p);
        } else if (id >= 3 && id < MTM_VOCAB_FIRST_MERGE) {
            unsigned char c = (unsigned char)p[0];
            if (c < 0x20 || c > 0x7E) {
                snprintf(tmp, sizeof tmp, "<0x%02X>", c);
                p = tmp;
                len = 6;
            }
        } else if (id >= MTM_VOCAB_FIRST_MERGE) {
            score = -(float)(id - MTM_VOCAB_FIRST_MERGE);
        }
        if ((rc = mtm_fwrite(f, &score, 4, path)) == 0 && (rc = mtm_fwrite(f, &len, 4, path)) == 0)
            rc = mtm_fwrite(f, p, (size_t)len, path);
    }
out:
    if (fclose(f) != 0 && rc == 0) {
        fprintf(stderr, "make-test-model: write error on %s\n", path);
        rc = TD_EIO;
    }
    return rc;
}

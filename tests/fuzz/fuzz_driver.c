/* fuzz_driver: runs a libFuzzer target without libFuzzer, so every fuzz target
 * is also a plain unit test that any compiler builds.
 *
 *   fuzz_x CORPUS_DIR [MUTATIONS [SEED]]
 *
 * Runs LLVMFuzzerTestOneInput over every regular file in CORPUS_DIR (sorted by
 * name), then over MUTATIONS (default 1000) inputs made from those files by a
 * seeded, deterministic mutator (bit flips, interesting bytes, inserted,
 * deleted and duplicated runs, truncation, splices of two seeds). The same
 * SEED gives the same inputs on every machine, so a failure reproduces with
 * the same command. Crashes show as the sanitizer's report (the CTest stage
 * with ASan+UBSan); the exit status is 0 when every input ran.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define DRIVER_MAX_INPUT (1u << 20) /* bytes; larger seeds are skipped */

struct seed {
    char *name;
    uint8_t *data;
    size_t len;
};

static uint64_t rng_state;

/* splitmix64: small, fast, and the same everywhere. */
static uint64_t rng(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static size_t rnd(size_t n) /* uniform-ish in [0, n); n > 0 */
{
    return (size_t)(rng() % n);
}

static int cmp_seed(const void *a, const void *b)
{
    return strcmp(((const struct seed *)a)->name, ((const struct seed *)b)->name);
}

static int read_file(const char *path, uint8_t **data, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) return -1;
    uint8_t *buf = malloc(DRIVER_MAX_INPUT);
    if (!buf) {
        fclose(fp);
        return -1;
    }
    size_t n = fread(buf, 1, DRIVER_MAX_INPUT, fp);
    int rc = ferror(fp) || !feof(fp) ? -1 : 0;
    fclose(fp);
    if (rc < 0) {
        free(buf);
        return -1;
    }
    *data = buf;
    *len = n;
    return 0;
}

static int load_corpus(const char *dir, struct seed **out, size_t *n_out)
{
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "fuzz_driver: cannot open corpus directory %s\n", dir);
        return -1;
    }
    struct seed *seeds = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        struct stat st;
        if (snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) >= (int)sizeof(path)) continue;
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            struct seed *ns = realloc(seeds, cap * sizeof(*ns));
            if (!ns) break;
            seeds = ns;
        }
        struct seed s = {strdup(e->d_name), NULL, 0};
        if (!s.name || read_file(path, &s.data, &s.len) < 0) {
            fprintf(stderr, "fuzz_driver: cannot read %s (or larger than %u bytes)\n", path,
                    DRIVER_MAX_INPUT);
            free(s.name);
            continue;
        }
        seeds[n++] = s;
    }
    closedir(d);
    if (n) qsort(seeds, n, sizeof(*seeds), cmp_seed);
    *out = seeds;
    *n_out = n;
    return 0;
}

static const uint8_t interesting[] = {0,    1,    0x7f, 0x80, 0xff, '"',  '\\', '{', '}', '[',
                                      ']',  ',',  ':',  '\n', '\r', '0',  '9',  '-', '.', 'e',
                                      0xc3, 0xe2, 0xf0, 0xf4, ' ',  '\t', '<',  '>'};

/* One mutation of buf[0..*len) in place; cap is the buffer size. */
static void mutate_once(uint8_t *buf, size_t *len, size_t cap, const struct seed *other)
{
    size_t n = *len;
    switch (rnd(8)) {
    case 0: /* flip a bit */
        if (n) buf[rnd(n)] ^= (uint8_t)(1u << rnd(8));
        break;
    case 1: /* interesting byte */
        if (n) buf[rnd(n)] = interesting[rnd(sizeof(interesting))];
        break;
    case 2: /* random byte */
        if (n) buf[rnd(n)] = (uint8_t)rng();
        break;
    case 3: { /* delete a run */
        if (!n) break;
        size_t at = rnd(n), k = 1 + rnd(n - at < 16 ? n - at : 16);
        memmove(buf + at, buf + at + k, n - at - k);
        *len = n - k;
        break;
    }
    case 4: { /* insert a run of one byte */
        size_t k = 1 + rnd(16);
        if (n + k > cap) break;
        size_t at = rnd(n + 1);
        memmove(buf + at + k, buf + at, n - at);
        memset(buf + at, interesting[rnd(sizeof(interesting))], k);
        *len = n + k;
        break;
    }
    case 5: { /* duplicate a run */
        if (!n) break;
        size_t from = rnd(n), k = 1 + rnd(n - from < 64 ? n - from : 64);
        if (n + k > cap) break;
        size_t at = rnd(n + 1);
        uint8_t tmp[64];
        memcpy(tmp, buf + from, k);
        memmove(buf + at + k, buf + at, n - at);
        memcpy(buf + at, tmp, k);
        *len = n + k;
        break;
    }
    case 6: /* truncate */
        if (n) *len = rnd(n + 1);
        break;
    default: { /* splice: our head, the other seed's tail */
        if (!other || !other->len) break;
        size_t at = rnd(n + 1), from = rnd(other->len), k = other->len - from;
        if (at + k > cap) k = cap - at;
        memcpy(buf + at, other->data + from, k);
        *len = at + k;
        break;
    }
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR [MUTATIONS [SEED]]\n", argv[0]);
        return 2;
    }
    long mutations = argc > 2 ? strtol(argv[2], NULL, 10) : 1000;
    rng_state = argc > 3 ? strtoull(argv[3], NULL, 10) : 1;
    struct seed *seeds;
    size_t n;
    if (load_corpus(argv[1], &seeds, &n) < 0) return 2;
    if (n == 0) {
        fprintf(stderr, "fuzz_driver: no seeds in %s\n", argv[1]);
        return 2;
    }
    for (size_t i = 0; i < n; i++) {
        /* A private copy, so a read past the end shows under ASan. */
        uint8_t *copy = malloc(seeds[i].len ? seeds[i].len : 1);
        if (!copy) return 2;
        memcpy(copy, seeds[i].data, seeds[i].len);
        LLVMFuzzerTestOneInput(copy, seeds[i].len);
        free(copy);
    }
    size_t cap = 0;
    for (size_t i = 0; i < n; i++)
        if (seeds[i].len > cap) cap = seeds[i].len;
    cap = cap * 2 + 64;
    uint8_t *buf = malloc(cap);
    if (!buf) return 2;
    for (long m = 0; m < mutations; m++) {
        const struct seed *s = &seeds[rnd(n)];
        size_t len = s->len;
        memcpy(buf, s->data, len);
        int k = 1 + (int)rnd(4);
        for (int j = 0; j < k; j++)
            mutate_once(buf, &len, cap, &seeds[rnd(n)]);
        /* Exactly len bytes, so a read past the end shows under ASan. */
        uint8_t *in = malloc(len ? len : 1);
        if (!in) return 2;
        memcpy(in, buf, len);
        LLVMFuzzerTestOneInput(in, len);
        free(in);
    }
    free(buf);
    for (size_t i = 0; i < n; i++) {
        free(seeds[i].name);
        free(seeds[i].data);
    }
    free(seeds);
    printf("%s: %zu seeds, %ld mutations: ok\n", argv[0], n, mutations);
    return 0;
}

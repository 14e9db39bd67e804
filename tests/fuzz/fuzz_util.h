/* fuzz_util: helpers shared by the fuzz targets (header only).
 *
 * Loaders that take a path get their input through files in a private
 * temporary directory (made once per process, removed at exit). Inputs that
 * stand for several files are split at FUZZ_SEP: part 0 is the first file,
 * part 1 the second, and so on; a missing part means that file is absent.
 */
#ifndef TANDEM_TESTS_FUZZ_UTIL_H
#define TANDEM_TESTS_FUZZ_UTIL_H

#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"

#define FUZZ_SEP       "\n@@@@\n"
#define FUZZ_SEP_LEN   6
#define FUZZ_MAX_PARTS 8

typedef struct fuzz_part {
    const uint8_t *data;
    size_t len;
} fuzz_part;

/* Splits data at FUZZ_SEP into at most max parts (the last one takes the
 * rest). Returns the number of parts (>= 1). */
static inline int fuzz_split(const uint8_t *data, size_t size, fuzz_part *parts, int max)
{
    int n = 0;
    size_t start = 0;
    for (size_t i = 0; n < max - 1 && i + FUZZ_SEP_LEN <= size; i++) {
        if (memcmp(data + i, FUZZ_SEP, FUZZ_SEP_LEN) == 0) {
            parts[n].data = data + start;
            parts[n].len = i - start;
            n++;
            i += FUZZ_SEP_LEN - 1;
            start = i + 1;
        }
    }
    parts[n].data = data + start;
    parts[n].len = size - start;
    return n + 1;
}

static char fuzz__dir[64];

static int fuzz__rm(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void fuzz__cleanup(void)
{
    /* The directory holds only files and folders this process made. */
    if (fuzz__dir[0] && nftw(fuzz__dir, fuzz__rm, 8, FTW_DEPTH | FTW_PHYS) != 0)
        fprintf(stderr, "fuzz: could not remove %s\n", fuzz__dir);
}

/* The process's temporary directory; aborts the fuzz process if none can be
 * made (a harness failure, not a finding). */
static inline const char *fuzz_dir(void)
{
    if (!fuzz__dir[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(fuzz__dir, sizeof(fuzz__dir), "%s/tandem-fuzz-XXXXXX",
                 tmp && strlen(tmp) < 40 ? tmp : "/tmp");
        if (!mkdtemp(fuzz__dir)) {
            perror("fuzz: mkdtemp");
            abort();
        }
        atexit(fuzz__cleanup);
    }
    return fuzz__dir;
}

/* Writes data to fuzz_dir()/name (replacing it); the path goes to out[cap]
 * and is returned. */
static inline const char *fuzz_write(const char *name, const void *data, size_t len, char *out,
                                     size_t cap)
{
    snprintf(out, cap, "%s/%s", fuzz_dir(), name);
    FILE *fp = fopen(out, "wb");
    if (!fp) {
        perror("fuzz: fopen");
        abort();
    }
    int bad = len && fwrite(data, 1, len, fp) != len;
    if (fclose(fp) != 0 || bad) {
        perror("fuzz: write");
        abort();
    }
    return out;
}

/* Removes fuzz_dir()/name if present. */
static inline void fuzz_remove(const char *name)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", fuzz_dir(), name);
    unlink(path);
}

/* Silences the libraries' logs (errors are what fuzzing provokes), unless
 * FUZZ_VERBOSE is set. Call at the top of every target. */
static inline void fuzz_quiet(void)
{
    static int done;
    if (done) return;
    done = 1;
    if (!getenv("FUZZ_VERBOSE")) td_log_set_level(TD_LOG_OFF);
}

#endif

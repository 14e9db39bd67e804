/* fuzz_safetensors: sft_open on an arbitrary file, then every tensor's first
 * and last data byte (a range outside the mapping faults). Input: the file. */
#include <stdint.h>
#include <string.h>

#include "engine/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    char path[256];
    fuzz_write("model.safetensors", data, size, path, sizeof(path));
    sft_file *f = NULL;
    char err[256];
    int rc = sft_open(path, &f, err, sizeof(err));
    if (getenv("FUZZ_VERBOSE")) fprintf(stderr, "sft_open: %d %s\n", rc, rc ? err : "");
    if (rc != 0) return 0;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < sft_count(f); i++) {
        const sft_tensor *t = sft_at(f, i);
        if (sft_find(f, t->name) == NULL) abort(); /* every listed name is found */
        if (t->ndim < 0 || t->ndim > SFT_MAX_DIMS) abort();
        if (t->nbytes) {
            sink ^= ((const uint8_t *)t->data)[0];
            sink ^= ((const uint8_t *)t->data)[t->nbytes - 1];
        }
        (void)strlen(t->dtype_name);
    }
    (void)sink;
    sft_close(f);
    return 0;
}

/* fuzz_model_file: mdl_load on a single-file checkpoint, GGUF (by its magic)
 * or llama2.c. Built twice, with a GGUF and a llama2.c seed corpus.
 * Input: the file. A model that loads is fingerprinted. */
#include <stdint.h>
#include <string.h>

#include "engine/model.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    char path[256];
    fuzz_write("model.bin", data, size, path, sizeof(path));
    mdl_model *m = NULL;
    char err[256];
    int rc = mdl_load(path, &m, err, sizeof(err));
    if (getenv("FUZZ_VERBOSE")) fprintf(stderr, "mdl_load: %d %s\n", rc, rc ? err : "");
    if (rc == 0) (void)mdl_fingerprint(m);
    mdl_free(m);
    return 0;
}

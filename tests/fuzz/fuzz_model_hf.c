/* fuzz_model_hf: mdl_load on a Hugging Face model directory.
 * Input: config.json [SEP model.safetensors [SEP model.safetensors.index.json
 * [SEP model-00001-of-00001.safetensors]]] (fuzz_util.h); a file not given is
 * absent. A model that loads is fingerprinted (reads samples of weights). */
#include <stdint.h>
#include <string.h>

#include "engine/model.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    static const char *const names[] = {"config.json", "model.safetensors",
                                        "model.safetensors.index.json",
                                        "model-00001-of-00001.safetensors"};
    fuzz_part parts[4];
    int n = fuzz_split(data, size, parts, 4);
    char path[256];
    for (int i = 0; i < 4; i++) {
        /* an empty part means the file is absent (the index seed leaves out
         * model.safetensors that way) */
        if (i < n && parts[i].len > 0)
            fuzz_write(names[i], parts[i].data, parts[i].len, path, sizeof(path));
        else
            fuzz_remove(names[i]);
    }
    mdl_model *m = NULL;
    char err[256];
    int rc = mdl_load(fuzz_dir(), &m, err, sizeof(err));
    if (getenv("FUZZ_VERBOSE")) fprintf(stderr, "mdl_load: %d %s\n", rc, rc ? err : "");
    if (rc == 0) (void)mdl_fingerprint(m);
    mdl_free(m);
    return 0;
}

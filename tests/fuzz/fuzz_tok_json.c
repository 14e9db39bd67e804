/* fuzz_tok_json: Hugging Face tokenizer.json with its side files.
 * Input: tokenizer.json [SEP tokenizer_config.json [SEP generation_config.json
 * [SEP config.json]]] (fuzz_util.h); a side file not given is absent. */
#include <stdint.h>
#include <string.h>

#include "engine/tokenizer/tok.h"
#include "tests/fuzz/fuzz_tok_common.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    static const char *const names[] = {"tokenizer.json", "tokenizer_config.json",
                                        "generation_config.json", "config.json"};
    fuzz_part parts[4];
    int n = fuzz_split(data, size, parts, 4);
    char path[256];
    for (int i = 0; i < 4; i++) {
        if (i < n)
            fuzz_write(names[i], parts[i].data, parts[i].len, path, sizeof(path));
        else
            fuzz_remove(names[i]);
    }
    tok_tokenizer *t = NULL;
    char err[256];
    int rc = tok_load(fuzz_dir(), &t, err, sizeof(err));
    if (getenv("FUZZ_VERBOSE")) fprintf(stderr, "tok_load: %d %s\n", rc, rc ? err : "");
    if (rc == 0) fuzz_tok_exercise(t);
    tok_free(t);
    return 0;
}

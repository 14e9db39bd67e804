/* fuzz_tok_gpt2: GPT-2 style vocab.json + merges.txt.
 * Input: vocab.json [SEP merges.txt] (fuzz_util.h). */
#include <stdint.h>
#include <string.h>

#include "engine/tokenizer/tok.h"
#include "tests/fuzz/fuzz_tok_common.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    fuzz_part parts[2];
    int n = fuzz_split(data, size, parts, 2);
    char path[256], mpath[256];
    if (n > 1)
        fuzz_write("merges.txt", parts[1].data, parts[1].len, mpath, sizeof(mpath));
    else
        fuzz_remove("merges.txt");
    fuzz_write("vocab.json", parts[0].data, parts[0].len, path, sizeof(path));
    tok_tokenizer *t = NULL;
    char err[256];
    int rc = tok_load(path, &t, err, sizeof(err));
    if (getenv("FUZZ_VERBOSE")) fprintf(stderr, "tok_load: %d %s\n", rc, rc ? err : "");
    if (rc == 0) fuzz_tok_exercise(t);
    tok_free(t);
    return 0;
}

/* fuzz_tok_l2c: llama2.c tokenizer.bin. Input: the file. */
#include <stdint.h>
#include <string.h>

#include "engine/tokenizer/tok.h"
#include "tests/fuzz/fuzz_tok_common.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    char path[256];
    fuzz_write("tokenizer.bin", data, size, path, sizeof(path));
    tok_tokenizer *t = NULL;
    char err[256];
    int rc = tok_load(path, &t, err, sizeof(err));
    if (getenv("FUZZ_VERBOSE")) fprintf(stderr, "tok_load: %d %s\n", rc, rc ? err : "");
    if (rc == 0) fuzz_tok_exercise(t);
    tok_free(t);
    return 0;
}

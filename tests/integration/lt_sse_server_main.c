/* lt-sse-server: the test SSE server as a process, for script tests.
 *   lt-sse-server [ok|stall|close|reject|no_done|trickle] [TOKENS] [REJECT_FIRST]
 * REJECT_FIRST: the first N requests get a 429 with Retry-After: 1.
 * Prints "port=N" on stdout, then serves on 127.0.0.1 until stdin closes. */
#include "lt_sse_server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    static const char *const modes[] = {"ok", "stall", "close", "reject", "no_done", "trickle"};
    enum lt_sse_mode mode = LT_SSE_OK;
    if (argc > 1) {
        int found = 0;
        for (int i = 0; i < 6; i++) {
            if (strcmp(argv[1], modes[i]) == 0) {
                mode = (enum lt_sse_mode)i;
                found = 1;
            }
        }
        if (!found) {
            fprintf(stderr, "usage: lt-sse-server [ok|stall|close|reject|no_done|trickle] [TOKENS] "
                            "[REJECT_FIRST]\n");
            return 2;
        }
    }
    int tokens = argc > 2 ? atoi(argv[2]) : 0;
    int reject_first = argc > 3 ? atoi(argv[3]) : 0;
    lt_sse_server *s;
    if (lt_sse_server_start(mode, tokens, &s) != 0) {
        fprintf(stderr, "lt-sse-server: cannot start\n");
        return 1;
    }
    if (reject_first > 0) lt_sse_server_reject_first(s, (size_t)reject_first);
    printf("port=%d\n", lt_sse_server_port(s));
    fflush(stdout);
    char buf[256];
    while (read(0, buf, sizeof(buf)) > 0) {
    }
    fprintf(stderr, "lt-sse-server: served %zu requests\n", lt_sse_server_requests(s));
    lt_sse_server_stop(s);
    return 0;
}

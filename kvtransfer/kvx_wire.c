/* kvx_wire: handshake comparison (see kvx_wire.h). */
#include "kvtransfer/kvx_wire.h"

#include <stdio.h>
#include <string.h>

#include "common/err.h"

_Static_assert(sizeof(kvx_wire_hdr) == 16, "wire header size");
_Static_assert(sizeof(kvx_wire_hello) == 336, "hello size");
_Static_assert(sizeof(kvx_wire_req) == 24, "req size");
_Static_assert(sizeof(kvx_wire_frame) == 32, "frame size");
_Static_assert(sizeof(kvx_wire_data_hello) == 16, "data hello size");

static int fail(const char *f, char *field, size_t field_len, char *msg, size_t msg_len,
                const char *fmt_local_remote)
{
    if (field && field_len) snprintf(field, field_len, "%s", f);
    if (msg && msg_len) snprintf(msg, msg_len, "%s mismatch: %s", f, fmt_local_remote);
    return TD_EMISMATCH;
}

int kvx_wire_hello_check(const kvx_wire_hello *l, const kvx_wire_hello *r, char *field,
                         size_t field_len, char *msg, size_t msg_len)
{
    char v[160];
#define CHECK_U(name, fmtspec, cast)                                                               \
    if (l->name != r->name) {                                                                      \
        snprintf(v, sizeof(v), "local=" fmtspec " remote=" fmtspec, (cast)l->name, (cast)r->name); \
        return fail(#name, field, field_len, msg, msg_len, v);                                     \
    }
    CHECK_U(version, "%u", unsigned)
    if (strncmp(l->transport, r->transport, sizeof(l->transport)) != 0) {
        snprintf(v, sizeof(v), "local=%.16s remote=%.16s", l->transport, r->transport);
        return fail("transport", field, field_len, msg, msg_len, v);
    }
    CHECK_U(fingerprint, "%016llx", unsigned long long)
    CHECK_U(dtype, "%u", unsigned)
    CHECK_U(block_size, "%u", unsigned)
    CHECK_U(block_bytes, "%llu", unsigned long long)
    CHECK_U(n_layers, "%u", unsigned)
    CHECK_U(layout, "%u", unsigned)
#undef CHECK_U
    if (field && field_len) field[0] = 0;
    if (msg && msg_len) msg[0] = 0;
    return 0;
}

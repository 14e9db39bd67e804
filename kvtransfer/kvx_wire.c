/* kvx_wire: decoders for peer bytes and the handshake comparison (see kvx_wire.h). */
#include "kvtransfer/kvx_wire.h"

#include <stdio.h>
#include <string.h>

#include "common/err.h"
#include "kvtransfer/kvx.h"

_Static_assert(sizeof(kvx_wire_hdr) == 16, "wire header size");
_Static_assert(sizeof(kvx_wire_hello) == 336, "hello size");
_Static_assert(sizeof(kvx_wire_req) == 24, "req size");
_Static_assert(sizeof(kvx_wire_frame) == 32, "frame size");
_Static_assert(sizeof(kvx_wire_run) == sizeof(kvx_wire_frame), "a run head is a frame head's size");
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

int kvx_wire_msg_next(const uint8_t *buf, size_t len, kvx_wire_hdr *hdr, const uint8_t **body,
                      size_t *used)
{
    if (len < sizeof(*hdr)) return 0;
    memcpy(hdr, buf, sizeof(*hdr));
    if (hdr->magic != KVX_WIRE_MAGIC_CTRL || hdr->len > KVX_WIRE_MAX_BODY) return TD_EPROTO;
    if (len - sizeof(*hdr) < hdr->len) return 0;
    *body = buf + sizeof(*hdr);
    *used = sizeof(*hdr) + hdr->len;
    return 1;
}

int kvx_wire_req_decode(uint16_t type, const uint8_t *body, uint32_t len, kvx_wire_req *req,
                        const uint8_t **tail, uint32_t *tail_len)
{
    if (len < sizeof(*req)) return TD_EPROTO;
    memcpy(req, body, sizeof(*req));
    *tail = body + sizeof(*req);
    *tail_len = len - (uint32_t)sizeof(*req);
    uint64_t want; /* tail bytes req->n stands for */
    switch (type) {
    case KVX_MSG_BEGIN:
        if (req->n == 0 || req->n >= KVX_REQ_ID_MAX) return TD_EPROTO;
        want = req->n;
        break;
    case KVX_MSG_BEGIN_ACK:
        if (req->n == 0) return TD_EPROTO;
        want = (uint64_t)req->n * sizeof(uint32_t);
        break;
    case KVX_MSG_POST:
        want = (uint64_t)req->n * sizeof(kvx_pair);
        break;
    case KVX_MSG_CANCEL:
    case KVX_MSG_CANCEL_ACK:
    case KVX_MSG_DONE:
    case KVX_MSG_FAIL:
        want = 0;
        break;
    default:
        return TD_EPROTO;
    }
    return want == *tail_len ? 0 : TD_EPROTO;
}

int kvx_wire_hello_decode(const uint8_t *body, uint32_t len, kvx_wire_hello *out)
{
    if (len != sizeof(*out)) return TD_EPROTO;
    memcpy(out, body, sizeof(*out));
    out->transport[sizeof(out->transport) - 1] = 0;
    return out->extra_len <= KVX_WIRE_EXTRA_MAX ? 0 : TD_EPROTO;
}

int kvx_wire_frame_check(const kvx_wire_frame *f, uint64_t block_bytes, uint32_t n_layers,
                         uint32_t num_blocks, char *msg, size_t msg_len)
{
    if (f->magic != KVX_WIRE_MAGIC_FRAME || f->len != block_bytes) {
        if (msg && msg_len)
            snprintf(msg, msg_len, "bad frame header magic=%08x len=%llu", f->magic,
                     (unsigned long long)f->len);
        return TD_EPROTO;
    }
    if (f->layer >= n_layers || f->dst >= num_blocks) {
        if (msg && msg_len)
            snprintf(msg, msg_len, "frame out of range layer=%u dst=%u", f->layer, f->dst);
        return TD_EPROTO;
    }
    return 0;
}

int kvx_wire_run_check(const kvx_wire_run *r, char *msg, size_t msg_len)
{
    if (r->magic != KVX_WIRE_MAGIC_RUN || r->n == 0 || r->n > KVX_WIRE_RUN_MAX) {
        if (msg && msg_len) snprintf(msg, msg_len, "bad run head magic=%08x n=%u", r->magic, r->n);
        return TD_EPROTO;
    }
    return 0;
}

/* fuzz_kvx_wire: the kvx wire decoders (kvtransfer/kvx_wire.h) on arbitrary
 * bytes, as the receiving code applies them.
 *
 * Input: one control byte, then a byte stream. Control % 3: 0 = a pending
 * connection's first message (HELLO or DATA_HELLO) and a connecting sender's
 * reply (HELLO_ACK or HELLO_NAK), 1 = a control stream (messages split as
 * kvx_peer.c's kvx__peer_on_ctrl does, each request body decoded for its
 * type), 2 = a data connection stream of frame headers and payloads. */
#include <stdint.h>
#include <string.h>

#include "common/err.h"
#include "kvtransfer/kvx.h"
#include "kvtransfer/kvx_wire.h"
#include "tests/fuzz/fuzz_util.h"

static void local_hello(kvx_wire_hello *h)
{
    memset(h, 0, sizeof(*h));
    h->version = KVX_WIRE_VERSION;
    h->layout = KVX_WIRE_LAYOUT_LAYER_MAJOR;
    h->fingerprint = 0x1234;
    h->block_size = 16;
    h->block_bytes = 4096;
    h->n_layers = 2;
    h->num_blocks = 64;
    memcpy(h->transport, "tcp", 4);
}

static void handshake(const uint8_t *p, size_t n)
{
    kvx_wire_hello local;
    local_hello(&local);
    size_t off = 0;
    for (int i = 0; i < 4; i++) {
        kvx_wire_hdr h;
        const uint8_t *body;
        size_t used;
        if (kvx_wire_msg_next(p + off, n - off, &h, &body, &used) != 1) return;
        if (used > n - off || body + h.len != p + off + used) abort(); /* inside the input */
        if (h.type == KVX_MSG_HELLO || h.type == KVX_MSG_HELLO_ACK) {
            kvx_wire_hello remote;
            if (kvx_wire_hello_decode(body, h.len, &remote) == 0) {
                if (strnlen(remote.transport, sizeof(remote.transport)) >= sizeof(remote.transport))
                    abort(); /* NUL-terminated, as promised */
                char field[32], msg[256];
                int rc =
                    kvx_wire_hello_check(&local, &remote, field, sizeof(field), msg, sizeof(msg));
                if (rc != 0 && rc != TD_EMISMATCH) abort();
                if (rc == 0 && kvx_wire_hello_check(&remote, &local, NULL, 0, NULL, 0) != 0)
                    abort(); /* symmetric */
            }
        } else if (h.type == KVX_MSG_HELLO_NAK && h.len == sizeof(kvx_wire_nak)) {
            kvx_wire_nak nak;
            memcpy(&nak, body, sizeof(nak));
            nak.msg[sizeof(nak.msg) - 1] = 0; /* as kvx_handshake.c does before printing it */
            (void)strlen(nak.msg);
        } else if (h.type == KVX_MSG_DATA_HELLO && h.len == sizeof(kvx_wire_data_hello)) {
            kvx_wire_data_hello dh;
            memcpy(&dh, body, sizeof(dh));
            (void)dh;
        }
        off += used;
    }
}

static void control(const uint8_t *p, size_t n)
{
    size_t off = 0;
    for (;;) {
        kvx_wire_hdr h;
        const uint8_t *body;
        size_t used;
        int rc = kvx_wire_msg_next(p + off, n - off, &h, &body, &used);
        if (rc != 1) return;
        if (used > n - off) abort();
        kvx_wire_req m;
        const uint8_t *tail;
        uint32_t tail_len;
        if (kvx_wire_req_decode(h.type, body, h.len, &m, &tail, &tail_len) == 0) {
            if (tail + tail_len != body + h.len) abort();
            /* what the handlers then read */
            if (h.type == KVX_MSG_BEGIN) {
                char id[KVX_REQ_ID_MAX];
                if (m.n >= sizeof(id)) abort();
                memcpy(id, tail, m.n);
                id[m.n] = 0;
            } else if (h.type == KVX_MSG_BEGIN_ACK || h.type == KVX_MSG_POST) {
                size_t each = h.type == KVX_MSG_POST ? sizeof(kvx_pair) : sizeof(uint32_t);
                volatile uint32_t sum = 0;
                for (uint32_t i = 0; i < m.n; i++) {
                    uint32_t v;
                    memcpy(&v, tail + (size_t)i * each, sizeof(v));
                    sum += v;
                }
                (void)sum;
            } else {
                (void)td_strerror(m.err);
            }
        }
        off += used;
    }
}

/* A data connection's stream as the tcp reader walks it: heads of 32 bytes,
 * each a frame (then its payload) or a run (then n frame headers, then n
 * payloads); nothing past a bad head is read. */
static void frames(const uint8_t *p, size_t n)
{
    const uint64_t block_bytes = 16;
    size_t off = 0;
    while (n - off >= sizeof(kvx_wire_frame)) {
        kvx_wire_frame f;
        kvx_wire_run r;
        memcpy(&f, p + off, sizeof(f));
        memcpy(&r, p + off, sizeof(r));
        char msg[96];
        off += sizeof(f);
        uint32_t count = 1;
        if (r.magic == KVX_WIRE_MAGIC_RUN) {
            if (kvx_wire_run_check(&r, msg, sizeof(msg)) < 0) return;
            if (r.n == 0 || r.n > KVX_WIRE_RUN_MAX) abort();
            count = r.n;
            for (uint32_t i = 0; i < count; i++) {
                if (n - off < sizeof(f)) return;
                memcpy(&f, p + off, sizeof(f));
                off += sizeof(f);
                if (kvx_wire_frame_check(&f, block_bytes, 2, 64, msg, sizeof(msg)) < 0) return;
                if (f.len != block_bytes || f.layer >= 2 || f.dst >= 64) abort();
            }
        } else {
            if (kvx_wire_frame_check(&f, block_bytes, 2, 64, msg, sizeof(msg)) < 0) return;
            if (f.len != block_bytes || f.layer >= 2 || f.dst >= 64) abort();
        }
        size_t want = (size_t)count * block_bytes;
        off += n - off < want ? n - off : want;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_quiet();
    if (size < 1) return 0;
    switch (data[0] % 3) {
    case 0:
        handshake(data + 1, size - 1);
        break;
    case 1:
        control(data + 1, size - 1);
        break;
    default:
        frames(data + 1, size - 1);
        break;
    }
    return 0;
}

/* kvx_wire: the kvx wire format (control messages, data frames, handshake).
 *
 * All integers are little-endian (both peers must be little-endian hosts;
 * the handshake's magic catches a big-endian peer). Structures are packed by
 * construction (explicit padding, static sizes asserted in kvx_wire.c).
 *
 * Control connection (one per peer pair; TCP for tcp/nccl, AF_UNIX for
 * shm/cuda_ipc): a stream of messages, each a kvx_wire_hdr followed by
 * hdr.len body bytes (hdr.len <= KVX_WIRE_MAX_BODY).
 *
 *   sender -> receiver  HELLO       kvx_wire_hello (sender's view)
 *   receiver -> sender  HELLO_ACK   kvx_wire_hello (receiver's view; token for
 *                                   data connections; transport extra: nccl
 *                                   unique id / cuda ipc handle; shm passes
 *                                   the memfd with SCM_RIGHTS on this message)
 *                  or   HELLO_NAK   kvx_wire_nak (field, both values)
 *   sender -> receiver  BEGIN       kvx_wire_req (+ request id bytes)
 *   receiver -> sender  BEGIN_ACK   kvx_wire_req, n = registered blocks, then
 *                                   n x uint32 destination block ids
 *   sender -> receiver  POST        kvx_wire_req (layer, n) + n x kvx_pair:
 *                                   shm/cuda_ipc after the copy ("written"),
 *                                   nccl before the grouped sends
 *   either              CANCEL      kvx_wire_req
 *   sender -> receiver  CANCEL_ACK  kvx_wire_req: no more writes for it
 *   receiver -> sender  DONE        kvx_wire_req: every block landed
 *   either              FAIL        kvx_wire_req with err (TD_E*)
 *   either              HEARTBEAT   no body; sent every stall_timeout/4
 *   sender -> receiver  COMM_OPEN   nccl: 128-byte ncclUniqueId of a new comm
 *   sender -> receiver  COMM_CLOSE  nccl: tear down the idle comm
 *
 * Data connection (tcp only; n per peer): first a DATA_HELLO control message
 * (kvx_wire_data_hello: token, index), then a stream of 32-byte heads, each
 * either a kvx_wire_frame followed by exactly len payload bytes (one block of
 * one layer), or a kvx_wire_run: n kvx_wire_frame headers, then their n
 * payloads in the same order (so the receiver knows where every block of the
 * run goes before its bytes arrive, and reads them in one call).
 */
#ifndef TANDEM_KVTRANSFER_KVX_WIRE_H
#define TANDEM_KVTRANSFER_KVX_WIRE_H

#include <stddef.h>
#include <stdint.h>

#define KVX_WIRE_MAGIC_CTRL         0x4358564bu /* "KVXC" */
#define KVX_WIRE_MAGIC_FRAME        0x4658564bu /* "KVXF" */
#define KVX_WIRE_MAGIC_RUN          0x5258564bu /* "KVXR" */
#define KVX_WIRE_RUN_MAX            64u         /* frames in one run */
#define KVX_WIRE_VERSION            2u          /* 2: runs on the data connections */
#define KVX_WIRE_LAYOUT_LAYER_MAJOR 1u          /* kv_layout.h: [layer][block][K|V] */
#define KVX_WIRE_MAX_BODY           (1u << 20)  /* bytes; bounds every control message */
#define KVX_WIRE_EXTRA_MAX          256u

enum kvx_wire_type {
    KVX_MSG_HELLO = 1,
    KVX_MSG_HELLO_ACK = 2,
    KVX_MSG_HELLO_NAK = 3,
    KVX_MSG_DATA_HELLO = 4,
    KVX_MSG_HEARTBEAT = 5,
    KVX_MSG_BEGIN = 6,
    KVX_MSG_BEGIN_ACK = 7,
    KVX_MSG_POST = 8,
    KVX_MSG_CANCEL = 9,
    KVX_MSG_CANCEL_ACK = 10,
    KVX_MSG_DONE = 11,
    KVX_MSG_FAIL = 12,
    KVX_MSG_COMM_OPEN = 13,
    KVX_MSG_COMM_CLOSE = 14,
    KVX_MSG_MAX_TYPE = 14,
};

typedef struct kvx_wire_hdr {
    uint32_t magic; /* KVX_WIRE_MAGIC_CTRL */
    uint16_t type;  /* enum kvx_wire_type */
    uint16_t flags; /* 0 */
    uint32_t len;   /* body bytes */
    uint32_t pad;
} kvx_wire_hdr; /* 16 bytes */

typedef struct kvx_wire_hello {
    uint32_t version;     /* KVX_WIRE_VERSION */
    uint32_t layout;      /* KVX_WIRE_LAYOUT_LAYER_MAJOR */
    uint64_t fingerprint; /* model fingerprint */
    uint32_t dtype;       /* enum kv_dtype */
    uint32_t block_size;  /* tokens per block */
    uint64_t block_bytes; /* bytes per block per layer */
    uint32_t n_layers;
    uint32_t num_blocks; /* pool blocks per layer (informational; bounds checks) */
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint64_t token;        /* ACK: secret naming this peer on data connections */
    uint32_t n_data_conns; /* tcp: data connections the sender will open */
    uint32_t extra_len;    /* bytes used in extra */
    char transport[16];    /* NUL-terminated transport name */
    uint8_t extra[KVX_WIRE_EXTRA_MAX];
} kvx_wire_hello; /* 336 bytes */

typedef struct kvx_wire_nak {
    char field[32];
    char msg[192];
} kvx_wire_nak;

typedef struct kvx_wire_data_hello {
    uint64_t token;
    uint32_t index;
    uint32_t pad;
} kvx_wire_data_hello;

typedef struct kvx_wire_req {
    uint64_t hash;  /* kvx_req_hash(request id) */
    int32_t err;    /* FAIL: TD_E* code */
    uint32_t layer; /* POST */
    uint32_t n;     /* POST: pairs; BEGIN_ACK: block ids; BEGIN: id bytes */
    uint32_t pad;
} kvx_wire_req; /* 24 bytes */

typedef struct kvx_wire_frame {
    uint32_t magic; /* KVX_WIRE_MAGIC_FRAME */
    uint32_t layer;
    uint64_t hash; /* request */
    uint32_t dst;  /* destination block id */
    uint32_t src;  /* source block id (diagnostics) */
    uint64_t len;  /* payload bytes, must equal block_bytes */
} kvx_wire_frame;  /* 32 bytes */

typedef struct kvx_wire_run {
    uint32_t magic; /* KVX_WIRE_MAGIC_RUN */
    uint32_t n;     /* frame headers that follow: 1..KVX_WIRE_RUN_MAX */
    uint8_t pad[24];
} kvx_wire_run; /* 32 bytes: a head, like a frame header */

/* Decoders for bytes from a peer. Each checks everything the receiving code
 * relies on before it touches a field; none allocates or keeps a pointer. */

/* Finds the next control message in buf[0..len). Returns 1 with *hdr, *body
 * (pointing into buf, hdr->len bytes) and *used (header plus body bytes);
 * 0 when buf does not hold a whole message yet; TD_EPROTO for a bad magic or a
 * body longer than KVX_WIRE_MAX_BODY (the stream cannot be resynchronised). */
int kvx_wire_msg_next(const uint8_t *buf, size_t len, kvx_wire_hdr *hdr, const uint8_t **body,
                      size_t *used);

/* Decodes the body of a request message (BEGIN, BEGIN_ACK, POST, CANCEL,
 * CANCEL_ACK, DONE, FAIL): a kvx_wire_req, then a tail whose length must match
 * req.n for the type: BEGIN n id bytes (1 <= n < KVX_REQ_ID_MAX), BEGIN_ACK
 * n >= 1 uint32 block ids, POST n kvx_pair; the other types have no tail.
 * *tail points into body. 0 or TD_EPROTO. */
int kvx_wire_req_decode(uint16_t type, const uint8_t *body, uint32_t len, kvx_wire_req *req,
                        const uint8_t **tail, uint32_t *tail_len);

/* Decodes a HELLO or HELLO_ACK body: exactly sizeof(kvx_wire_hello) bytes,
 * extra_len <= KVX_WIRE_EXTRA_MAX; transport comes back NUL-terminated.
 * 0 or TD_EPROTO. */
int kvx_wire_hello_decode(const uint8_t *body, uint32_t len, kvx_wire_hello *out);

/* Checks a data frame header against the receiver's pool: magic, len ==
 * block_bytes, layer < n_layers, dst < num_blocks. 0 or TD_EPROTO with the
 * reason in msg (caller-owned, may be NULL). */
int kvx_wire_frame_check(const kvx_wire_frame *f, uint64_t block_bytes, uint32_t n_layers,
                         uint32_t num_blocks, char *msg, size_t msg_len);

/* Checks a run head: magic and 1 <= n <= KVX_WIRE_RUN_MAX. 0 or TD_EPROTO
 * with the reason in msg (caller-owned, may be NULL). Each of its frame
 * headers is then checked with kvx_wire_frame_check. */
int kvx_wire_run_check(const kvx_wire_run *r, char *msg, size_t msg_len);

/* Compares two hellos field by field (version, transport, fingerprint, dtype,
 * block_size, block_bytes, n_layers, layout). Returns 0 when they agree, else
 * TD_EMISMATCH with the field name in field and "field mismatch: local=X
 * remote=Y" in msg (both caller-owned, may be NULL). */
int kvx_wire_hello_check(const kvx_wire_hello *local, const kvx_wire_hello *remote, char *field,
                         size_t field_len, char *msg, size_t msg_len);

#endif

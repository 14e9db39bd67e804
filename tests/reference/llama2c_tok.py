"""Decoder for llama2.c tokenizer.bin files, written from the format:

  int32 max_token_length
  then per token: float32 score, int32 length, length bytes (no NUL)

Decoding follows llama2.c's program: a piece "<0xHH>" is the raw byte HH; a
leading space is dropped from the piece right after BOS (id 1); a piece that is
a single unprintable, non-space byte is not printed."""
import re
import struct

_BYTE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


def load(path, vocab_size=None):
    """Returns (pieces: list[bytes], scores: list[float], max_token_length).

    Reads vocab_size tokens, or until the end of the file when None."""
    with open(path, "rb") as f:
        raw = f.read()
    (max_len,) = struct.unpack_from("<i", raw, 0)
    off, pieces, scores = 4, [], []
    while off < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
        score, n = struct.unpack_from("<fi", raw, off)
        off += 8
        if n < 0 or off + n > len(raw):
            raise ValueError(f"{path}: token {len(pieces)} has bad length {n}")
        pieces.append(raw[off : off + n])
        scores.append(score)
        off += n
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ValueError(f"{path}: {len(pieces)} tokens, expected {vocab_size}")
    return pieces, scores, max_len


def _printable(b):
    if len(b) != 1:
        return True
    c = b[0]
    return 32 <= c < 127 or c in b"\t\n\v\f\r"


def decode(pieces, tokens, prev=1, bos=1):
    """Text (bytes) printed for tokens, each following its predecessor."""
    out = []
    for t in tokens:
        p = pieces[t]
        if prev == bos and p.startswith(b" "):
            p = p[1:]
        m = _BYTE.match(p)
        if m:
            p = bytes([int(m.group(1), 16)])
        if _printable(p):
            out.append(p)
        prev = t
    return b"".join(out)

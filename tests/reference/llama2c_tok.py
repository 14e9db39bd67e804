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


def encode(pieces, scores, text, bos=True):
    """Encodes text (str) the way llama2.c's program does: a dummy leading
    space, each UTF-8 character looked up by its text (else byte fallback
    id 3 + byte), then repeatedly merge the adjacent pair whose concatenation
    is a token with the highest score."""
    lookup = {}
    for i, p in enumerate(pieces):
        lookup.setdefault(p, i)
    ids = [1] if bos else []
    data = text.encode("utf-8")
    toks = [lookup[b" "]] if data else []
    i = 0
    while i < len(data):
        n = 1
        while i + n < len(data) and (data[i + n] & 0xC0) == 0x80 and n < 4:
            n += 1
        ch = data[i : i + n]
        if ch in lookup:
            toks.append(lookup[ch])
        else:
            toks.extend(b + 3 for b in ch)
        i += n
    while True:
        best = None
        for j in range(len(toks) - 1):
            t = lookup.get(pieces[toks[j]] + pieces[toks[j + 1]])
            if t is not None and (best is None or scores[t] > best[0]):
                best = (scores[t], j, t)
        if best is None:
            break
        _, j, t = best
        toks[j : j + 2] = [t]
    return ids + toks

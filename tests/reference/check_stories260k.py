#!/usr/bin/env python3
"""Validates the reference on a real trained model.

stories260K.bin (llama2.c) and stories260K-hf (the same weights as an HF
directory, Q/K permuted to the half-split RoPE layout) must both decode
greedily from BOS to the text llama2.c's own program prints
(expected-greedy-200.txt: 200 forward passes from BOS, each printing the
token it chose, stopping early at BOS as llama2.c does). Also checks that permuting the .bin's
wq/wk per head gives the safetensors' q_proj/k_proj exactly.

Exit 0 pass, 1 fail, 77 skip (shared models or numpy missing)."""
import os
import sys

try:
    import numpy as np
except ImportError:
    print("SKIP: numpy is not installed (pip install numpy)")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama2c_tok  # noqa: E402
import ref  # noqa: E402


def hf_from_pair(w, n_heads, hd):
    """llama2.c rows -> HF rows, per head: HF i <- 2i, HF i+hd/2 <- 2i+1."""
    w = w.reshape(n_heads, hd // 2, 2, -1)
    return w.transpose(0, 2, 1, 3).reshape(n_heads * hd, -1)


def main():
    shared = os.environ.get("TANDEM_SHARED_DIR", os.path.join(os.path.dirname(__file__), "../../../shared"))
    d = os.path.join(shared, "models")
    bin_path = os.path.join(d, "stories260K", "stories260K.bin")
    hf_path = os.path.join(d, "stories260K-hf")
    if not (os.path.exists(bin_path) and os.path.isdir(hf_path)):
        print(f"SKIP: stories260K models not found under {d}")
        return 77
    with open(os.path.join(d, "stories260K", "expected-greedy-200.txt"), "rb") as f:
        expected = f.read()
    pieces, _, _ = llama2c_tok.load(os.path.join(d, "stories260K", "tok512.bin"), 512)

    mb, mh = ref.load(bin_path), ref.load(hf_path)
    hd = mb.head_dim
    for i in range(mb.n_layers):
        for name, n in (("wq", mb.n_heads), ("wk", mb.n_kv)):
            if not np.array_equal(hf_from_pair(mb.layers[i][name], n, hd), mh.layers[i][name]):
                print(f"FAIL: layer {i} {name}: permuted .bin rows differ from the safetensors")
                return 1
    print("ok: permuting the .bin's wq/wk per head gives the safetensors' q_proj/k_proj")

    ok = True
    results = {}
    for label, m in (("llama2c", mb), ("hf", mh)):
        sess = ref.Session(m, 200)
        tok, toks = 1, []
        for pos in range(200):  # llama2.c: --steps 200 = 200 forward passes
            nxt = int(np.argmax(sess.step(tok)))
            if nxt == 1:
                break
            toks.append(nxt)
            tok = nxt
        text = llama2c_tok.decode(pieces, toks)
        results[label] = toks
        if text.rstrip(b"\n") != expected.rstrip(b"\n"):
            print(f"FAIL: {label}: greedy text differs from expected-greedy-200.txt")
            print("got:     ", text[:300])
            print("expected:", expected[:300])
            ok = False
        else:
            print(f"ok: {label}: {len(toks)} greedy tokens decode to expected-greedy-200.txt")
    if results["llama2c"] != results["hf"]:
        print("FAIL: llama2c and hf token sequences differ")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Independent numpy reference for Llama-family decoders.

Loads a Hugging Face directory (config.json + *.safetensors, parsed by hand:
F32, F16, BF16) or a llama2.c checkpoint (.bin, f32), runs the forward pass
one token at a time with a contiguous KV cache, and decodes greedily.

All arithmetic is float64: weights are widened from their stored dtype on
load, so the reference carries no rounding of its own worth mentioning and
the engine's float32 (or half) arithmetic is what any difference measures.

Layers: RMSNorm (weight * x / sqrt(mean(x^2) + eps)), RoPE (llama2.c's
adjacent-pair layout for .bin files, HF's half-split layout for HF
directories), grouped-query attention, optional q/k/v biases (Qwen2), SwiGLU
MLP (down(silu(gate(x)) * up(x))), final norm, tied or untied classifier.

CLI:
  ref.py --model PATH --prompt-tokens 1,2,3 --steps N [--logits-out FILE]
         [--json] [--force-tokens 4,5,6] [--stop-at-eos]
--logits-out writes float32 little-endian logits [N steps][vocab]: row i holds
the logits that produced generated token i (row 0 comes from the last prompt
token). --force-tokens feeds the given tokens as the generated ones (teacher
forcing), still recording the logits at each step: the comparison test uses it
to score another engine's trajectory without being derailed by a near tie.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


class FormatError(Exception):
    pass


def read_safetensors(path):
    """Returns {name: float64 ndarray} for one .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise FormatError(f"{path}: shorter than the 8-byte header length")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen > len(raw) - 8:
        raise FormatError(f"{path}: header length {hlen} runs past the end of the file")
    header = json.loads(raw[8 : 8 + hlen].decode("utf-8"))
    data = memoryview(raw)[8 + hlen :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise FormatError(f"{path}: tensor {name} has unsupported dtype {dt}")
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        count = int(np.prod(shape)) if shape else 1
        if begin < 0 or end > len(data) or end - begin != count * _ST_DTYPES[dt]:
            raise FormatError(f"{path}: tensor {name} has bad data_offsets {begin},{end}")
        buf = data[begin:end]
        if dt == "F32":
            arr = np.frombuffer(buf, dtype="<f4").astype(np.float64)
        elif dt == "F16":
            arr = np.frombuffer(buf, dtype="<f2").astype(np.float64)
        else:  # BF16: the high half of a float32
            u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32).astype(np.float64)
        out[name] = arr.reshape(shape)
    return out


class Model:
    """Weights (float64) and hyperparameters of one decoder.

    Shapes (HF convention, row = output feature):
      embed [vocab, dim]; per layer wq [n_heads*hd, dim], wk/wv [n_kv*hd, dim],
      wo [dim, n_heads*hd], w_gate/w_up [hidden, dim], w_down [dim, hidden],
      attn_norm/ffn_norm [dim]; optional bq [n_heads*hd], bk/bv [n_kv*hd];
      final_norm [dim]; lm_head [vocab, dim].
    rope_layout: "pair" (llama2.c: rotate (2i, 2i+1)) or "half" (HF: rotate
    (i, i + hd/2)) within each head.
    """

    def __init__(self):
        self.layers = []


def load_hf(path):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for fn in files:
        tensors.update(read_safetensors(os.path.join(path, fn)))

    m = Model()
    m.dim = int(cfg["hidden_size"])
    m.hidden = int(cfg["intermediate_size"])
    m.n_layers = int(cfg["num_hidden_layers"])
    m.n_heads = int(cfg["num_attention_heads"])
    m.n_kv = int(cfg.get("num_key_value_heads", m.n_heads))
    m.vocab = int(cfg["vocab_size"])
    m.head_dim = int(cfg.get("head_dim") or m.dim // m.n_heads)
    m.rope_theta = float(cfg.get("rope_theta", 10000.0))
    m.eps = float(cfg.get("rms_norm_eps", 1e-6))
    m.max_seq = int(cfg.get("max_position_embeddings", 2048))
    m.rope_layout = "half"
    eos = cfg.get("eos_token_id", 2)
    m.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def take(name):
        if name not in tensors:
            raise FormatError(f"{path}: missing tensor {name}")
        return tensors.pop(name)

    m.embed = take("model.embed_tokens.weight")
    for i in range(m.n_layers):
        p = f"model.layers.{i}."
        L = {
            "attn_norm": take(p + "input_layernorm.weight"),
            "wq": take(p + "self_attn.q_proj.weight"),
            "wk": take(p + "self_attn.k_proj.weight"),
            "wv": take(p + "self_attn.v_proj.weight"),
            "wo": take(p + "self_attn.o_proj.weight"),
            "ffn_norm": take(p + "post_attention_layernorm.weight"),
            "w_gate": take(p + "mlp.gate_proj.weight"),
            "w_up": take(p + "mlp.up_proj.weight"),
            "w_down": take(p + "mlp.down_proj.weight"),
        }
        for b in ("q", "k", "v"):
            name = p + f"self_attn.{b}_proj.bias"
            L["b" + b] = tensors.pop(name) if name in tensors else None
        m.layers.append(L)
    m.final_norm = take("model.norm.weight")
    if "lm_head.weight" in tensors:
        m.lm_head = take("lm_head.weight")
    elif cfg.get("tie_word_embeddings", True):
        m.lm_head = m.embed
    else:
        raise FormatError(f"{path}: untied config but no lm_head.weight")
    if tensors:
        raise FormatError(f"{path}: unexpected tensors {sorted(tensors)[:5]}")
    _check_shapes(m)
    return m


def load_llama2c(path):
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 28:
        raise FormatError(f"{path}: shorter than the 28-byte header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    w = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        if off + n > w.size:
            raise FormatError(f"{path}: file too short for its header")
        a = w[off : off + n].reshape(shape)
        off += n
        return a

    m = Model()
    m.dim, m.hidden, m.n_layers, m.n_heads, m.n_kv, m.vocab = dim, hidden, n_layers, n_heads, n_kv, vocab
    m.head_dim, m.rope_theta, m.eps, m.max_seq = hd, 10000.0, 1e-5, seq_len
    m.rope_layout = "pair"
    m.eos_ids = {2}
    m.embed = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, n_heads * hd, dim)
    wk = take(n_layers, n_kv * hd, dim)
    wv = take(n_layers, n_kv * hd, dim)
    wo = take(n_layers, dim, n_heads * hd)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    m.final_norm = take(dim)
    take(seq_len * hd // 2)  # legacy freq_cis_real
    take(seq_len * hd // 2)  # legacy freq_cis_imag
    m.lm_head = m.embed if shared else take(vocab, dim)
    if off != w.size:
        raise FormatError(f"{path}: {w.size - off} trailing floats after the weights")
    for i in range(n_layers):
        m.layers.append({
            "attn_norm": rms_att[i], "wq": wq[i], "wk": wk[i], "wv": wv[i], "wo": wo[i],
            "ffn_norm": rms_ffn[i], "w_gate": w1[i], "w_up": w3[i], "w_down": w2[i],
            "bq": None, "bk": None, "bv": None,
        })
    _check_shapes(m)
    return m


def _check_shapes(m):
    hd = m.head_dim
    want = {
        "wq": (m.n_heads * hd, m.dim), "wk": (m.n_kv * hd, m.dim), "wv": (m.n_kv * hd, m.dim),
        "wo": (m.dim, m.n_heads * hd), "w_gate": (m.hidden, m.dim), "w_up": (m.hidden, m.dim),
        "w_down": (m.dim, m.hidden), "attn_norm": (m.dim,), "ffn_norm": (m.dim,),
    }
    if m.n_heads % m.n_kv != 0 or hd % 2 != 0:
        raise FormatError("n_heads must be a multiple of n_kv_heads and head_dim even")
    for i, L in enumerate(m.layers):
        for k, s in want.items():
            if L[k].shape != s:
                raise FormatError(f"layer {i} {k}: shape {L[k].shape}, expected {s}")
    if m.embed.shape != (m.vocab, m.dim) or m.lm_head.shape != (m.vocab, m.dim):
        raise FormatError("embedding or classifier shape does not match vocab x dim")


def load(path):
    return load_hf(path) if os.path.isdir(path) else load_llama2c(path)


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x) + eps))


def rope(x, pos, n, hd, theta, layout):
    """Rotates x [n*hd] at position pos; returns a new array."""
    x = x.reshape(n, hd).copy()
    half = hd // 2
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
    ang = pos * inv_freq
    c, s = np.cos(ang), np.sin(ang)
    if layout == "pair":
        a, b = x[:, 0::2].copy(), x[:, 1::2].copy()
        x[:, 0::2] = a * c - b * s
        x[:, 1::2] = a * s + b * c
    else:
        a, b = x[:, :half].copy(), x[:, half:].copy()
        x[:, :half] = a * c - b * s
        x[:, half:] = a * s + b * c
    return x.reshape(-1)


class Session:
    """One sequence: a contiguous KV cache [layer][pos][n_kv*hd] in float64."""

    def __init__(self, m, max_len):
        self.m = m
        kvd = m.n_kv * m.head_dim
        self.k = np.zeros((m.n_layers, max_len, kvd))
        self.v = np.zeros((m.n_layers, max_len, kvd))
        self.pos = 0

    def step(self, token):
        """Feeds one token at the next position; returns logits [vocab]."""
        m, pos, hd = self.m, self.pos, self.m.head_dim
        if pos >= self.k.shape[1]:
            raise ValueError("KV cache full")
        if not 0 <= token < m.vocab:
            raise ValueError(f"token {token} outside the vocabulary of {m.vocab}")
        group = m.n_heads // m.n_kv
        x = m.embed[token].copy()
        for li, L in enumerate(m.layers):
            h = rmsnorm(x, L["attn_norm"], m.eps)
            q, k, v = L["wq"] @ h, L["wk"] @ h, L["wv"] @ h
            if L["bq"] is not None:
                q, k, v = q + L["bq"], k + L["bk"], v + L["bv"]
            q = rope(q, pos, m.n_heads, hd, m.rope_theta, m.rope_layout)
            k = rope(k, pos, m.n_kv, hd, m.rope_theta, m.rope_layout)
            self.k[li, pos], self.v[li, pos] = k, v
            K = self.k[li, : pos + 1].reshape(pos + 1, m.n_kv, hd)
            V = self.v[li, : pos + 1].reshape(pos + 1, m.n_kv, hd)
            qh = q.reshape(m.n_heads, hd)
            out = np.empty((m.n_heads, hd))
            for hh in range(m.n_heads):
                kv = hh // group
                sc = K[:, kv, :] @ qh[hh] / np.sqrt(hd)  # [pos+1]
                sc = np.exp(sc - sc.max())
                out[hh] = (sc / sc.sum()) @ V[:, kv, :]
            x = x + L["wo"] @ out.reshape(-1)
            h = rmsnorm(x, L["ffn_norm"], m.eps)
            g, u = L["w_gate"] @ h, L["w_up"] @ h
            x = x + L["w_down"] @ (g / (1.0 + np.exp(-g)) * u)
        self.pos += 1
        return m.lm_head @ rmsnorm(x, m.final_norm, m.eps)


def generate(m, prompt, steps, force=None, stop_at_eos=False):
    """Greedy decoding. Returns (tokens [n], logits float64 [n][vocab]).

    Row i of logits produced tokens[i]. With force, tokens are taken from it
    instead of the argmax (at most len(force) steps)."""
    if not prompt:
        raise ValueError("empty prompt")
    if force is not None:
        steps = min(steps, len(force))
    sess = Session(m, len(prompt) + steps)
    for t in prompt[:-1]:
        sess.step(t)
    tok, tokens, rows = prompt[-1], [], []
    for i in range(steps):
        logits = sess.step(tok)
        rows.append(logits)
        tok = int(force[i]) if force is not None else int(np.argmax(logits))
        tokens.append(tok)
        if stop_at_eos and tok in m.eos_ids:
            break
    return tokens, np.array(rows).reshape(len(rows), m.vocab)


def parse_ids(text):
    return [int(t) for t in text.replace(" ", "").split(",") if t != ""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF directory or llama2.c .bin")
    ap.add_argument("--prompt-tokens", default="1", help="comma-separated ids (default: 1)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--logits-out", help="write float32 LE logits [steps][vocab] here")
    ap.add_argument("--force-tokens", help="comma-separated ids fed as the generated tokens")
    ap.add_argument("--stop-at-eos", action="store_true", help="stop after an EOS token")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    try:
        m = load(a.model)
        prompt = parse_ids(a.prompt_tokens)
        force = parse_ids(a.force_tokens) if a.force_tokens else None
        tokens, logits = generate(m, prompt, a.steps, force, a.stop_at_eos)
    except (OSError, ValueError, KeyError, FormatError) as e:
        print(f"ref.py: error: {e}", file=sys.stderr)
        return 1
    if a.logits_out:
        logits.astype("<f4").tofile(a.logits_out)
    if a.json:
        print(json.dumps({"prompt_tokens": prompt, "tokens": tokens, "vocab_size": m.vocab}))
    else:
        print(" ".join(str(t) for t in tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())

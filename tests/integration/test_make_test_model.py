#!/usr/bin/env python3
"""Checks make-test-model's files with tools written independently of it.

- Determinism: the same arguments give byte-identical files.
- Both RoPE layouts agree: for each shape llama2.c can hold, the llama2c file
  and the HF directory of the same seed give the same greedy tokens and the
  same logits (to 1e-9 relative) in the numpy reference; the HF q/k rows are
  the llama2c rows permuted per head.
- safetensors: header JSON, 8-byte alignment, contiguous data_offsets that
  cover the data exactly, exact HF tensor names; shards hold the same tensors
  as the single file; F16/BF16 values are the F32 values rounded to nearest
  even (checked against numpy's own conversion for F16 and an integer
  rounding for BF16).
- config.json and tokenizer files: sizes match, ids 0..V-1 each once, every
  merge's parts exist before it, tokenizer.bin has V pieces.
- Error paths: unknown shape/format/dtype, llama2c with half dtypes or with a
  shape it cannot hold, bad seed, all exit 2 with a message and write nothing.

Usage: test_make_test_model.py [--bin-dir DIR]. Exit 0 pass, 1 fail, 77 skip.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

try:
    import numpy as np
except ImportError:
    print("SKIP: numpy is not installed (pip install numpy)")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import llama2c_tok  # noqa: E402
import ref  # noqa: E402

failures = []


def check(cond, msg):
    if cond:
        print(f"ok: {msg}")
    else:
        print(f"FAIL: {msg}")
        failures.append(msg)


def mtm(binary, *args):
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def read_file(p):
    with open(p, "rb") as f:
        return f.read()


def st_header(path):
    raw = read_file(path)
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), n, len(raw)


def expected_names(cfg):
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if cfg["model_type"] == "qwen2":
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    if not cfg["tie_word_embeddings"]:
        names.append("lm_head.weight")
    return sorted(names)


def check_safetensors_file(path, label):
    header, n, size = st_header(path)
    check((8 + n) % 8 == 0, f"{label}: data section starts 8-byte aligned")
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__")
    contiguous = spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    check(contiguous and spans[-1][1] == size - 8 - n, f"{label}: data_offsets contiguous, cover the data exactly")
    return header


def bf16_round(x32):
    """Independent f32 -> bf16 (round to nearest even) via integers."""
    u = x32.view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return (r.astype(np.uint32) << 16).view(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.environ.get("TANDEM_BIN_DIR", os.path.join(HERE, "../../build/bin")))
    a = ap.parse_args()
    binary = os.path.join(a.bin_dir, "make-test-model")
    if not os.access(binary, os.X_OK):
        print(f"SKIP: {binary} is not built")
        return 77
    tmp = tempfile.mkdtemp(prefix="tandem-mtm-")
    try:
        run_checks(binary, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


def run_checks(binary, tmp):
    prompt = [1, 5, 77, 300, 12]

    # Determinism.
    for fmt, out in (("hf", "d1"), ("hf", "d2"), ("llama2c", "l1/m.bin"), ("llama2c", "l2/m.bin")):
        r = mtm(binary, "--format", fmt, "--shape", "tiny", "--dtype", "f32", "--seed", "42", "--out", os.path.join(tmp, out))
        check(r.returncode == 0, f"make-test-model --format {fmt} --out {out} exits 0 ({r.stderr.strip()})")
    same = all(
        read_file(os.path.join(tmp, "d1", f)) == read_file(os.path.join(tmp, "d2", f))
        for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
    )
    check(same, "hf: same seed gives byte-identical files")
    check(read_file(os.path.join(tmp, "l1/m.bin")) == read_file(os.path.join(tmp, "l2/m.bin"))
          and read_file(os.path.join(tmp, "l1/tokenizer.bin")) == read_file(os.path.join(tmp, "l2/tokenizer.bin")),
          "llama2c: same seed gives byte-identical files")
    mtm(binary, "--format", "hf", "--shape", "tiny", "--seed", "43", "--out", os.path.join(tmp, "d3"))
    check(read_file(os.path.join(tmp, "d1/model.safetensors")) != read_file(os.path.join(tmp, "d3/model.safetensors")),
          "a different seed gives different weights")

    # Both formats, same function.
    for shape in ("tiny", "tiny-mha", "tiny-untied", "15m"):
        hf, l2 = os.path.join(tmp, f"hf-{shape}"), os.path.join(tmp, f"l2-{shape}", "model.bin")
        r1 = mtm(binary, "--format", "hf", "--shape", shape, "--seed", "7", "--out", hf)
        r2 = mtm(binary, "--format", "llama2c", "--shape", shape, "--seed", "7", "--out", l2)
        if r1.returncode or r2.returncode:
            check(False, f"{shape}: make-test-model failed: {r1.stderr} {r2.stderr}")
            continue
        mh, ml = ref.load(hf), ref.load(l2)
        check(mh.rope_layout == "half" and ml.rope_layout == "pair", f"{shape}: loaders picked both RoPE layouts")
        hd = ml.head_dim
        perm_ok = True
        for L1, L2 in zip(ml.layers, mh.layers):
            for name, nh in (("wq", ml.n_heads), ("wk", ml.n_kv)):
                p = L1[name].reshape(nh, hd // 2, 2, -1).transpose(0, 2, 1, 3).reshape(nh * hd, -1)
                perm_ok &= np.array_equal(p, L2[name])
            for name in ("wv", "wo", "w_gate", "w_up", "w_down", "attn_norm", "ffn_norm"):
                perm_ok &= np.array_equal(L1[name], L2[name])
        perm_ok &= np.array_equal(ml.embed, mh.embed) and np.array_equal(ml.lm_head, mh.lm_head)
        check(perm_ok, f"{shape}: HF q/k rows are the llama2c rows permuted per head; other tensors equal")
        steps = 8 if shape == "15m" else 32
        th, lh = ref.generate(mh, prompt, steps)
        tl, ll = ref.generate(ml, prompt, steps)
        rel = np.max(np.abs(lh - ll)) / np.max(np.abs(ll))
        check(th == tl, f"{shape}: llama2c and hf give the same {steps} greedy tokens")
        check(rel < 1e-9, f"{shape}: llama2c and hf logits agree (max rel {rel:.2e})")
        check(len(set(th)) > steps // 4, f"{shape}: greedy output is not collapsed ({len(set(th))} distinct of {steps})")
        with open(os.path.join(hf, "config.json")) as f:
            cfg = json.load(f)
        pieces, scores, _ = llama2c_tok.load(os.path.join(os.path.dirname(l2), "tokenizer.bin"), cfg["vocab_size"])
        check(len(pieces) == cfg["vocab_size"], f"{shape}: tokenizer.bin has vocab_size pieces")
        with open(os.path.join(hf, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        text = "Once upon a time there was a little robot named Pip. The cat sat by the sea, 365 days!"
        ids_bin = llama2c_tok.encode(pieces, scores, text)
        ids_json = [1] + bpe_encode_json(tj, " " + text)
        check(ids_bin == ids_json and len(ids_bin) < len(text) * 0.8,
              f"{shape}: tokenizer.bin (llama2.c encode) and tokenizer.json (BPE) give the same {len(ids_bin)} ids")
        check(llama2c_tok.decode(pieces, ids_bin[1:]) == text.encode(), f"{shape}: tokenizer.bin decodes the text back")

    # HF files of every shape and dtype.
    for shape in ("tiny", "tiny-qwen2", "tiny-mistral", "tiny-untied"):
        d32 = os.path.join(tmp, f"st-{shape}-f32")
        mtm(binary, "--format", "hf", "--shape", shape, "--dtype", "f32", "--seed", "9", "--out", d32)
        with open(os.path.join(d32, "config.json")) as f:
            cfg = json.load(f)
        header = check_safetensors_file(os.path.join(d32, "model.safetensors"), f"{shape} f32")
        check(sorted(k for k in header if k != "__metadata__") == expected_names(cfg), f"{shape}: exact HF tensor names")
        w32 = ref.read_safetensors(os.path.join(d32, "model.safetensors"))
        if shape == "tiny-mistral":
            check(cfg.get("head_dim") == 32 and w32["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64),
                  "tiny-mistral: head_dim 32 in config and q_proj [128, 64]")
        if shape == "tiny-qwen2":
            check(cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["rope_theta"] == 1e6 and not cfg["tie_word_embeddings"],
                  "tiny-qwen2: Qwen2 architecture, rope_theta 1e6, untied")
        check_tokenizer(d32, cfg)
        for dt, np_round, name in (("f16", lambda x: x.astype(np.float16).astype(np.float32), "F16"),
                                   ("bf16", bf16_round, "BF16")):
            dd = os.path.join(tmp, f"st-{shape}-{dt}")
            r = mtm(binary, "--format", "hf", "--shape", shape, "--dtype", dt, "--seed", "9", "--out", dd)
            check(r.returncode == 0, f"{shape} {dt}: written")
            h = check_safetensors_file(os.path.join(dd, "model.safetensors"), f"{shape} {dt}")
            check(all(v["dtype"] == name for k, v in h.items() if k != "__metadata__"), f"{shape} {dt}: every tensor is {name}")
            wh = ref.read_safetensors(os.path.join(dd, "model.safetensors"))
            exact = all(np.array_equal(np_round(w32[k].astype(np.float32)).astype(np.float64), wh[k]) for k in w32)
            check(exact, f"{shape} {dt}: values are the f32 values rounded to nearest even")
            with open(os.path.join(dd, "config.json")) as f:
                want = {"f16": "float16", "bf16": "bfloat16"}[dt]
                check(json.load(f)["torch_dtype"] == want, f"{shape} {dt}: torch_dtype {want}")

    # Shards.
    ds = os.path.join(tmp, "sharded")
    r = mtm(binary, "--format", "hf", "--shape", "tiny-qwen2", "--seed", "9", "--shards", "3", "--out", ds)
    check(r.returncode == 0, "--shards 3 written")
    with open(os.path.join(ds, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    check(files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)], f"three shard files named HF-style: {files}")
    merged = {}
    for fn in files:
        h = check_safetensors_file(os.path.join(ds, fn), fn)
        check(all(index["weight_map"][k] == fn for k in h if k != "__metadata__"), f"{fn}: index maps its tensors to it")
        merged.update(ref.read_safetensors(os.path.join(ds, fn)))
    w32 = ref.read_safetensors(os.path.join(tmp, "st-tiny-qwen2-f32", "model.safetensors"))
    check(merged.keys() == w32.keys() and all(np.array_equal(merged[k], w32[k]) for k in w32),
          "shards hold exactly the single file's tensors")
    total = sum(v.size * 4 for v in w32.values())
    check(index["metadata"]["total_size"] == total, "index total_size is the sum of tensor bytes")
    r = mtm(binary, "--format", "hf", "--shape", "tiny-qwen2", "--seed", "9", "--out", ds)
    check(r.returncode == 0 and not os.path.exists(os.path.join(ds, "model.safetensors.index.json")),
          "rewriting a sharded directory as one file removes the stale index")
    r = mtm(binary, "--format", "hf", "--shape", "tiny-qwen2", "--seed", "9", "--shards", "3", "--out", ds)
    check(r.returncode == 0 and not os.path.exists(os.path.join(ds, "model.safetensors")),
          "rewriting as shards removes the stale single file")
    ts, _ = ref.generate(ref.load(ds), prompt, 8)
    t1, _ = ref.generate(ref.load(os.path.join(tmp, "st-tiny-qwen2-f32")), prompt, 8)
    check(ts == t1, "sharded and single-file directories give the same tokens")

    # Error paths: exit 2, a message naming the problem, nothing written.
    bad = [
        (["--format", "hf", "--shape", "nope", "--seed", "1"], "unknown shape"),
        (["--format", "gguf", "--shape", "tiny", "--seed", "1"], "format = \"gguf\": must be one of hf|llama2c"),
        (["--format", "hf", "--shape", "tiny", "--dtype", "f8", "--seed", "1"], "dtype = \"f8\": must be one of f32|f16|bf16"),
        (["--format", "llama2c", "--shape", "tiny", "--dtype", "bf16", "--seed", "1"], "f32 only"),
        (["--format", "llama2c", "--shape", "tiny-qwen2", "--seed", "1"], "cannot hold"),
        (["--format", "llama2c", "--shape", "tiny-mistral", "--seed", "1"], "cannot hold"),
        (["--format", "hf", "--shape", "tiny", "--seed", "-3"], "seed = \"-3\": must be >= 0"),
        (["--format", "hf", "--shape", "tiny", "--seed", "12x"], "seed = \"12x\""),
        (["--format", "hf", "--shape", "tiny", "--seed", "1", "--shards", "0"], "shards = \"0\": out of range [1, 99999]"),
        (["--format", "hf", "--shape", "tiny", "--seed", "1", "--shards", "1000"], "--shards must be in"),
        (["--shape", "tiny", "--seed", "1"], "required"),
    ]
    afile = os.path.join(tmp, "a-file")
    with open(afile, "w") as f:
        f.write("x")
    r = mtm(binary, "--format", "hf", "--shape", "tiny", "--seed", "1", "--out", afile)
    check(r.returncode == 1 and "not a directory" in r.stderr, "hf --out naming a file: exit 1, says 'not a directory'")
    if os.path.exists("/dev/full"):  # every write fails with ENOSPC
        r = mtm(binary, "--format", "llama2c", "--shape", "tiny", "--seed", "1", "--out", "/dev/full")
        check(r.returncode == 1 and "write error" in r.stderr and "No space left" in r.stderr,
              "a failing write (/dev/full): exit 1, says 'write error' and why")
    for args, needle in bad:
        out = os.path.join(tmp, "bad", "x")
        r = mtm(binary, *args, "--out", out)
        check(r.returncode == 2 and needle in r.stderr and not os.path.exists(out),
              f"error path {' '.join(args)}: exit 2, says '{needle}' (got {r.returncode}: {r.stderr.strip().replace(chr(10), ' | ')[:120]})")


def bpe_encode_json(tj, text):
    """Byte-level BPE with merge ranks, GPT-2 pre-split (ASCII text only)."""
    import re
    vocab = tj["model"]["vocab"]
    rank = {tuple(m.split(" ")): r for r, m in enumerate(tj["model"]["merges"])}
    out = []
    for word in re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", text):
        parts = ["\u0120" if c == " " else c for c in word]  # ASCII: only space remaps (to U+0120)
        while len(parts) > 1:
            pairs = [(rank.get((parts[i], parts[i + 1]), 1 << 30), i) for i in range(len(parts) - 1)]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out += [vocab[p] for p in parts]
    return out


def check_tokenizer(d, cfg):
    with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    V = cfg["vocab_size"]
    check(sorted(vocab.values()) == list(range(V)), f"{d}: tokenizer.json ids are 0..{V - 1}, each once")
    seen, ok = set(), True
    inv = {v: k for k, v in vocab.items()}
    for i in range(259):
        seen.add(inv[i])
    for rank, m in enumerate(merges):
        a, b = m.split(" ")
        ok &= a in seen and b in seen and vocab.get(a + b) == 259 + rank
        seen.add(a + b)
    check(ok and len(merges) == V - 259, f"{d}: every merge joins earlier tokens into token 259 + rank")
    specials = {t["content"]: t["id"] for t in tj["added_tokens"] if t["special"]}
    check(specials == {"<unk>": 0, "<s>": 1, "</s>": 2} and cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2,
          f"{d}: special tokens <unk>/<s>/</s> at 0/1/2 match config bos/eos")
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        tc = json.load(f)
    check(tc["bos_token"] == "<s>" and tc["eos_token"] == "</s>", f"{d}: tokenizer_config names bos/eos")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Writes the fuzz seed corpora under tests/fuzz/corpus/ (run from anywhere).

Every seed is a small, hand-made, valid (or nearly valid) example of the
format its target parses; regression inputs found by fuzzing are committed
beside them as files named crash-*/slow-* and are not touched here.
Inputs that stand for several files join them with SEP (see fuzz_util.h).
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEP = b"\n@@@@\n"


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def js(o):
    return json.dumps(o, ensure_ascii=False).encode()


# ---- tokenizers ----
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


B2U = bytes_to_unicode()
G = B2U[ord(" ")]  # "Ġ"


def bytelevel_tokenizer():
    vocab = {B2U[b]: b for b in range(256)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), (G, "w"), ("o", "r"), (G + "w", "or")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = [{"id": len(vocab), "content": "<|endoftext|>", "special": True},
             {"id": len(vocab) + 1, "content": "<|im_start|>", "special": True},
             {"id": len(vocab) + 2, "content": "<|im_end|>", "special": True},
             {"id": len(vocab) + 3, "content": "<tool>", "special": False}]
    return {
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": [a + " " + b for a, b in merges]},
    }


def spm_tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for p in ["\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "\u2581b"]:
        vocab[p] = len(vocab)
    merges = [["\u2581", "a"], ["a", "b"], ["\u2581a", "b"], ["\u2581", "b"]]
    return {
        "added_tokens": [{"id": 1, "content": "<s>", "special": True},
                         {"id": 2, "content": "</s>", "special": True}],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "post_processor": {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]},
        "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>", "fuse_unk": True,
                  "vocab": vocab, "merges": merges},
    }


def metaspace_tokenizer():
    t = spm_tokenizer()
    t["normalizer"] = None
    t["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                          "split": True}
    t["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}
    return t


def llama3_split_tokenizer():
    t = bytelevel_tokenizer()
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex":
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return t


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")
LLAMA2 = "{{ bos_token }}{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}"
LLAMA3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}"

put("tok_json", "bytelevel", js(bytelevel_tokenizer()) + SEP +
    js({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
        "add_bos_token": False}))
put("tok_json", "spm", js(spm_tokenizer()) + SEP +
    js({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": LLAMA2,
        "add_bos_token": True}) + SEP + js({"eos_token_id": [2, 1]}) + SEP +
    js({"bos_token_id": 1, "eos_token_id": 2}))
put("tok_json", "metaspace", js(metaspace_tokenizer()))
put("tok_json", "llama3split", js(llama3_split_tokenizer()) + SEP +
    js({"chat_template": LLAMA3, "bos_token": "<|endoftext|>"}))
put("tok_json", "minimal", '{"model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, '
    '"vocab": {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "aba": 4}, "merges": ["a b", "ab a"]}}')
put("tok_json", "pairmerges", '{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},'
    ' "merges": [["a", "b"]]}}')

# vocab.json + merges.txt
bl = bytelevel_tokenizer()["model"]
put("tok_gpt2", "small", js(bl["vocab"]) + SEP + ("#version: 0.2\n" + "\n".join(bl["merges"]) + "\n").encode())
put("tok_gpt2", "nomerges", '{"a": 0, "b": 1}' + SEP.decode() + "#version: 0.2\n")


def l2c(pieces, max_len=None):
    ml = max_len or max(len(p) for p, _ in pieces)
    out = struct.pack("<i", ml)
    for p, s in pieces:
        out += struct.pack("<fi", s, len(p)) + p
    return out


l2c_pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
l2c_pieces += [(b"<0x%02X>" % b, 0.0) for b in range(256)]
l2c_pieces += [(b" ", -1.0), (b"a", -2.0), (b"b", -3.0), (b" a", -4.0), (b"ab", -5.0), (b" ab", -6.0)]
put("tok_l2c", "small", l2c(l2c_pieces))
put("tok_l2c", "three", l2c(l2c_pieces[:3]))

# Inputs for tok_ops: first byte picks the tokenizer and the operation, the rest is text or ids.
put("tok_ops", "text_bl", b"\x00Hello world, \xe4\xbd\xa0\xe5\xa5\xbd <|im_end|> 123 \xff\xfe")
put("tok_ops", "text_spm", b"\x01 ab  a\tb\n\xf0\x9f\x98\x80<s></s>")
put("tok_ops", "text_l2c", b"\x02 abab a b\xc3")
put("tok_ops", "ids_bl", b"\x10" + struct.pack("<8i", 0, 255, 256, 259, 262, 263, 264, -1))
put("tok_ops", "ids_spm", b"\x11" + struct.pack("<6i", 1, 3, 230, 227, 2, 270))
put("tok_ops", "stream_l2c", b"\x22" + struct.pack("<6i", 1, 262, 230, 231, 2, 99999))
put("tok_ops", "chat", b"\x30system\x00be brief\x00user\x00hi\x00assistant\x00hello")

# ---- model files ----
DIM, HID, NL, NH, NKV, VOC, SEQ = 4, 8, 1, 2, 1, 8, 16
HDIM = DIM // NH


def safetensors(tensors, meta=None):
    hdr, data = {}, b""
    if meta is not None:
        hdr["__metadata__"] = meta
    for name, shape, dtype in tensors:
        n = 1
        for s in shape:
            n *= s
        size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}[dtype]
        blob = bytes((i * 7 + 3) & 0x3f for i in range(n * size))
        hdr[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = js(hdr)
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def hf_tensors(dtype="F32", tied=False, bias=False):
    t = [("model.embed_tokens.weight", [VOC, DIM], dtype), ("model.norm.weight", [DIM], dtype)]
    if not tied:
        t.append(("lm_head.weight", [VOC, DIM], dtype))
    for l in range(NL):
        p = "model.layers.%d." % l
        t += [(p + "input_layernorm.weight", [DIM], dtype),
              (p + "self_attn.q_proj.weight", [NH * HDIM, DIM], dtype),
              (p + "self_attn.k_proj.weight", [NKV * HDIM, DIM], dtype),
              (p + "self_attn.v_proj.weight", [NKV * HDIM, DIM], dtype),
              (p + "self_attn.o_proj.weight", [DIM, NH * HDIM], dtype),
              (p + "post_attention_layernorm.weight", [DIM], dtype),
              (p + "mlp.gate_proj.weight", [HID, DIM], dtype),
              (p + "mlp.up_proj.weight", [HID, DIM], dtype),
              (p + "mlp.down_proj.weight", [DIM, HID], dtype)]
        if bias:
            t += [(p + "self_attn.q_proj.bias", [NH * HDIM], dtype),
                  (p + "self_attn.k_proj.bias", [NKV * HDIM], dtype),
                  (p + "self_attn.v_proj.bias", [NKV * HDIM], dtype)]
    return t


def hf_config(model_type="llama", **kw):
    c = {"architectures": ["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"],
         "model_type": model_type, "hidden_size": DIM, "intermediate_size": HID,
         "num_hidden_layers": NL, "num_attention_heads": NH, "num_key_value_heads": NKV,
         "vocab_size": VOC, "max_position_embeddings": SEQ, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
         "bos_token_id": 1, "eos_token_id": 2}
    c.update(kw)
    return js(c)


put("safetensors", "f32", safetensors(hf_tensors()[:3], meta={"format": "pt"}))
put("safetensors", "mixed", safetensors([("a", [2, 3], "F16"), ("b", [], "BF16"), ("c", [1], "I64"),
                                         ("d", [0, 4], "F32")]))
put("safetensors", "empty", safetensors([]))

put("model_hf", "llama_f32", hf_config() + SEP + safetensors(hf_tensors()))
put("model_hf", "llama_tied_bf16", hf_config(tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8}) +
    SEP + safetensors(hf_tensors("BF16", tied=True)))
put("model_hf", "qwen2_f16", hf_config("qwen2", sliding_window=4, use_sliding_window=False,
    eos_token_id=[2, 3]) + SEP + safetensors(hf_tensors("F16", bias=True)))
idx = {"metadata": {"total_size": 0}, "weight_map": {n: "model-00001-of-00001.safetensors"
                                                     for n, _, _ in hf_tensors()}}
put("model_hf", "sharded", hf_config(rope_scaling={"type": "linear", "factor": 2.0}) + SEP + b"" +
    SEP + js(idx) + SEP + safetensors(hf_tensors()))


def l2c_model(vocab_sign=1):
    hdr = struct.pack("<7i", DIM, HID, NL, NH, NKV, vocab_sign * VOC, SEQ)
    n = (VOC * DIM + NL * DIM + NL * DIM * DIM + 2 * NL * NKV * HDIM * DIM + NL * DIM * DIM +
         NL * DIM + 3 * NL * HID * DIM + DIM + SEQ * HDIM)
    if vocab_sign < 0:
        n += VOC * DIM
    return hdr + b"".join(struct.pack("<f", ((i * 13) % 17 - 8) / 64.0) for i in range(n))


put("model_l2c", "tied", l2c_model(1))
put("model_l2c", "untied", l2c_model(-1))


def gg_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gg_kv(key, typ, val):
    out = gg_str(key) + struct.pack("<I", typ)
    if typ == 4:
        out += struct.pack("<I", val)
    elif typ == 6:
        out += struct.pack("<f", val)
    elif typ == 8:
        out += gg_str(val)
    elif typ == 9:
        et, items = val
        out += struct.pack("<IQ", et, len(items))
        for it in items:
            out += gg_str(it) if et == 8 else struct.pack("<f" if et == 6 else "<i", it)
    return out


def gguf_tokenizer(model="llama"):
    """A GGUF file holding only tokenizer metadata (no tensors)."""
    toks = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    toks += ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    types = [2, 3, 3] + [6] * 256 + [1] * 6
    kvs = [("tokenizer.ggml.model", 8, model), ("tokenizer.ggml.tokens", 9, (8, toks)),
           ("tokenizer.ggml.scores", 9, (6, scores)), ("tokenizer.ggml.token_type", 9, (5, types)),
           ("tokenizer.ggml.bos_token_id", 4, 1), ("tokenizer.ggml.eos_token_id", 4, 2)]
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(gg_kv(*k) for k in kvs)


# tok_load tells GGUF from tokenizer.bin by the magic: the same target reads both.
put("tok_l2c", "gguf_llama", gguf_tokenizer())
put("tok_l2c", "gguf_gpt2", gguf_tokenizer("gpt2"))


def gguf(arch="llama", version=3, align=32):
    kvs = [("general.architecture", 8, arch), ("general.alignment", 4, align),
           (arch + ".embedding_length", 4, DIM), (arch + ".feed_forward_length", 4, HID),
           (arch + ".block_count", 4, NL), (arch + ".attention.head_count", 4, NH),
           (arch + ".attention.head_count_kv", 4, NKV), (arch + ".context_length", 4, SEQ),
           (arch + ".attention.layer_norm_rms_epsilon", 6, 1e-5), (arch + ".rope.freq_base", 6, 1e4),
           ("tokenizer.ggml.bos_token_id", 4, 1), ("tokenizer.ggml.eos_token_id", 4, 2),
           ("tokenizer.ggml.tokens", 9, (8, ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"])),
           ("tokenizer.ggml.token_type", 9, (5, [2, 3, 3, 1, 1, 1, 1, 1]))]
    tens = [("token_embd.weight", [DIM, VOC]), ("output_norm.weight", [DIM]),
            ("output.weight", [DIM, VOC])]
    for l in range(NL):
        p = "blk.%d." % l
        tens += [(p + "attn_norm.weight", [DIM]), (p + "attn_q.weight", [DIM, NH * HDIM]),
                 (p + "attn_k.weight", [DIM, NKV * HDIM]), (p + "attn_v.weight", [DIM, NKV * HDIM]),
                 (p + "attn_output.weight", [NH * HDIM, DIM]), (p + "ffn_norm.weight", [DIM]),
                 (p + "ffn_gate.weight", [DIM, HID]), (p + "ffn_up.weight", [DIM, HID]),
                 (p + "ffn_down.weight", [HID, DIM])]
        if arch == "qwen2":
            tens += [(p + "attn_q.bias", [NH * HDIM]), (p + "attn_k.bias", [NKV * HDIM]),
                     (p + "attn_v.bias", [NKV * HDIM])]
    out = b"GGUF" + struct.pack("<IQQ", version, len(tens), len(kvs))
    for k in kvs:
        out += gg_kv(*k)
    data, infos = b"", b""
    for name, ne in tens:
        n = 1
        for e in ne:
            n *= e
        infos += gg_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", e) for e in ne)
        infos += struct.pack("<IQ", 0, len(data))
        blob = b"".join(struct.pack("<f", ((i * 5) % 11 - 5) / 32.0) for i in range(n))
        data += blob + b"\0" * (-len(blob) % align)
    out += infos
    out += b"\0" * (-len(out) % align)
    return out + data


put("model_gguf", "llama_v3", gguf())
put("model_gguf", "qwen2_v2", gguf("qwen2", 2, 64))

# ---- kvtransfer wire ----
MAGIC_CTRL, MAGIC_FRAME = 0x4358564B, 0x4658564B


def hdr(typ, body):
    return struct.pack("<IHHII", MAGIC_CTRL, typ, 0, len(body), 0) + body


def hello(token=0, extra=b""):
    return struct.pack("<IIQIIQIIIIQII16s256s", 1, 1, 0x1234, 0, 16, 4096, 2, 64, 2, 64, token, 1,
                       len(extra), b"tcp", extra)


def req(h, err=0, layer=0, n=0):
    return struct.pack("<QiIII", h, err, layer, n, 0)


# First byte: which decoder (see fuzz_kvx_wire.c); the rest is a byte stream.
put("kvx_wire", "hello", b"\x00" + hdr(1, hello()))
put("kvx_wire", "hello_ack", b"\x00" + hdr(2, hello(token=77, extra=b"x" * 8)))
put("kvx_wire", "nak", b"\x00" + hdr(3, b"fingerprint".ljust(32, b"\0") + b"fingerprint mismatch".ljust(192, b"\0")))
put("kvx_wire", "data_hello", b"\x00" + hdr(4, struct.pack("<QII", 77, 0, 0)))
put("kvx_wire", "ctrl_stream", b"\x01" + hdr(5, b"") + hdr(6, req(0xabc, n=5) + b"req-1") +
    hdr(7, req(0xabc, n=3) + struct.pack("<3I", 4, 5, 6)) +
    hdr(8, req(0xabc, layer=1, n=2) + struct.pack("<4I", 1, 4, 2, 5)) + hdr(11, req(0xabc)) +
    hdr(12, req(0xabc, err=-3)) + hdr(9, req(0xabc)) + hdr(10, req(0xabc)))
put("kvx_wire", "frames", b"\x02" + struct.pack("<IIQIIQ", MAGIC_FRAME, 1, 0xabc, 4, 1, 16) + b"\x5a" * 16 +
    struct.pack("<IIQIIQ", MAGIC_FRAME, 0, 0xabc, 5, 2, 16) + b"\xa5" * 16)

# ---- load test traces ----
put("trace_burstgpt", "six_cols", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n45,GPT-4,1087,0,1087,API log\n"
    "118,ChatGPT,417,276,693,Conversation log\n96,ChatGPT,1,2,3,API log\n")
put("trace_burstgpt", "eight_cols", "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,"
    "Total tokens,Log Type\r\n0.5,12,1.25,ChatGPT,100,20,120,Conversation log\r\n"
    "1.75,12,0.5,GPT-4,\"200\",30,230,\"API log\"\r\n")
put("trace_azure", "code", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n"
    "2023-11-16 18:15:49.1,1,0\n2023-11-16T18:16:00,2048,1\n")
put("trace_mooncake", "rows", '{"timestamp": 0, "input_length": 6955, "output_length": 52, '
    '"hash_ids": [46, 47, 48, 49]}\n{"timestamp": 27482, "input_length": 6472, "output_length": 26, '
    '"hash_ids": [46, 52, 53]}\n\n{"timestamp": 12.5, "input_length": 1, "output_length": 0}\n')

# ---- SSE / HTTP responses (first byte: mode and chunking, see fuzz_lt_sse.c) ----
SSE = (b'data: {"choices":[{"text":"Hel"}]}\n\n'
       b'data: {"choices":[{"delta":{"content":"lo"}}]}\r\n\r\n'
       b': comment\nevent: x\nid: 3\n'
       b'data: {"choices":[{"text":""}],"usage":{"completion_tokens":2}}\n\n'
       b'data: [DONE]\n\n')
put("lt_sse", "stream", b"\x00" + SSE)
put("lt_sse", "error_event", b"\x00" + b'data: {"error": {"message": "overloaded"}}\n\ndata:[DONE]')
put("lt_sse", "http_200", b"\x01" + b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(SSE) + SSE + b"\r\n0\r\n\r\n")
put("lt_sse", "http_429", b"\x01HTTP/1.1 429 Too Many Requests\r\nContent-Length: 18\r\n\r\n"
    b'{"error":"busy\n"}x')

# ---- config files ----
put("config", "full", "# comment\nlog_level = info  # trailing\nname = \"a \\\"quoted\\\" \\# value\"\n"
    "[router]\nport = 8000\nadmit_window = 1m30.5s\nkv_pool = 1.5GiB\nratio = 2.5e-1\n"
    "enabled = yes\n[router.http]\nmax_body = 64KB\n")
put("config", "errors", "port = 70000\n")

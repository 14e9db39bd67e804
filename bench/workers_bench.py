#!/usr/bin/env python3
"""Disaggregated path (prefill worker -> KV transfer -> decode worker) against
the single process (tandem-generate), measured in the same run on the same
model, one compute thread per process.

  1. TTFT of a 200-token prompt: client send -> first token through the
     cluster, vs tandem-generate's prefill of the same prompt (median over
     distinct prompts, so no prefix-cache hit helps the cluster).
  2. Decode tokens/s at batch 1: the decode worker's decode phase vs
     tandem-generate's, 200 new tokens.
  3. Over N requests sent one after another: the median share of each
     request's end-to-end time that is not model compute, and a table of
     per-phase medians (where the time went).

Usage: bench/workers_bench.py [--bin-dir build/bin] [--model PATH] [--requests 200]
Without --model it generates the 15m shape (random weights, llama2.c format).
"""
import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile


def start(bin_dir, role, model, threads):
    p = subprocess.Popen([os.path.join(bin_dir, "tandem-" + role), "--model", model,
                          "--listen", "127.0.0.1:0", "--threads", str(threads),
                          "--prefix-cache=false"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    m = re.search(r"grpc=(\S+)", line)
    if not m:
        p.kill()
        sys.exit("%s did not start: %s" % (role, line))
    return p, m.group(1)


def cli(bin_dir, dc, pf, reqs, tmp):
    path = os.path.join(tmp, "reqs.jsonl")
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    out = subprocess.run([os.path.join(bin_dir, "tandem-decode-cli"), "--decode", dc,
                          "--prefill", pf, "--requests", path], capture_output=True, text=True)
    res = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if len(res) != len(reqs) or any(r["status"] != "OK" for r in res):
        sys.exit("cluster requests failed: %s" % out.stderr[-2000:])
    return res


def generate(bin_dir, model, prompt, max_tokens, threads):
    out = subprocess.run([os.path.join(bin_dir, "tandem-generate"), "--model", model, "--json",
                          "--prompt-tokens", ",".join(map(str, prompt)), "--max-tokens",
                          str(max_tokens), "--ignore-eos", "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default="build/bin")
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tandem-wbench-")
    procs = []
    try:
        model = a.model
        vocab = 32000
        if not model:
            model = os.path.join(tmp, "m15.bin")
            subprocess.run([os.path.join(a.bin_dir, "make-test-model"), "--format", "llama2c",
                            "--shape", "15m", "--seed", "1", "--out", model], check=True,
                           capture_output=True)
        pf_p, pf = start(a.bin_dir, "prefill", model, a.threads)
        dc_p, dc = start(a.bin_dir, "decode", model, a.threads)
        procs += [pf_p, dc_p]
        rng = random.Random(1)
        prompts = [[rng.randrange(3, vocab) for _ in range(200)] for _ in range(9)]

        # 1. TTFT, 200-token prompt; alternate cluster and single process.
        ttft_c, ttft_g = [], []
        for i, p in enumerate(prompts):
            r = cli(a.bin_dir, dc, pf, [{"id": "ttft-%d" % i, "prompt_tokens": p,
                                         "max_tokens": 1}], tmp)[0]
            ttft_c.append(r["ttft_ms"])
            g = generate(a.bin_dir, model, p, 1, a.threads)
            ttft_g.append(g["timings"]["prefill_ms"])
        c, g = statistics.median(ttft_c), statistics.median(ttft_g)
        print("TTFT, 200-token prompt (median of %d): cluster %.2f ms, tandem-generate prefill "
              "%.2f ms: %.2fx (target <= 1.15x)" % (len(prompts), c, g, c / g))

        # 2. Decode tokens/s at batch 1, 200 new tokens.
        dec_c, dec_g = [], []
        for i in range(3):
            p = prompts[i][:16]
            r = cli(a.bin_dir, dc, pf, [{"id": "dec-%d" % i, "prompt_tokens": p, "max_tokens": 200,
                                         "ignore_eos": True}], tmp)[0]
            dec_c.append(199 / (r["timings"]["decode_us"] / 1e6))
            g = generate(a.bin_dir, model, p, 200, a.threads)
            dec_g.append(199 / (g["timings"]["decode_ms"] / 1e3))
        c, g = statistics.median(dec_c), statistics.median(dec_g)
        print("decode, batch 1 (median of 3): cluster %.1f tok/s, tandem-generate %.1f tok/s: "
              "%.2fx (target >= 0.95x)" % (c, g, c / g))

        # 3. Where the time goes: N requests one after another.
        n = a.requests
        reqs = [{"id": "ph-%d" % i, "prompt_tokens": [rng.randrange(3, vocab) for _ in range(64)],
                 "max_tokens": 16, "ignore_eos": True} for i in range(n)]
        phases = {k: [] for k in ("prefill queue", "prefill compute", "KV transfer + hand-off",
                                  "decode", "RPC + client", "e2e")}
        shares = []
        for r in reqs:
            res = cli(a.bin_dir, dc, pf, [r], tmp)[0]
            t = res["timings"]
            e2e = res["e2e_ms"] * 1000
            handoff = t["first_token_us"] - t["prefill_queue_us"] - t["prefill_us"]
            client = e2e - t["e2e_us"]
            phases["prefill queue"].append(t["prefill_queue_us"])
            phases["prefill compute"].append(t["prefill_us"])
            phases["KV transfer + hand-off"].append(handoff)
            phases["decode"].append(t["decode_us"])
            phases["RPC + client"].append(client)
            phases["e2e"].append(e2e)
            shares.append(1 - (t["prefill_us"] + t["decode_us"]) / e2e)
        print("\n%d requests of 64 prompt + 16 new tokens, sent one after another:" % n)
        print("| phase | median (us) |\n|---|---|")
        for k, v in phases.items():
            print("| %s | %.0f |" % (k, statistics.median(v)))
        print("median share of e2e that is not model compute: %.1f%%"
              % (100 * statistics.median(shares)))
        print("(decode includes its batch-1 compute; KV transfer + hand-off is first token at"
              " decode minus prefill queue and compute)")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

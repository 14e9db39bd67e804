#!/usr/bin/env python3
"""Prefix-aware dispatch on the Mooncake conversation trace.

Router + 2 prefill workers + 1 decode worker (stories260K) on loopback. The
first N requests of ../shared/data/mooncake/conversation_trace.jsonl are
replayed with prompts built so that equal hash_ids share real token prefixes
(tandem-loadtest --block-tokens, lengths scaled to the model's context), once
per dispatch policy. Printed per policy: the prefill workers' prefix-cache hit
rate (hit blocks / looked-up blocks, from their metrics), mean and p90 TTFT
and throughput (the load tester's summary).

Usage: bench/prefix_dispatch.py [--bin-dir build/bin] [--requests 300] [--speedup 4]
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def start(cmd, pattern, log):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    m = re.search(pattern, p.stdout.readline())
    if not m:
        p.kill()
        sys.exit("did not start: %s (see %s)" % (cmd[0], log))
    return p, m


def metric(port, name):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run(a, policy, shared, tmp):
    model = os.path.join(shared, "models/stories260K/stories260K.bin")
    tok = os.path.join(shared, "models/stories260K/tok512.bin")
    procs = []
    try:
        r, m = start([os.path.join(a.bin_dir, "tandem-router"), "--model", model, "--policy",
                      policy, "--http-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"],
                     r"http=(\S+) grpc=(\S+)", os.path.join(tmp, "router.log"))
        procs.append(r)
        http, grpc = m.group(1), m.group(2)
        prefill_ports = []
        for i, role in enumerate(["prefill", "prefill", "decode"]):
            p, m = start([os.path.join(a.bin_dir, "tandem-" + role), "--model", model, "--listen",
                          "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--router", grpc],
                         r"metrics=(\d+)", os.path.join(tmp, "%s%d.log" % (role, i)))
            procs.append(p)
            if role == "prefill":
                prefill_ports.append(int(m.group(1)))
        for _ in range(100):
            try:
                with urllib.request.urlopen("http://%s/health" % http, timeout=2) as h:
                    if json.loads(h.read())["prefill_ready"] == 2:
                        break
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            time.sleep(0.05)
        out = os.path.join(tmp, "lt-" + policy)
        subprocess.run([os.path.join(a.bin_dir, "tandem-loadtest"), "replay", "--trace",
                        os.path.join(shared, "data/mooncake/conversation_trace.jsonl"),
                        "--format", "mooncake", "--start-s", str(a.start_s), "--max-requests",
                        str(a.requests), "--speedup",
                        str(a.speedup), "--url", "http://%s/v1/completions" % http, "--model",
                        "stories260K", "--tokenizer", tok, "--block-tokens", "16",
                        "--max-context", "480", "--no-plots", "--out", out],
                       check=True, capture_output=True)
        hits = sum(metric(p, "tandem_prefix_cache_hit_blocks_total") for p in prefill_ports)
        queries = sum(metric(p, "tandem_prefix_cache_query_blocks_total") for p in prefill_ports)
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        return hits, queries, s
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default="build/bin")
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--speedup", type=float, default=4)
    ap.add_argument("--start-s", type=float, default=0,
                    help="skip the trace's first seconds (its later part reuses more prefixes)")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.shared, "data/mooncake/conversation_trace.jsonl")):
        sys.exit("the Mooncake trace is absent under %s/data/mooncake" % a.shared)
    tmp = tempfile.mkdtemp(prefix="tandem-prefix-")
    print("%d Mooncake requests from %g s, speed-up %g, block of 16 tokens per hash id, "
          "context 480, 2 prefill + 1 decode (stories260K)" % (a.requests, a.start_s, a.speedup))
    print("| policy | prefix-cache hit rate (prefill) | mean TTFT (ms) | p90 TTFT (ms) | "
          "throughput (req/s) | ok |")
    print("|---|---|---|---|---|---|")
    policies = os.environ.get("POLICIES", "round_robin,least_loaded,prefix_affinity").split(",")
    for policy in policies:
        hits, queries, s = run(a, policy, a.shared, tmp)
        ttft = s["ttft_ms"]
        print("| %s | %.1f%% (%d of %d blocks) | %.1f | %.1f | %.2f | %d of %d |" % (
            policy, 100.0 * hits / queries if queries else 0.0, hits, queries, ttft["mean"],
            ttft["p90"], s["throughput"]["req_per_s"], s["ok"], s["requests"]))
    if not os.environ.get("KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print("kept", tmp)


if __name__ == "__main__":
    main()

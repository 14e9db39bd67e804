#!/usr/bin/env python3
"""Soak: the local cluster under steady load for a long time.

Starts a cluster (deploy/local/tandem-cluster up, 1 prefill + 1 decode),
drives it with a synthetic BurstGPT-shaped workload (tandem-loadtest synth)
at a fixed rate for --minutes, samples the resident memory (RSS) of every
process of the cluster every --sample-s seconds, then reports for each
process its RSS after warm-up and at the end (growth, target < 5%), and
checks every worker's metrics for leaked KV blocks (free == total) and the
requests' outcomes. Not a CI test: a script to run before a release.

Usage: deploy/local/soak.py [--minutes 10] [--rate 4.8] [--run-dir build/soak]
       [--model PATH]   (rate: e.g. 80% of the capacity tandem-sim or the
                         admission experiment measured)
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def metrics(port):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=4.8)
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--warmup-s", type=float, default=60)
    ap.add_argument("--run-dir", default=os.path.join(REPO, "build", "soak"))
    ap.add_argument("--model")
    ap.add_argument("--bin-dir", default=os.path.join(REPO, "build", "bin"),
                    help="the cluster's binaries and the load tester's (e.g. another build)")
    a = ap.parse_args()
    cluster = os.path.join(REPO, "deploy", "local", "tandem-cluster")
    run_dir = os.path.join(a.run_dir, "cluster")
    up = [cluster, "up", "--run-dir", run_dir, "--bin-dir", a.bin_dir, "--http-listen",
          "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]
    if a.model:
        up += ["--model", a.model]
    subprocess.run(up, check=True)
    try:
        with open(os.path.join(run_dir, "cluster.json")) as f:
            state = json.load(f)
        procs = state["processes"]
        router = next(p for p in procs if p["role"] == "router")
        name = router.get("served_model_name", "")
        context = (state.get("model_info") or {}).get("context") or 512
        samples = {p["name"]: [] for p in procs}
        duration = a.minutes * 60
        n = max(1, int(a.rate * duration))
        out = os.path.join(a.run_dir, "load")
        load = subprocess.Popen([os.path.join(a.bin_dir, "tandem-loadtest"), "synth",
                                 "--n", str(n), "--rate", str(a.rate),
                                 "--url", "http://%s/v1/completions" % state["http"],
                                 "--model", name, "--max-context", str(context - 16), "--no-plots",
                                 "--out", out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        t0 = time.time()
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                t = time.time() - t0
                for p in procs:
                    v = rss_kb(p["pid"])
                    if v is not None:
                        samples[p["name"]].append((t, v))
                stop.wait(a.sample_s)

        th = threading.Thread(target=sample)
        th.start()
        report, _ = load.communicate()
        stop.set()
        th.join()
        print("\n".join(report.strip().splitlines()[-9:]))
        print("\n| process | RSS after %.0f s (MiB) | RSS at the end (MiB) | growth |" % a.warmup_s)
        print("|---|---|---|---|")
        worst = 0.0
        for name, s in samples.items():
            after = [v for t, v in s if t >= a.warmup_s] or [v for _, v in s]
            if not after:
                continue
            first, last = after[0], after[-1]
            growth = 100.0 * (last - first) / first
            worst = max(worst, growth)
            print("| %s | %.1f | %.1f | %+.1f%% |" % (name, first / 1024, last / 1024, growth))
        leaks = []
        for p in procs:
            if p.get("metrics") and p.get("role") in ("prefill", "decode"):
                m = metrics(p["metrics"])
                if m.get("tandem_kv_blocks_free") != m.get("tandem_kv_blocks_total"):
                    leaks.append(p["name"])
        print("\nlargest RSS growth after warm-up: %+.1f%% (target < 5%%); KV block leaks: %s"
              % (worst, ", ".join(leaks) or "none"))
        if load.returncode != 0:
            print("the load tester failed (exit %d)" % load.returncode)
        ok = worst < 5.0 and not leaks and load.returncode == 0
        sys.exit(0 if ok else 1)
    finally:
        subprocess.run([cluster, "down", "--run-dir", run_dir])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Two builds of the local cluster, side by side: the fraction of a trace's
requests served within the SLOs at each of a list of rates, and the highest
rate at which at least 90% are (the capacity, as bench/admission_experiment.py
defines it, admission none).

  bench/capacity_ab.py --a-bin DIR --b-bin DIR --model M --rates 1,1.5,2,3
      --slo-ttft-ms X --slo-tpot-ms Y [--trace ../shared/data/burstgpt/BurstGPT_1_head.csv]
      [--max-requests 200] [--max-context 256] [--rounds 1] [--out DIR]
      [--a-args WORDS] [--b-args WORDS] [--a-env K=V,...] [--b-env K=V,...]

--a-args / --b-args add tandem-cluster up flags to one side (shell words),
e.g. --b-args "--prefill-args '--kv-dtype f16' --decode-args '--kv-dtype f16'"
with the same binaries on both sides to compare two configurations.
--a-env / --b-env set environment variables for one side's cluster (its
workers and router inherit them), e.g. --a-env TANDEM_CPU_AVX512=1 to run
one side on the AVX-512 kernels.

For each round and each rate, A then B then (next rate) B then A, so neither
build always runs first on a machine whose load moves; every run starts a
fresh cluster (deploy/local/tandem-cluster up --bin-dir) and replays the same
requests with the load tester of this checkout. Prints one line per run and
a table; writes OUT/capacity_ab.json. Standard library only.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def run(argv, env=None):
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit("failed (%d): %s\n%s\n%s" % (r.returncode, " ".join(argv), r.stdout[-2000:],
                                              r.stderr[-2000:]))
    return r


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def side_env(words):
    """The environment of one side: this one plus KEY=VALUE,... (empty: as is)."""
    env = dict(os.environ)
    for kv in filter(None, words.split(",")):
        k, sep, v = kv.partition("=")
        if not sep or not k:
            sys.exit("bad --a-env/--b-env entry %r (KEY=VALUE expected)" % kv)
        env[k] = v
    return env


CLUSTER = os.path.join(REPO, "deploy", "local", "tandem-cluster")


def cluster_up(run_dir, bin_dir, model, http, grpc, extra="", env=None):
    """A fresh 1 prefill + 1 decode cluster of bin_dir's build (any left in
    run_dir is stopped first); exits with its output when it does not start."""
    cluster_down(run_dir)
    run([CLUSTER, "up", "--run-dir", run_dir, "--bin-dir", bin_dir, "--model", model,
         "--prefill", "1", "--decode", "1", "--http-listen", http, "--grpc-listen", grpc]
        + shlex.split(extra), env=env)


def cluster_down(run_dir):
    subprocess.run([CLUSTER, "down", "--run-dir", run_dir], capture_output=True)


def one(a, label, bin_dir, extra, env, rate, out):
    run_dir = os.path.join(a.work, "cluster")
    cluster_up(run_dir, bin_dir, a.model, a.http, a.grpc, extra, side_env(env))
    la0 = loadavg()
    with urllib.request.urlopen("http://%s/v1/models" % a.http, timeout=5) as r:
        served = json.loads(r.read())["data"][0]["id"]
    argv = [os.path.join(REPO, "build", "bin", "tandem-loadtest"), "replay", "--trace", a.trace,
            "--format", "burstgpt", "--url", "http://" + a.http, "--rate", "%.4f" % rate,
            "--max-requests", str(a.max_requests), "--max-context", str(a.max_context),
            "--slo-ttft-ms", "%g" % a.slo_ttft_ms, "--slo-tpot-ms", "%g" % a.slo_tpot_ms,
            "--no-plots", "--model", served, "--out", out]
    run(argv)
    cluster_down(run_dir)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    res = {"build": label, "rate": rate, "within_slo": s["goodput"]["fraction"],
           "goodput": s["goodput"]["req_per_s"], "throughput": s["throughput"]["req_per_s"],
           "p90_ttft_ms": s["ttft_ms"]["p90"], "p90_tpot_ms": s["tpot_ms"]["p90"],
           "load_avg": [la0, loadavg()]}
    print("%s %6.3f req/s: %5.1f%% within SLO, goodput %.2f, p90 TTFT %.0f ms, p90 TPOT %.2f ms "
          "(load %s)" % (label, rate, 100 * res["within_slo"], res["goodput"], res["p90_ttft_ms"],
                         res["p90_tpot_ms"], la0), flush=True)
    return res


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a-bin", required=True, help="binaries of build A (before)")
    ap.add_argument("--b-bin", required=True, help="binaries of build B (after)")
    ap.add_argument("--a-args", default="", help="extra tandem-cluster up flags of A")
    ap.add_argument("--b-args", default="", help="extra tandem-cluster up flags of B")
    ap.add_argument("--a-env", default="", help="KEY=VALUE,... for A's cluster")
    ap.add_argument("--b-env", default="", help="KEY=VALUE,... for B's cluster")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rates", required=True, help="req/s, comma-separated")
    ap.add_argument("--slo-ttft-ms", type=float, required=True)
    ap.add_argument("--slo-tpot-ms", type=float, required=True)
    ap.add_argument("--trace", default=os.path.join(REPO, "..", "shared", "data", "burstgpt",
                                                    "BurstGPT_1_head.csv"))
    ap.add_argument("--max-requests", type=int, default=200)
    ap.add_argument("--max-context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="build/capacity_ab")
    ap.add_argument("--http", default="127.0.0.1:18300")
    ap.add_argument("--grpc", default="127.0.0.1:18351")
    a = ap.parse_args(argv)
    a.work = os.path.abspath(a.out)
    os.makedirs(a.work, exist_ok=True)
    rates = [float(x) for x in a.rates.split(",")]
    results = []
    for rnd in range(a.rounds):
        for i, rate in enumerate(rates):
            order = [("A", a.a_bin, a.a_args, a.a_env), ("B", a.b_bin, a.b_args, a.b_env)]
            if (i + rnd) % 2:
                order.reverse()
            for label, bin_dir, extra, env in order:
                out = os.path.join(a.work, "%s-%g-r%d" % (label, rate, rnd))
                results.append(one(a, label, bin_dir, extra, env, rate, out))
    cap = {}
    for label in ("A", "B"):
        ok = [r["rate"] for r in results if r["build"] == label and r["within_slo"] >= 0.9]
        cap[label] = max(ok) if ok else 0.0
    print("\nrate    A within SLO (goodput)   B within SLO (goodput)")
    for rate in rates:
        cells = []
        for label in ("A", "B"):
            rs = [r for r in results if r["build"] == label and r["rate"] == rate]
            cells.append(", ".join("%5.1f%% (%.2f)" % (100 * r["within_slo"], r["goodput"])
                                   for r in rs))
        print("%5.2f   %-24s %s" % (rate, cells[0], cells[1]))
    print("capacity (highest rate with >= 90%% within SLO): A %.2f req/s, B %.2f req/s" %
          (cap["A"], cap["B"]))
    with open(os.path.join(a.work, "capacity_ab.json"), "w") as f:
        json.dump({"args": vars(a), "results": results, "capacity": cap}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Admission policies on the real local cluster, against the simulator.

  bench/admission_experiment.py --cost COST --slo-ttft-ms A --slo-tpot-ms B
      [--out docs/results/admission] [--work build/admexp/exp]
      [--model ../shared/models/stories260K/stories260K.bin] [--prefill 1 --decode 1]
      [--trace ../shared/data/burstgpt/BurstGPT_1_head.csv] [--max-requests 300]
      [--max-context 512] [--loads 0.5,1,1.5,2] [--capacity RPS] [--configs DIR]

1. Capacity: the highest mean request rate (the trace's time axis stretched,
   `tandem-loadtest replay --rate`) at which admission `none` serves >= 90%
   of the requests within both SLOs on the real cluster. The simulator's
   capacity (`tandem-sim tune`, same cost model) is the first probe; the rate
   is then moved by 1.25x steps until the 90% line is bracketed, and the
   bracket halved twice (geometric). --capacity skips the search.
2. Every replay runs on a fresh cluster (deploy/local/tandem-cluster up with
   the policy's router flags and --cost-model COST): the load tester sends
   request i the same prompt in every replay, so a cluster kept up from one
   replay to the next would serve the second from its prefix cache (and
   carry the router's policy state over). Each policy replays the same
   requests at each load (a multiple of the capacity). `none` and `burst` run
   every load; the others skip the loads below 1. While a replay runs, the
   router's /metrics is read every 0.5 s (admission decisions over time), and
   the workers' /metrics before and after (requests, prefill seconds, KV
   transfer bytes, free blocks), so what a rejection costs the workers is
   counted, not assumed.
3. The same requests go through `tandem-sim run` with the same cost model
   at every load for the policies the simulator's `run` can configure
   (`none`, `max_outstanding`); the table gives sim vs real.

Policy parameters: from DIR/admission-<policy>.conf when --configs has one
(the tuner's output: router config keys), else the rules printed with the
results (from the capacity and the SLOs, chosen before any run).

Writes OUT/results.md (tables, commands, machine load), OUT/<policy>-<load>x/
summary.json (real) and sim-<policy>-<load>x/summary.json, OUT/results.json,
and per load a plot of goodput and admitted/held/rejected rates over time for
each policy (gnuplot). Standard library only.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

POLICIES = ("none", "max_outstanding", "token_bucket", "queue_threshold", "burst")
VERDICTS = ("admitted", "held", "rejected", "admitted_after_hold", "rejected_after_hold",
            "hold_timeout")


class Exp:
    def __init__(self, a):
        self.a = a
        self.cmds = []  # every command run, in order, for results.md
        self.loads_seen = []  # (what, uptime) pairs
        self.bin = a.bin_dir

    def run(self, argv, log=True, check=True, quiet=False):
        if log:
            self.cmds.append(" ".join(shlex.quote(x) for x in argv))
        r = subprocess.run(argv, capture_output=True, text=True)
        if check and r.returncode != 0:
            sys.exit("failed (%d): %s\n%s\n%s" % (r.returncode, " ".join(argv), r.stdout[-3000:],
                                                  r.stderr[-3000:]))
        if not quiet:
            sys.stderr.write(r.stderr[-400:] if r.returncode else "")
        return r

    def uptime(self, what):
        with open("/proc/loadavg") as f:
            la = " ".join(f.read().split()[:3])
        self.loads_seen.append((what, la))
        return la

    # ---- cluster ----
    def up(self, router_args):
        a = self.a
        self.run([a.cluster, "down", "--run-dir", a.run_dir], log=False, check=False, quiet=True)
        argv = [a.cluster, "up", "--run-dir", a.run_dir, "--model", a.model, "--prefill",
                str(a.prefill), "--decode", str(a.decode), "--bin-dir", os.path.abspath(a.bin_dir),
                "--http-listen", a.http,
                "--grpc-listen", a.grpc, "--router-args=" + " ".join(router_args)]
        self.run(argv)
        with open(os.path.join(a.run_dir, "cluster.json")) as f:
            cl = json.load(f)
        self.workers = [(p["name"], p["metrics"]) for p in cl["processes"]
                        if p["role"] != "router" and p.get("metrics")]
        self.blocks = max(int(p.get("blocks", 0)) for p in cl["processes"]
                          if p["role"] == "decode")
        with urllib.request.urlopen("http://%s/v1/models" % a.http, timeout=5) as r:
            self.served = json.loads(r.read())["data"][0]["id"]

    def down(self):
        self.run([self.a.cluster, "down", "--run-dir", self.a.run_dir])

    # ---- metrics ----
    @staticmethod
    def scrape(url):
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            m = re.match(r"^(\S+?)(\{[^}]*\})?\s+(\S+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def worker_snapshot(self):
        snap = {}
        for name, port in self.workers:
            m = self.scrape("http://127.0.0.1:%d/metrics" % port)
            req = sum(v for k, v in m.items() if k.startswith("tandem_requests_total"))
            snap[name] = {
                "requests": req,
                "prefill_s": m.get("tandem_prefill_seconds_sum", 0.0),
                "prefills": m.get("tandem_prefill_seconds_count", 0.0),
                "kv_bytes": m.get("tandem_kv_transfer_bytes_total", 0.0),
                "prefix_hit_blocks": m.get("tandem_prefix_cache_hit_blocks_total", 0.0),
                "free": m.get("tandem_kv_blocks_free", 0.0),
                "total": m.get("tandem_kv_blocks_total", 0.0),
            }
        return snap

    def router_counts(self):
        m = self.scrape("http://%s/metrics" % self.a.http)
        c = {v: 0.0 for v in VERDICTS}
        for k, val in m.items():
            mm = re.match(r'tandem_router_admission_total\{verdict="([a-z_]+)"\}', k)
            if mm and mm.group(1) in c:
                c[mm.group(1)] = val
        c["held_now"] = m.get("tandem_router_held", 0.0)
        # The factors burst applies to its cost model (SLO feedback, speed tracking).
        for stage in ("prefill", "decode"):
            c["speed_" + stage] = m.get('tandem_router_admission_speed_factor{stage="%s"}' % stage,
                                        1.0)
        return c

    # ---- one replay ----
    def replay(self, rate, out, poll=False):
        a = self.a
        shutil.rmtree(out, ignore_errors=True)
        argv = [os.path.join(self.bin, "tandem-loadtest"), "replay", "--trace", a.trace,
                "--format", "burstgpt", "--url", "http://" + a.http, "--model", self.served, "--rate", "%.4f" % rate,
                "--max-requests", str(a.max_requests), "--max-context", str(a.max_context),
                "--slo-ttft-ms", "%g" % a.slo_ttft_ms, "--slo-tpot-ms", "%g" % a.slo_tpot_ms,
                "--out", out]
        polls = []
        stop = threading.Event()

        def poller():
            t0 = time.monotonic()
            while not stop.is_set():
                try:
                    polls.append((time.monotonic() - t0, self.router_counts()))
                except OSError:
                    pass
                stop.wait(0.5)

        th = threading.Thread(target=poller) if poll else None
        before = self.worker_snapshot() if poll else None
        la0 = self.uptime("before " + out)
        if th:
            th.start()
        self.run(argv, check=False)
        if th:
            stop.set()
            th.join()
            time.sleep(1.2)  # a heartbeat, so the free-block gauges are current
        la1 = self.uptime("after " + out)
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        s["_load_avg"] = [la0, la1]
        if poll:
            s["_workers_before"] = before
            s["_workers_after"] = self.worker_snapshot()
            s["_router_polls"] = polls
        return s

    def profile(self, out):
        """bench/profile_cost.py against the cluster that is up; returns the cost file (an
        absolute path: the router runs in another directory)."""
        a = self.a
        out = os.path.abspath(out)
        self.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "profile_cost.py"),
                  "--url", "http://" + a.http, "--vocab", str(a.vocab), "--reps", "3",
                  "--out", out, "--json", out + ".json"], quiet=True)
        return out

    def sim(self, rate, out, policy, extra, cost=None):
        a = self.a
        shutil.rmtree(out, ignore_errors=True)
        argv = [os.path.join(self.bin, "tandem-sim"), "run", "--trace", a.trace, "--format",
                "burstgpt", "--rate", "%.4f" % rate, "--max-requests", str(a.max_requests),
                "--max-context", str(a.max_context), "--prefill", str(a.prefill), "--decode",
                str(a.decode), "--kv-blocks", str(self.blocks or 2048), "--cost", cost or a.cost,
                "--slo-ttft-ms", "%g" % a.slo_ttft_ms, "--slo-tpot-ms", "%g" % a.slo_tpot_ms,
                "--admission", policy, "--out", out, "--no-plots"] + extra
        self.run(argv)
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)


def tune_policies(a, e, policies, cap):
    """tandem-sim tune on synthetic traces shaped like a.trace (tandem-loadtest fit: Gamma
    inter-arrivals, Zipf lengths), tuned on one seed and reported on another; returns the
    directory of the admission-<policy>.conf files it wrote. Rates tuned in multiples of the
    simulated capacity are written in multiples of cap, the capacity of the real cluster on
    the replayed trace."""
    lt = os.path.join(a.bin_dir, "tandem-loadtest")
    r = e.run([lt, "fit", "--trace", a.trace, "--format", "burstgpt"], quiet=True)
    fit = json.loads(r.stdout)
    g = fit["interarrival_gamma"]
    synth = ["--gamma-shape", "%.6g" % g["mle_shape"], "--gamma-scale-s", "%.6g" % g["mle_scale_s"],
             "--req-zipf", "%.6g" % fit["request_zipf_s"], "--req-max", str(fit["request_max"]),
             "--resp-zipf", "%.6g" % fit["response_zipf_s"], "--resp-max",
             str(fit["response_max"])]
    seeds = a.tune_seeds.split(",")
    paths = []
    for seed in seeds[:2]:
        path = os.path.join(a.work, "synth-%s.jsonl" % seed)
        e.run([lt, "synth", "--n", str(a.tune_n), "--seed", seed, "--write-trace", path] + synth)
        paths.append(path)
    out = os.path.join(a.work, "tune")
    shutil.rmtree(out, ignore_errors=True)
    tuned = [p for p in policies if p != "none"]
    r = e.run([os.path.join(a.bin_dir, "tandem-sim"), "tune", "--trace", paths[0], "--holdout",
               paths[1], "--format", "mooncake", "--max-context", str(a.max_context),
               "--prefill", str(a.prefill), "--decode", str(a.decode), "--kv-blocks",
               str(e.blocks), "--cost", a.cost, "--slo-ttft-ms", "%g" % a.slo_ttft_ms,
               "--slo-tpot-ms", "%g" % a.slo_tpot_ms, "--policies", ",".join(tuned), "--loads",
               a.loads, "--target-capacity", "%.6g" % cap, "--out", out])
    with open(os.path.join(a.out, "tune.txt"), "w") as f:
        f.write(r.stdout)
    print(r.stdout, flush=True)
    cdir = os.path.join(a.out, "configs")
    os.makedirs(cdir, exist_ok=True)
    for p in tuned:
        src = os.path.join(out, "admission-%s.conf" % p)
        if os.path.exists(src):
            shutil.copy(src, cdir)
    return out


def brief(s):
    n = max(1, s["requests"])
    return {"requests": s["requests"], "ok": s["ok"], "rejected": s["rejected"],
            "errors": s["errors"], "rej_pct": 100.0 * s["rejected"] / n,
            "thr": s["throughput"]["req_per_s"], "good": s["goodput"]["req_per_s"],
            "good_frac": s["goodput"]["fraction"], "p90_ttft": s["ttft_ms"]["p90"],
            "p99_ttft": s["ttft_ms"]["p99"], "p90_tpot": s["tpot_ms"]["p90"],
            "duration": s["duration_s"]}


def read_conf(path):
    args = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "=" in line:
                k, v = (x.strip() for x in line.split("=", 1))
                args += ["--" + k.replace("_", "-"), v.strip('"')]
    return args


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cost", required=True, help="cost-model file (bench/profile_cost.py)")
    ap.add_argument("--slo-ttft-ms", type=float, required=True)
    ap.add_argument("--slo-tpot-ms", type=float, required=True)
    ap.add_argument("--out", default="docs/results/admission")
    ap.add_argument("--work", default="build/admexp/exp")
    ap.add_argument("--bin-dir", default="build/bin")
    ap.add_argument("--cluster", default="deploy/local/tandem-cluster")
    ap.add_argument("--model", default="../shared/models/stories260K/stories260K.bin")
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--trace", default="../shared/data/burstgpt/BurstGPT_1_head.csv")
    ap.add_argument("--max-requests", type=int, default=300)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--loads", default="0.5,1,1.5,2")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--low-load-policies", default="none,burst",
                    help="the policies that also run the loads below 1 (the others start at 1)")
    ap.add_argument("--capacity", type=float, default=0.0, help="skip the search (req/s)")
    ap.add_argument("--configs", help="DIR with admission-<policy>.conf files")
    ap.add_argument("--tune", action="store_true",
                    help="tune every policy's parameters with tandem-sim tune first, on "
                    "BurstGPT-shaped synthetic traces fitted to --trace (one seed tuned on, "
                    "another held out), and use the configs it writes")
    ap.add_argument("--tune-n", type=int, default=4000, help="requests per synthetic trace")
    ap.add_argument("--tune-seeds", default="41,42", help="training seed, held-out seed")
    ap.add_argument("--profile-each", action="store_true",
                    help="profile the cluster (bench/profile_cost.py) right before every replay "
                    "and give that cost model to the replay's router and to its simulation")
    ap.add_argument("--vocab", type=int, default=32000, help="profile prompts' ids below this")
    ap.add_argument("--http", default="127.0.0.1:18300")
    ap.add_argument("--grpc", default="127.0.0.1:18351")
    a = ap.parse_args(argv)
    a.cost = os.path.abspath(a.cost)  # the router runs in another directory
    a.run_dir = os.path.join(a.work, "cluster")
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    e = Exp(a)
    loads = [float(x) for x in a.loads.split(",")]
    policies = a.policies.split(",")
    t_start = time.time()
    la_start = e.uptime("start")

    # 1. Capacity.
    e.up(["--admission", "none", "--cost-model", a.cost])
    probes = []
    if a.capacity > 0:
        cap = a.capacity
    else:
        tune = os.path.join(a.work, "sim-tune")
        r = e.run([os.path.join(a.bin_dir, "tandem-sim"), "tune", "--trace", a.trace, "--format",
                   "burstgpt", "--max-requests", str(a.max_requests), "--max-context",
                   str(a.max_context), "--prefill", str(a.prefill), "--decode", str(a.decode),
                   "--kv-blocks", str(e.blocks), "--cost", a.cost, "--slo-ttft-ms",
                   "%g" % a.slo_ttft_ms, "--slo-tpot-ms", "%g" % a.slo_tpot_ms, "--policies",
                   "max_outstanding", "--train-fraction", "0.95", "--loads", "1", "--out", tune])
        m = re.search(r"capacity .*?: ([0-9.]+) req/s", r.stdout)
        sim_cap = float(m.group(1))

        def probe(rate):
            e.up(["--admission", "none", "--cost-model", a.cost])
            s = e.replay(rate, os.path.join(a.work, "cap-%.3f" % rate))
            frac = s["goodput"]["fraction"]
            probes.append((rate, frac, s["ttft_ms"]["p90"], s["tpot_ms"]["p90"]))
            print("capacity probe %.3f req/s: %.1f%% within SLO" % (rate, 100 * frac), flush=True)
            return frac >= 0.9

        lo, hi = None, None
        rate = sim_cap
        for _ in range(6):
            if probe(rate):
                lo = rate
                if hi:
                    break
                rate *= 1.25
            else:
                hi = rate
                if lo:
                    break
                rate /= 1.25
        if lo is None:
            lo = rate
        if hi is not None:
            for _ in range(2):
                mid = math.sqrt(lo * hi)
                if probe(mid):
                    lo = mid
                else:
                    hi = mid
        cap = lo
    print("capacity %.3f req/s" % cap, flush=True)

    if a.tune:
        a.configs = tune_policies(a, e, policies, cap)

    # 2. Policies, hand-picked rules (stated in results.md) unless a config is given.
    params = {
        "none": ([], "-"),
        "max_outstanding": None,  # from none's 1x run (Little's law), below
        "token_bucket": (["--bucket-rate", "%.3f" % cap, "--bucket-burst", "%.3f" % max(1.0, cap)],
                         "rate = capacity, burst = 1 s of capacity"),
        "queue_threshold": (["--queue-max-ms", "%g" % (a.slo_ttft_ms / 2)],
                            "queue_max_ms = TTFT SLO / 2"),
        "burst": (["--slo-ttft-ms", "%g" % a.slo_ttft_ms, "--slo-tpot-ms", "%g" % a.slo_tpot_ms],
                  "SLOs = the experiment's; windows, hold and burst detection at their defaults"),
    }
    real, simr, mo_n, costs = {}, {}, None, {}
    for pol in policies:
        conf = os.path.join(a.configs, "admission-%s.conf" % pol) if a.configs else None
        if conf and os.path.exists(conf):
            extra, rule = read_conf(conf), "from " + conf
            extra = [x for x in extra if x not in ("--admission", pol)]
        elif pol == "max_outstanding":
            s1 = real.get(("none", 1.0))
            mean_e2e = (s1["e2e_ms"]["mean"] / 1000) if s1 else 0.5
            mo_n = max(2, int(math.ceil(1.5 * cap * mean_e2e)))
            extra, rule = (["--max-outstanding", str(mo_n)],
                           "1.5 x capacity x mean e2e of none at 1x (Little's law), = %d" % mo_n)
        else:
            extra, rule = params[pol]
        if pol == "max_outstanding" and mo_n is None:
            mo_n = int(extra[extra.index("--max-outstanding") + 1])
        params[pol] = (extra, rule)
        for ld in loads:
            if ld < 1 and pol not in a.low_load_policies.split(","):
                continue
            out = os.path.join(a.out, "%s-%gx" % (pol, ld))
            if a.profile_each:
                # The host's speed drifts (a shared VM): measure the cost model on the
                # cluster now, and give it to this replay's router and simulator.
                e.up(["--admission", "none", "--cost-model", a.cost])
                costs[(pol, ld)] = e.profile(os.path.join(a.out, "cost-%s-%gx.txt" % (pol, ld)))
                e.down()
            e.up(["--admission", pol, "--cost-model", costs.get((pol, ld), a.cost)] + extra)
            s = e.replay(cap * ld, out, poll=True)
            real[(pol, ld)] = s
            b = brief(s)
            hits = sum(s["_workers_after"][k].get("prefix_hit_blocks", 0) -
                       s["_workers_before"][k].get("prefix_hit_blocks", 0)
                       for k in s["_workers_after"] if k.startswith("prefill"))
            print("%-16s %4gx: thr %.2f good %.2f rej %.1f%% p90 TTFT %.1f ms, "
                  "prefix-cache hit blocks %d" %
                  (pol, ld, b["thr"], b["good"], b["rej_pct"], b["p90_ttft"], hits), flush=True)
            with open(os.path.join(out, "admission_timeline.json"), "w") as f:
                json.dump({"polls": s["_router_polls"], "workers_before": s["_workers_before"],
                           "workers_after": s["_workers_after"], "load_avg": s["_load_avg"]}, f)
            for big in ("requests.csv", "tokens.csv", "cdf.dat"):
                p = os.path.join(out, big)
                if os.path.exists(p) and big != "requests.csv":
                    os.remove(p)
            e.down()
    # 3. Simulator, same requests, same cost model, same parameters.
    for pol in policies:
        extra = [x for x in params[pol][0]]
        for ld in loads:
            if (pol, ld) in real:
                simr[(pol, ld)] = e.sim(cap * ld, os.path.join(a.out, "sim-%s-%gx" % (pol, ld)),
                                        pol, extra, costs.get((pol, ld)))
    la_end = e.uptime("end")
    write_results(a, e, cap, probes, loads, policies, params, real, simr,
                  (t_start, time.time(), la_start, la_end))
    return 0


def pct(a, b):
    return 100.0 * (a - b) / b if b else float("nan")


def write_results(a, e, cap, probes, loads, policies, params, real, simr, times):
    R = {"capacity": cap, "probes": probes, "slo": [a.slo_ttft_ms, a.slo_tpot_ms],
         "params": {p: params[p] for p in policies},
         "real": {"%s@%g" % k: brief(v) for k, v in real.items()},
         "sim": {"%s@%g" % k: brief(v) for k, v in simr.items()},
         "workers": {"%s@%g" % k: {"before": v["_workers_before"], "after": v["_workers_after"]}
                     for k, v in real.items()}}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(R, f, indent=1)
    L = []
    w = L.append
    w("# Admission policies on the local cluster (generated by bench/admission_experiment.py)\n")
    w("Started %s UTC, %.0f s; load average %s at the start, %s at the end (2-core host, "
      "a shared VM: see the per-run load averages in results.json's "
      "summary files)." % (time.strftime("%Y-%m-%d %H:%M", time.gmtime(times[0])),
                           times[1] - times[0], times[2], times[3]))
    w("\nCluster: %s, %d prefill + %d decode, %d decode KV blocks; trace %s, first %d requests, "
      "`--max-context %d`; SLOs TTFT <= %g ms, TPOT <= %g ms; cost model `%s`.\n" %
      (a.model, a.prefill, a.decode, e.blocks, a.trace, a.max_requests, a.max_context,
       a.slo_ttft_ms, a.slo_tpot_ms, a.cost))
    w("## Capacity\n")
    for r, f_, t90, tp90 in probes:
        w("- %.3f req/s: %.1f%% within SLO (p90 TTFT %.1f ms, p90 TPOT %.3f ms)" %
          (r, 100 * f_, t90, tp90))
    w("\n**Capacity: %.3f req/s** (highest probe with >= 90%% of requests within both SLOs, "
      "admission none).\n" % cap)
    w("## Policy parameters\n")
    for p in policies:
        w("- `%s`: `%s` (%s)" % (p, " ".join(params[p][0]) or "-", params[p][1]))
    w("\n## Real cluster\n")
    w("goodput req/s / throughput req/s / rejected % / p90 TTFT ms, per load (x capacity)\n")
    w("| policy | " + " | ".join("%gx (%.2f req/s)" % (ld, ld * cap) for ld in loads) + " |")
    w("|---|" + "---|" * len(loads))
    for p in policies:
        cells = []
        for ld in loads:
            s = real.get((p, ld))
            if s is None:
                cells.append("-")
                continue
            b = brief(s)
            cells.append("%.2f / %.2f / %.1f%% / %.0f" % (b["good"], b["thr"], b["rej_pct"],
                                                          b["p90_ttft"]))
        w("| %s | %s |" % (p, " | ".join(cells)))
    w("\n## Simulator vs real (same requests, same cost model)\n")
    w("| policy | load | throughput sim / real (diff) | goodput sim / real (diff) | "
      "p90 TTFT ms sim / real (diff) |")
    w("|---|---|---|---|---|")
    for (p, ld), s in sorted(simr.items()):
        bs, br = brief(s), brief(real[(p, ld)])
        w("| %s | %gx | %.2f / %.2f (%+.1f%%) | %.2f / %.2f (%+.1f%%) | %.1f / %.1f (%+.1f%%) |" %
          (p, ld, bs["thr"], br["thr"], pct(bs["thr"], br["thr"]), bs["good"], br["good"],
           pct(bs["good"], br["good"]), bs["p90_ttft"], br["p90_ttft"],
           pct(bs["p90_ttft"], br["p90_ttft"])))
    w("\n## What the workers did (their /metrics, before and after each replay)\n")
    w("| policy | load | sent | rejected (429) | errors | decode requests | prefills | "
      "prefix-cache hit blocks | KV bytes | free / total blocks after |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for (p, ld), s in sorted(real.items()):
        b0, b1 = s["_workers_before"], s["_workers_after"]
        dec = [k for k in b1 if k.startswith("decode")]
        pre = [k for k in b1 if k.startswith("prefill")]
        dreq = sum(b1[k]["requests"] - b0[k]["requests"] for k in dec)
        prefs = sum(b1[k]["prefills"] - b0[k]["prefills"] for k in pre)
        hits = sum(b1[k].get("prefix_hit_blocks", 0) - b0[k].get("prefix_hit_blocks", 0)
                   for k in pre)
        kvb = sum(b1[k]["kv_bytes"] - b0[k]["kv_bytes"] for k in dec + pre)
        free = sum(b1[k]["free"] for k in dec)
        tot = sum(b1[k]["total"] for k in dec)
        w("| %s | %gx | %d | %d | %d | %d | %d | %d | %d | %d / %d |" %
          (p, ld, s["requests"], s["rejected"], s["errors"], dreq, prefs, hits, kvb, free, tot))
    w("\n## Plots\n")
    for ld in loads:
        png = plot(a, ld, [p for p in policies if (p, ld) in real], real)
        if png:
            w("- %gx: `%s`" % (ld, os.path.basename(png)))
    w("\n## Commands run, in order\n")
    w("```")
    L.extend(e.cmds)
    w("```")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(L) + "\n")


def plot(a, ld, pols, real):
    """goodput (per completion second) and admission decisions per second, one panel per policy."""
    if not pols or not shutil.which("gnuplot"):
        return None
    base = os.path.join(a.out, "timeline-%gx" % ld)
    script = ["set terminal pngcairo noenhanced size 900,%d" % (230 * len(pols)),
              "set output '%s.png'" % base, "set multiplot layout %d,1" % len(pols),
              "set key outside right", "set xlabel 'time (s)'", "set ylabel 'req/s'"]
    for p in pols:
        s = real[(p, ld)]
        dat = "%s-%s.dat" % (base, p)
        good = {}
        rq = os.path.join(a.out, "%s-%gx" % (p, ld), "requests.csv")
        with open(rq) as f:
            hdr = f.readline().strip().split(",")
            ix = {k: i for i, k in enumerate(hdr)}
            for line in f:
                c = line.rstrip("\n").split(",")
                if len(c) < len(hdr) or c[ix["good"]] not in ("1", "true"):
                    continue
                t = (float(c[ix["send_ms"]]) + float(c[ix["e2e_ms"]])) / 1000
                good[int(t)] = good.get(int(t), 0) + 1
        polls = s["_router_polls"]
        rows = []
        prev = None
        for t, c in polls:
            if prev is not None and t > prev[0]:
                dt = t - prev[0]
                adm = (c["admitted"] + c["admitted_after_hold"] - prev[1]["admitted"]
                       - prev[1]["admitted_after_hold"]) / dt
                held = (c["held"] - prev[1]["held"]) / dt
                rej = (c["rejected"] + c["rejected_after_hold"] + c["hold_timeout"]
                       - prev[1]["rejected"] - prev[1]["rejected_after_hold"]
                       - prev[1]["hold_timeout"]) / dt
                rows.append((t, adm, held, rej, good.get(int(t), 0)))
            prev = (t, c)
        with open(dat, "w") as f:
            f.write("# t_s admitted/s held/s rejected/s good_completions_in_that_second\n")
            for r in rows:
                f.write("%.2f %.2f %.2f %.2f %d\n" % r)
        script.append("set title '%s at %gx capacity'" % (p, ld))
        script.append("plot '%s' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', "
                      "'' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'" % dat)
    script.append("unset multiplot")
    gp = base + ".gp"
    with open(gp, "w") as f:
        f.write("\n".join(script) + "\n")
    subprocess.run(["gnuplot", gp], capture_output=True)
    return base + ".png"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

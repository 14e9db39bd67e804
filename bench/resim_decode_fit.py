#!/usr/bin/env python3
"""Re-simulate recorded admission replays with the decode step refitted from their profile.

usage: resim_decode_fit.py [--sim BIN] ROUND_DIR [ROUND_DIR ...]

Each ROUND_DIR holds the cost model its replays ran with (cost.txt), the profile it came from
(profile.json, bench/profile_cost.py --json) and one or more results.md files (in it, in the
folders in it, or in the folders beside it named ROUND_DIR-*) written by bench/admission_experiment.py, whose
"tandem-sim run" lines simulated the real replays (<policy>-<load>x/summary.json next to each
results.md). Every line is run twice: with cost.txt as it is, and with its three decode keys
refitted with one weight per measured point instead of one per request (fit_decode_per_point).
Prints, per fit, how many pairs of simulated and real replay are within 10% in throughput,
goodput and p90 TTFT. --sim replaces the simulator a line names when that one is absent.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_cost  # noqa: E402

DECODE_KEYS = ("decode_step_us_fixed", "decode_step_us_per_seq", "decode_step_us_per_ctx_token")


def fit_decode_per_point(dec):
    """decode step_us ~ fixed + per_seq x batch + per_ctx x summed context, fitted to each
    measured point (prompt length, batch sent) once: its mean batch and summed context and its
    median step, by relative error. bench/profile_cost.py fits the samples themselves, one per
    request, so a batch of 48 weighs 48 times a batch of 1."""
    pts = {}
    for d in dec:
        pts.setdefault((d["p"], d["b"]), []).append(d)
    rows, ys = [], []
    for _, ds in sorted(pts.items()):
        rows.append([1.0, statistics.mean(d["batch"] for d in ds),
                     statistics.mean(d["sum_ctx"] for d in ds)])
        ys.append(statistics.median(d["step_us"] for d in ds))
    return profile_cost.fit_nonneg(rows, ys, relative=True)


def refit_cost(cost_path, profile_path, out_path):
    with open(profile_path) as f:
        fit = fit_decode_per_point(json.load(f)["decode"])
    with open(cost_path) as f:
        lines = f.read().splitlines()
    with open(out_path, "w") as f:
        for line in lines:
            key = line.split("=")[0].strip()
            if key in DECODE_KEYS:
                line = "%s = %.17g" % (key, fit[DECODE_KEYS.index(key)])
            f.write(line + "\n")
    return fit


def within(a, b):
    return b > 0 and abs(a / b - 1) <= 0.10


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", help="the simulator to run where a line's is absent")
    ap.add_argument("rounds", nargs="+")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="resim-")
    totals = {"profiled": [0, 0, 0, 0, 0], "refitted": [0, 0, 0, 0, 0]}
    for rd in a.rounds:
        cost = os.path.join(rd, "cost.txt")
        refit = os.path.join(tmp, "cost-refit.txt")
        fit = refit_cost(cost, os.path.join(rd, "profile.json"), refit)
        print("%s: decode step_us refitted = %.1f + %.1f x batch + %.4f x summed context"
              % (rd, *fit))
        mds = [os.path.join(rd, "results.md")] + sorted(glob.glob(os.path.join(rd, "*", "results.md")))
        for md in mds + sorted(glob.glob(rd.rstrip("/") + "-*/results.md")):
            if not os.path.exists(md):
                continue
            for line in open(md):
                if "tandem-sim run" not in line:
                    continue
                args = line.strip().strip("`").split()
                i = next(k for k, x in enumerate(args) if x.endswith("tandem-sim"))
                args = args[i:]
                if not os.path.exists(args[0]):
                    if not a.sim:
                        sys.exit("%s is absent: give --sim" % args[0])
                    args[0] = a.sim
                out = args[args.index("--out") + 1]
                real = os.path.join(os.path.dirname(md), os.path.basename(out)[len("sim-"):],
                                    "summary.json")
                with open(real) as f:
                    r = json.load(f)
                for name, c in (("profiled", cost), ("refitted", refit)):
                    args[args.index("--cost") + 1] = c
                    args[args.index("--out") + 1] = os.path.join(tmp, "out")
                    subprocess.run(args, check=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                    with open(os.path.join(tmp, "out", "summary.json")) as f:
                        s = json.load(f)
                    t = totals[name]
                    t[0] += 1
                    t[1] += within(s["throughput"]["req_per_s"], r["throughput"]["req_per_s"])
                    t[2] += within(s["goodput"]["req_per_s"], r["goodput"]["req_per_s"])
                    t[3] += within(s["ttft_ms"]["p90"], r["ttft_ms"]["p90"])
                    t[4] += s["goodput"]["req_per_s"] > r["goodput"]["req_per_s"]
    for name, t in totals.items():
        print("%-9s %d pairs within 10%%: throughput %d, goodput %d, p90 TTFT %d; "
              "simulated goodput above the real one in %d" % (name, *t))


if __name__ == "__main__":
    main(sys.argv[1:])

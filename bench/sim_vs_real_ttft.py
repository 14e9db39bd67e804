#!/usr/bin/env python3
"""Per-request TTFT of the simulator against the real cluster, replay by replay.

  bench/sim_vs_real_ttft.py [DIR]   (default docs/results/admission)

For every real replay DIR/<policy>-<load>x/requests.csv that has a simulated
twin DIR/sim-<policy>-<load>x/requests.csv (bench/admission_experiment.py
writes both), prints the median real/sim TTFT ratio over all requests both
served, and over the "isolated" ones: arrived more than ISOLATED_MS after the
previous request, so the cluster was close to idle and the simulator's TTFT
is mostly the cost model's prefill time. A ratio near 1 there with a gap in
the tail points at queueing the simulator misses; a ratio above 1 there
points at the cost model itself (the profile taken before the replay
against the replay's own cluster).
"""
import csv
import glob
import json
import os
import statistics
import sys

ISOLATED_MS = 500.0


def load(path):
    with open(path) as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "docs/results/admission"
    print("%-22s %5s %18s %8s %22s  %s" % ("replay", "n", "real/sim TTFT med", "isolated",
                                           "isolated real/sim med", "load average"))
    for real_dir in sorted(glob.glob(os.path.join(root, "*-*x"))):
        name = os.path.basename(real_dir)
        sim_dir = os.path.join(root, "sim-" + name)
        if name.startswith("sim-") or not os.path.exists(os.path.join(sim_dir, "requests.csv")):
            continue
        real, sim = load(os.path.join(real_dir, "requests.csv")), load(
            os.path.join(sim_dir, "requests.csv"))
        rows = sorted((float(r["sched_ms"]), float(r["ttft_ms"]), float(sim[k]["ttft_ms"]))
                      for k, r in real.items()
                      if k in sim and r["outcome"] == "ok" and sim[k]["outcome"] == "ok")
        if not rows:
            continue
        ratios = [t_real / t_sim for _, t_real, t_sim in rows if t_sim > 0]
        iso = [rows[i][1] / rows[i][2] for i in range(1, len(rows))
               if rows[i][0] - rows[i - 1][0] > ISOLATED_MS and rows[i][2] > 0]
        load_avg = ""
        tl = os.path.join(real_dir, "admission_timeline.json")
        if os.path.exists(tl):
            with open(tl) as f:
                load_avg = " -> ".join(json.load(f).get("load_avg", []))
        print("%-22s %5d %18.2f %8d %22s  %s" % (
            name, len(rows), statistics.median(ratios), len(iso),
            "%.2f (%.2f-%.2f)" % (statistics.median(iso), min(iso), max(iso)) if iso else "-",
            load_avg))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Summarize repeated admission experiments: the results.json of several
`bench/admission_experiment.py` runs (one directory each, same trace, loads
and configs), as markdown tables of goodput per policy and run, their means,
and per-run comparisons of burst with the others.

Usage: python3 bench/admission_repeats.py DIR [DIR ...]
"""
import json
import os
import statistics
import sys


def main(dirs):
    runs = []
    for d in dirs:
        with open(os.path.join(d, "results.json")) as f:
            runs.append((d, json.load(f)["real"]))
    keys = sorted({k for _, r in runs for k in r})
    loads = sorted({float(k.split("@")[1]) for k in keys})
    order = ["none", "token_bucket", "queue_threshold", "max_outstanding", "burst"]
    pols = [p for p in order if any(k.startswith(p + "@") for k in keys)]
    for ld in loads:
        print("### %gx: goodput req/s (throughput, rejected %%) per run\n" % ld)
        print("| policy | " + " | ".join("run %d" % (i + 1) for i in range(len(runs))) +
              " | mean | min–max |")
        print("|---|" + "---|" * (len(runs) + 2))
        means = {}
        for p in pols:
            cells, goods = [], []
            for _, r in runs:
                s = r.get("%s@%g" % (p, ld))
                if not s:
                    cells.append("")
                    continue
                goods.append(s["good"])
                cells.append("%.2f (%.2f, %.0f%%)" % (s["good"], s["thr"], s["rej_pct"]))
            if not goods:
                continue
            means[p] = statistics.mean(goods)
            print("| %s | %s | **%.2f** | %.2f–%.2f |" % (p, " | ".join(cells), means[p],
                                                        min(goods), max(goods)))
        print()
        if "burst" in means:
            for p in pols:
                if p == "burst" or p not in means:
                    continue
                per = []
                wins = 0
                for _, r in runs:
                    b, o = r.get("burst@%g" % ld), r.get("%s@%g" % (p, ld))
                    if b and o and o["good"] > 0:
                        per.append(b["good"] / o["good"])
                        wins += b["good"] > o["good"]
                print("- burst / %s: per run %s; of the means %.2f; burst ahead in %d of %d" %
                      (p, ", ".join("%.2f" % x for x in per), means["burst"] / means[p], wins,
                       len(per)))
        print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1:])

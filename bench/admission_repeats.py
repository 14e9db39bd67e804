#!/usr/bin/env python3
"""Summarize repeated admission experiments: the results.json of several
`bench/admission_experiment.py` runs (same trace, loads and configs), as
markdown tables of goodput per policy and round, their means, and per-round
comparisons of each burst variant with the other policies.

Usage: python3 bench/admission_repeats.py ROUND [ROUND ...]
  ROUND  DIR, or DIR+DIR+... (runs of the same round, e.g. two configs run
         back to back); DIR@LABEL names that run's policies "policy (LABEL)"
"""
import json
import os
import statistics
import sys

ORDER = ["none", "token_bucket", "queue_threshold", "max_outstanding", "burst"]


def load_round(spec):
    real = {}
    for part in spec.split("+"):
        d, _, label = part.partition("@")
        with open(os.path.join(d, "results.json")) as f:
            for k, v in json.load(f)["real"].items():
                pol, ld = k.split("@")
                real[(pol + (" (%s)" % label if label else ""), float(ld))] = v
    return real


def main(specs):
    rounds = [load_round(s) for s in specs]
    keys = {k for r in rounds for k in r}
    loads = sorted({ld for _, ld in keys})
    names = {p for p, _ in keys}
    pols = sorted(names, key=lambda p: (ORDER.index(p.split(" ")[0]) if p.split(" ")[0] in ORDER
                                        else len(ORDER), p))
    for ld in loads:
        print("### %gx: goodput req/s (throughput, rejected %%) per round\n" % ld)
        print("| policy | " + " | ".join("round %d" % (i + 1) for i in range(len(rounds))) +
              " | mean | min–max |")
        print("|---|" + "---|" * (len(rounds) + 2))
        means = {}
        for p in pols:
            cells, goods = [], []
            for r in rounds:
                s = r.get((p, ld))
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
        for b in [p for p in pols if p.startswith("burst") and p in means]:
            for p in pols:
                if p == b or p not in means:
                    continue
                per, wins = [], 0
                for r in rounds:
                    x, o = r.get((b, ld)), r.get((p, ld))
                    if x and o and o["good"] > 0:
                        per.append(x["good"] / o["good"])
                        wins += x["good"] > o["good"]
                if per:
                    print("- %s / %s: per round %s; of the means %.2f; %s ahead in %d of %d" %
                          (b, p, ", ".join("%.2f" % v for v in per), means[b] / means[p], b,
                           wins, len(per)))
        print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1:])

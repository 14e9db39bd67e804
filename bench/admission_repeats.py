#!/usr/bin/env python3
"""Summarize repeated admission experiments: the results.json of several
`bench/admission_experiment.py` runs (same trace, loads and configs), as
markdown tables of goodput per policy and round, their means, and per-round
comparisons of each burst variant with the other policies; then the
simulator against the real cluster (throughput, goodput, p90 TTFT): per
replay, on the means over the rounds, and beside the real replays' own
spread between rounds.

Usage: python3 bench/admission_repeats.py ROUND [ROUND ...]
  ROUND  DIR, or DIR+DIR+... (runs of the same round, e.g. two configs run
         back to back); DIR@LABEL names that run's policies "policy (LABEL)"
"""
import json
import os
import statistics
import sys

ORDER = ["none", "token_bucket", "queue_threshold", "max_outstanding", "burst"]


def load_round(spec, kind="real"):
    out = {}
    for part in spec.split("+"):
        d, _, label = part.partition("@")
        with open(os.path.join(d, "results.json")) as f:
            for k, v in json.load(f).get(kind, {}).items():
                pol, ld = k.split("@")
                out[(pol + (" (%s)" % label if label else ""), float(ld))] = v
    return out


FIDELITY = [("thr", "throughput"), ("good", "goodput"), ("p90_ttft", "p90 TTFT")]


def fidelity(specs, bound=0.10):
    """Simulator against real, each metric: within `bound` per replay, on the
    means over rounds, and the real replays' spread (max / min - 1)."""
    real = [load_round(s) for s in specs]
    sim = [load_round(s, "sim") for s in specs]
    keys = sorted({k for r in real for k in r if any(k in x for x in sim)})
    if not keys:
        return
    print("### Simulator against real, %d rounds (within %.0f%%)\n" % (len(specs), 100 * bound))
    print("| policy | load | " + " | ".join("%s: sim / real mean (diff); real spread" % n
                                           for _, n in FIDELITY) + " |")
    print("|---|---|" + "---|" * len(FIDELITY))
    per_pair, on_means, spread_over = [0] * 3, [0] * 3, [0] * 3
    n_pairs = 0
    for k in keys:
        pairs = [(s[k], r[k]) for s, r in zip(sim, real) if k in s and k in r]
        n_pairs += len(pairs)
        cells = []
        for i, (m, _) in enumerate(FIDELITY):
            per_pair[i] += sum(abs(a[m] / b[m] - 1) <= bound for a, b in pairs if b[m] > 0)
            ms = statistics.mean(a[m] for a, _ in pairs)
            mr = statistics.mean(b[m] for _, b in pairs)
            rs = [b[m] for _, b in pairs]
            spread = max(rs) / min(rs) - 1 if min(rs) > 0 else 0
            d = ms / mr - 1 if mr > 0 else 0
            on_means[i] += abs(d) <= bound
            spread_over[i] += spread > bound
            cells.append("%.4g / %.4g (%+.1f%%); %.1f%%" % (ms, mr, 100 * d, 100 * spread))
        print("| %s | %gx | %s |" % (k[0], k[1], " | ".join(cells)))
    print()
    for i, (_, n) in enumerate(FIDELITY):
        print("- %s: within %.0f%% in %d of %d replays, on the means in %d of %d; the real "
              "replays' own spread over %.0f%% in %d of %d" %
              (n, 100 * bound, per_pair[i], n_pairs, on_means[i], len(keys), 100 * bound,
               spread_over[i], len(keys)))
    print()


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
    fidelity(specs)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1:])

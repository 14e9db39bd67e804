#!/usr/bin/env python3
"""The decode steps of a real replay against the admission cost model's decode term.

The workers log one `event=step` line per engine step at debug level
(TANDEM_LOG_LEVEL=debug; docs/workers.md). This reads the decode and prefill
workers' logs of one replay (or a CSV written from them with --save), takes
every decode step's cycle (its start to the next step's start, skipping the
idle gaps), and sets it against

    (decode_step_us_fixed + decode_step_us_per_seq x items
     + decode_step_us_per_ctx_token x ctx_tokens) x (1 + decode_extra_when_prefilling x overlap)

for each cost file given (overlap: the share of the step during which the
prefill worker was in a step), by summed context. A ratio over 1: the
replay's steps ran slower than the cost model (and so the simulator) charges.

    python3 bench/step_fit.py --logs RUN_DIR [--save steps.csv.gz] cost.txt ...
    python3 bench/step_fit.py --steps steps.csv.gz cost.txt ...
"""
import argparse
import bisect
import csv
import glob
import gzip
import os
import statistics
import sys

FIELDS = ("start_us", "items", "prefill_tokens", "decode_tokens", "ctx_tokens", "forward_us",
          "step_us")
BINS = (0, 2000, 5000, 10000, 20000, 50000, 10 ** 9)


def read_log(path):
    steps = []
    with open(path) as f:
        for line in f:
            if " event=step " not in line:
                continue
            kv = dict(x.split("=", 1) for x in line.split() if "=" in x)
            steps.append({k: int(kv[k]) for k in FIELDS})
    return steps


def one_log(run_dir, role):
    paths = glob.glob(os.path.join(run_dir, role + "-*.log"))
    if len(paths) != 1:  # the cycles and overlaps are one decode and one prefill worker's
        sys.exit("step_fit: %d %s-*.log in %s, want one (a cluster of 1 prefill + 1 decode)"
                 % (len(paths), role, run_dir))
    return read_log(paths[0])


def save(path, decode, prefill):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(("role",) + FIELDS)
        for role, steps in (("decode", decode), ("prefill", prefill)):
            for s in steps:
                w.writerow((role,) + tuple(s[k] for k in FIELDS))


def load(path):
    out = {"decode": [], "prefill": []}
    with gzip.open(path, "rt", newline="") as f:
        for r in csv.DictReader(f):
            out[r["role"]].append({k: int(r[k]) for k in FIELDS})
    return out["decode"], out["prefill"]


def decode_cycles(decode, prefill):
    """(items, ctx_tokens, cycle_us, prefill overlap share) per decode-only step followed by
    another step without an idle gap."""
    spans = sorted((p["start_us"], p["start_us"] + p["step_us"]) for p in prefill)
    starts = [a for a, _ in spans]

    def overlap(a, b):
        i, tot = bisect.bisect_right(starts, b) - 1, 0
        while i >= 0 and spans[i][1] > a:
            tot += min(b, spans[i][1]) - max(a, spans[i][0])
            i -= 1
        return tot / (b - a) if b > a else 0.0

    rows = []
    for d, nxt in zip(decode, decode[1:]):
        if d["prefill_tokens"] or not d["decode_tokens"]:
            continue
        cycle = nxt["start_us"] - d["start_us"]
        if cycle > 3 * d["step_us"] + 2000:  # the engine waited for work: not a step's cost
            continue
        rows.append((d["items"], d["ctx_tokens"], cycle,
                     overlap(d["start_us"], d["start_us"] + d["step_us"])))
    return rows


def read_cost(path):
    cost = {}
    with open(path) as f:
        for line in f:
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                cost[k.strip()] = float(v)
    return cost


def predict(c, items, ctx, ov):
    return ((c["decode_step_us_fixed"] + c["decode_step_us_per_seq"] * items
             + c["decode_step_us_per_ctx_token"] * ctx)
            * (1 + c.get("decode_extra_when_prefilling", 0.0) * ov))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--logs", help="a replay's cluster run directory (decode-*.log, prefill-*.log)")
    src.add_argument("--steps", help="a CSV written by --save")
    ap.add_argument("--save", help="write the step lines here (gzipped CSV)")
    ap.add_argument("cost", nargs="+", help="cost-model files to set the steps against")
    a = ap.parse_args(argv)
    if a.logs:
        decode, prefill = one_log(a.logs, "decode"), one_log(a.logs, "prefill")
    else:
        decode, prefill = load(a.steps)
    if a.save:
        save(a.save, decode, prefill)
    rows = decode_cycles(decode, prefill)
    if not rows:
        sys.exit("step_fit: no decode steps")
    print("%d decode steps (%d timed), %d prefill steps; mean items %.1f, mean prefill overlap %.2f"
          % (len(decode), len(rows), len(prefill), statistics.mean(r[0] for r in rows),
             statistics.mean(r[3] for r in rows)))
    heads = ["summed context %d-%d" % (lo, hi) if hi < BINS[-1] else "%d-" % lo
             for lo, hi in zip(BINS, BINS[1:])]
    print("cost file | fixed, per seq, per ctx | all steps | " + " | ".join(heads))
    for path in a.cost:
        c = read_cost(path)
        cells = []
        for lo, hi in zip(BINS, BINS[1:]):
            q = [r for r in rows if lo <= r[1] < hi]
            cells.append("%.3f (%d)" % (statistics.median(r[2] / predict(c, *r[:2], r[3])
                                                          for r in q), len(q)) if q else "-")
        total = sum(r[2] for r in rows) / sum(predict(c, r[0], r[1], r[3]) for r in rows)
        print("%s | %.0f, %.1f, %.3f | %.3f | %s"
              % (path, c["decode_step_us_fixed"], c["decode_step_us_per_seq"],
                 c["decode_step_us_per_ctx_token"], total, " | ".join(cells)))
    print("(each cell: the median of cycle / predicted over the bin's steps, and their number; "
          "'all steps': summed cycles / summed predictions)")


if __name__ == "__main__":
    main(sys.argv[1:])

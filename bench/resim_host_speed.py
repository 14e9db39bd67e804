#!/usr/bin/env python3
"""Re-simulates every replay of an admission experiment with a two-speed host
and compares the simulator, over several seeds, with the real replays.

  bench/resim_host_speed.py SHARE FACTOR MEAN_US [--dir DIR] [--seeds N]
  bench/resim_host_speed.py profile [--dir DIR] [--seeds N]

("profile": each replay's cost model as it is, with the host keys its
profile measured.)

For each `tandem-sim run` command in DIR/results.md (bench/admission_experiment.py
writes them; DIR defaults to docs/results/admission) it runs the same command
with the replay's cost model, its host_slow_* keys replaced by
host_slow_share SHARE, host_slow_factor FACTOR and host_slow_mean_us MEAN_US, once per seed 1..N (10), and prints the
median's difference from the real replay (throughput, goodput, p90 TTFT) and
whether the real goodput lies within the seeds' range. Standard library only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def resimulate(cmds, from_profile, host, n_seeds, root, tmp):
    """Per replay: (name, throughput, goodput and p90 TTFT differences in %, the seeds'
    lowest and highest goodput, the real goodput)."""
    cost_tmp, out_tmp = os.path.join(tmp, "cost.txt"), os.path.join(tmp, "out")
    rows = []
    for c in cmds:
        argv_sim = c.split()
        name = os.path.basename(argv_sim[argv_sim.index("--out") + 1])[4:]
        cost = argv_sim[argv_sim.index("--cost") + 1]
        with open(cost) as f:
            lines = f.readlines()
        if not from_profile:  # the given host keys replace the profile's
            lines = [x for x in lines if not x.lstrip().startswith("host_slow_")]
            lines.append("host_slow_share = %r\nhost_slow_factor = %r\nhost_slow_mean_us = %r\n"
                         % host)
        with open(cost_tmp, "w") as f:
            f.writelines(lines)
        argv_sim[argv_sim.index("--cost") + 1] = cost_tmp
        argv_sim[argv_sim.index("--out") + 1] = out_tmp
        g, p90, thr = [], [], []
        for seed in range(1, n_seeds + 1):
            r = subprocess.run(argv_sim + ["--seed", str(seed)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit("%s: tandem-sim failed: %s" % (name, r.stderr.strip()[-500:]))
            with open(os.path.join(out_tmp, "summary.json")) as f:
                s = json.load(f)
            g.append(s["goodput"]["req_per_s"])
            p90.append(s["ttft_ms"]["p90"])
            thr.append(s["throughput"]["req_per_s"])
        with open(os.path.join(root, name, "summary.json")) as f:
            r = json.load(f)

        def diff(a, b):
            return 100 * (a - b) / b
        rows.append((name, diff(statistics.median(thr), r["throughput"]["req_per_s"]),
                     diff(statistics.median(g), r["goodput"]["req_per_s"]),
                     diff(statistics.median(p90), r["ttft_ms"]["p90"]), min(g), max(g),
                     r["goodput"]["req_per_s"]))
    return rows


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("host", nargs="+", metavar="SHARE FACTOR MEAN_US | profile")
    ap.add_argument("--dir", default="docs/results/admission")
    ap.add_argument("--seeds", type=int, default=10)
    a = ap.parse_args(argv)
    from_profile = a.host == ["profile"]
    if not from_profile and len(a.host) != 3:
        ap.error("give SHARE FACTOR MEAN_US, or profile")
    share, factor, mean_us = ((float("nan"),) * 3 if from_profile
                              else (float(x) for x in a.host))
    root, n_seeds = a.dir, a.seeds
    cmds = [line for line in open(os.path.join(root, "results.md"))
            if line.startswith("build/bin/tandem-sim run")]
    with tempfile.TemporaryDirectory(prefix="resim-") as tmp:
        rows = resimulate(cmds, from_profile, (share, factor, mean_us), n_seeds, root, tmp)
    ok = [sum(abs(x[i]) <= 10 for x in rows) for i in (1, 2, 3)]
    print("host slow %g of the time, %gx, stretches of %g us (nan: each replay's profile); "
          "median of %d seeds within 10%%: "
          "throughput %d/%d, goodput %d/%d, p90 TTFT %d/%d; real goodput within the seeds' "
          "range in %d/%d" % (share, factor, mean_us, n_seeds, ok[0], len(rows), ok[1], len(rows),
                              ok[2], len(rows), sum(x[4] <= x[6] <= x[5] for x in rows),
                              len(rows)))
    for x in rows:
        print("   %-22s throughput %+6.1f%%  goodput %+6.1f%%  p90 TTFT %+6.1f%%  seeds' goodput "
              "%.2f-%.2f, real %.2f" % x)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

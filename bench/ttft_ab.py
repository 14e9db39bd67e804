#!/usr/bin/env python3
"""Two builds of the local cluster, side by side: the time to first token of
single prompts on an idle cluster (1 prefill + 1 decode worker), as a client
sees it, at each of a list of prompt lengths.

  bench/ttft_ab.py --a-bin DIR --b-bin DIR --model M [--prompts 512,2048,4000]
      [--reps 3] [--rounds 3] [--work DIR] [--json FILE] [--http H:P] [--grpc H:P]

Each round starts a fresh cluster of each build in turn (A then B, B then A
in the next round, so neither always runs first on a machine whose load
moves), warms it with three short requests, then sends --reps prompts of each
length one at a time (random ids, so no prefix-cache hit), max_tokens 1. The
TTFT is bench/profile_cost.py's client-side one: send to the end of the
non-streamed response, less the router's time from the first token to the
end. Prints each run's figures and, per length, both builds' medians
(min-max) and their ratio. Standard library only.
"""
import argparse
import json
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The client and its timing split; the clusters as capacity_ab starts them.
import capacity_ab  # noqa: E402
import profile_cost  # noqa: E402


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a-bin", required=True, help="build A's binaries (tandem-cluster --bin-dir)")
    ap.add_argument("--b-bin", required=True, help="build B's binaries")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", default="512,2048,4000", help="prompt lengths, tokens")
    ap.add_argument("--reps", type=int, default=3, help="requests per length and run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn below this")
    ap.add_argument("--work", default="build/ttft_ab", help="the clusters' run directories")
    ap.add_argument("--json", help="write every TTFT here")
    ap.add_argument("--http", default="127.0.0.1:18300", help="the router's HTTP listen address")
    ap.add_argument("--grpc", default="127.0.0.1:18351", help="the router's gRPC listen address")
    a = ap.parse_args(argv)
    lengths = [int(x) for x in a.prompts.split(",")]
    bins = {"A": a.a_bin, "B": a.b_bin}
    res = {k: {p: [] for p in lengths} for k in bins}
    rng = random.Random(7)

    def prompt(n):
        return [rng.randrange(3, a.vocab) for _ in range(n)]

    for rnd in range(a.rounds):
        for k in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
            run_dir = os.path.join(a.work, "%s%d" % (k, rnd))
            capacity_ab.cluster_up(run_dir, bins[k], a.model, a.http, a.grpc)
            try:
                cli = profile_cost.Client("http://" + a.http)
                model = cli.request("GET", "/v1/models")[1]["data"][0]["id"]
                for _ in range(3):
                    profile_cost.complete(cli, model, prompt(16), 2)
                for p in lengths:
                    for _ in range(a.reps):
                        r = profile_cost.complete(cli, model, prompt(p), 1, "ttft p=%d" % p)
                        res[k][p].append(r["ttft_client_us"] / 1e3)
                cli.close()
            finally:
                capacity_ab.cluster_down(run_dir)
            print("%s round %d: %s" % (k, rnd + 1, "; ".join(
                "%d tokens %s ms" % (p, " ".join("%.0f" % x for x in res[k][p][-a.reps:]))
                for p in lengths)), flush=True)
    print("\nTTFT on an idle cluster, medians (min-max) over %d rounds x %d requests:" %
          (a.rounds, a.reps))
    for p in lengths:
        ma, mb = statistics.median(res["A"][p]), statistics.median(res["B"][p])
        print("  %5d tokens: A %.0f ms (%.0f-%.0f), B %.0f ms (%.0f-%.0f), A / B %.2f" %
              (p, ma, min(res["A"][p]), max(res["A"][p]), mb, min(res["B"][p]),
               max(res["B"][p]), ma / mb if mb > 0 else 0))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"a_bin": a.a_bin, "b_bin": a.b_bin, "model": a.model,
                       "ttft_ms": {k: {str(p): v for p, v in r.items()} for k, r in res.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

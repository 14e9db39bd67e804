#!/usr/bin/env python3
"""Is the host's speed steady? Sends the same work to a running cluster over
and over and prints each request's prefill time in order.

  bench/host_speed.py --url http://127.0.0.1:18300 [--prompt 224] [--n 40] [--rounds 3]

Every request is a prefill of --prompt random token ids (new ids each time, so
the prefix cache never helps) with max_tokens 1, one after another; its time
is the prefill worker's, arrival to last layer (timings.prefill_queue_us +
prefill_us, as bench/profile_cost.py measures it). On a host of its own the
series is flat within a few percent. A host whose cores are shared with
other machines shows steps: runs of requests at one speed, then at another.
Per round the script prints the series in ms, its minimum, and the share of
requests more than --slow-x times the minimum. Standard library only.
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_cost import Client, complete  # noqa: E402


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="served model name (default: the first listed)")
    ap.add_argument("--prompt", type=int, default=224, help="prompt tokens")
    ap.add_argument("--vocab", type=int, default=32000, help="token ids below this")
    ap.add_argument("--n", type=int, default=40, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slow-x", type=float, default=1.3)
    a = ap.parse_args(argv)
    cli = Client(a.url)
    model = a.model
    if not model:
        status, js, _ = cli.request("GET", "/v1/models")
        model = js["data"][0]["id"]
    rng = random.Random(time.time_ns())
    lo_id = min(300, a.vocab // 2)
    for rnd in range(a.rounds):
        ms = []
        t0 = time.perf_counter()
        for _ in range(a.n):
            prompt = [rng.randrange(lo_id, a.vocab) for _ in range(a.prompt)]
            ms.append(complete(cli, model, prompt, 1)["compute_us"] / 1000)
        lo = min(ms)
        slow = sum(m > a.slow_x * lo for m in ms)
        print("round %d (%.1f s): %s" % (rnd + 1, time.perf_counter() - t0,
                                          " ".join("%.0f" % m for m in ms)))
        print("  min %.1f ms, median %.1f, max %.1f; %d of %d above %.1fx the min "
              "(their median %.1fx)" %
              (lo, statistics.median(ms), max(ms), slow, len(ms), a.slow_x,
               statistics.median([m / lo for m in ms if m > a.slow_x * lo]) if slow else 0))
    cli.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""The decode worker's step as streaming clients see it: N clients each keep
one streamed completion open (a prompt of --prompt-tokens random token ids,
--max-tokens tokens with ignore_eos, then the next request), for --seconds;
prints the median and mean gap between consecutive chunks over all streams.
With N streams the decode batch holds about N sequences, so the median gap
is the batched step plus what the stream adds per token.

Usage:
  bench/stream_gaps.py --url http://127.0.0.1:8000 --streams 1,8,16,32 [--seconds 12]
                       [--temperature T] [--top-p P] [--top-k K]

The clients are Python threads on the same host: at 32 streams they take a
share of a small host's CPU themselves, so compare builds with the same
script at the same moments (alternating), not against other tools' figures.
Standard library only.
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse

from profile_cost import stream_chunks


def one_stream(url, model, seed, args, stop_at, gaps, lock):
    rnd = random.Random(seed)
    while time.time() < stop_at:
        prompt = [rnd.randrange(3, args.vocab) for _ in range(args.prompt_tokens)]
        _, chunks = stream_chunks(url, model, prompt, args.max_tokens, args.sampling)
        with lock:
            gaps.extend((b - a) / 1e6 for a, b in zip(chunks, chunks[1:]))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--streams", default="1,8,16,32", help="comma-separated stream counts")
    ap.add_argument("--seconds", type=float, default=12.0, help="per stream count")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this")
    ap.add_argument("--temperature", type=float, help="sampling temperature (server default: 1)")
    ap.add_argument("--top-p", type=float, help="nucleus sampling mass")
    ap.add_argument("--top-k", type=int, help="keep the K likeliest tokens")
    a = ap.parse_args(argv)
    a.sampling = {k: v for k, v in (("temperature", a.temperature), ("top_p", a.top_p),
                                    ("top_k", a.top_k)) if v is not None}
    u = urllib.parse.urlparse(a.url)
    host, port = u.hostname, u.port or 80
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/v1/models")
    model = json.loads(conn.getresponse().read())["data"][0]["id"]
    conn.close()
    for n in [int(x) for x in a.streams.split(",")]:
        gaps, lock = [], threading.Lock()
        stop_at = time.time() + a.seconds
        ts = [threading.Thread(target=one_stream, args=(a.url, model, k, a, stop_at, gaps, lock))
              for k in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if not gaps:
            print("streams %d: no chunk gaps measured" % n)
            continue
        with open("/proc/loadavg") as f:
            load = f.read().split()[0]
        print("streams %3d: %6d gaps, median %.2f ms, mean %.2f ms (load %s)" %
              (n, len(gaps), 1000 * statistics.median(gaps), 1000 * statistics.fmean(gaps), load),
              flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

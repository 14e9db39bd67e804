#!/usr/bin/env python3
"""Profile a running Tandem cluster through its OpenAI-compatible API and fit
the admission cost model (router/admission/adm.h, adm_cost) that the router's
--cost-model and tandem-sim's --cost read.

Usage:
  bench/profile_cost.py --url http://127.0.0.1:8000 [--model-context N]
                        --out cost.txt [--json profile.json] [--reps 5]

Every request asks for the router's per-request timings
(`"tandem": {"timings": true}`, docs/router.md) and sends its prompt as
token ids (random ids, so no two prompts share a prefix block and the prefix
cache never helps). Measured, one after another on an otherwise idle
cluster:

  1. Prefill: single requests, max_tokens 2, prompt lengths from 8 tokens to
     most of the context (2, not 1: a request that goes on decoding has its
     first token sent while the decode worker starts its next step, and on a
     host with few cores that step delays the send, about 1.5-2 ms on the
     2-core host; a request of one token ends at the join and does not show
     it). The prefill worker's time from the request's arrival
     to its last layer (timings.prefill_queue_us + timings.prefill_us: the
     worker stamps the start after the first layer, and with one request at a
     time nothing queues) against prompt tokens:
         compute_us = prefill_us_fixed + prefill_us_per_token x p
                      + prefill_us_per_token_ctx x p (p + 1) / 2
     (the last term is attention: token i of the prompt attends over i + 1
     positions; the matmuls are linear in p)
  2. Transfer and hand-off: what remains of the router's first_token_us once
     the router queue, tokenization and the prefill worker's time are taken
     out (the KV transfer's tail after the last layer, the hand-off to the
     decode worker, the RPC hops), against the prompt's KV blocks. timings.transfer_us is reported too, but it runs from the first
     block sent and overlaps the compute layer by layer, so it is not what a
     request waits for after its prefill. The simulator charges transfer
     after the prefill's last step, so the residual is what it needs:
         residual_us = transfer_us_fixed + transfer_us_per_block x blocks
     (the fixed part is what even a one-block prompt pays: on the 2-core host
     about 1.0 ms, against 1.0-1.3 ms for the whole hand-off of 1 to 16 blocks)
  3. Decode: b concurrent streamed requests (ignore_eos, a fixed max_tokens)
     with prompts of p tokens; each request's (last chunk - first chunk) /
     (tokens - 1) on the client's clock is its mean step time, as the load
     tester's TPOT counts it: the step as the client receives it, so what
     the stream adds per token (the decode worker's loop around the forward,
     the hops to the client) is in the model the simulator times steps with.
     It runs in a batch of about b sequences whose summed context is about
     b x (p + tokens / 2). The requests do not all decode at once (their
     prefills are serialized), so b is measured per request: 1 plus the
     overlap of the other requests' decode intervals with its own:
         step_us = decode_step_us_fixed + decode_step_us_per_seq x b
                   + decode_step_us_per_ctx_token x b x (p + tokens / 2)
     (A llama2.c checkpoint stops at BOS even with ignore_eos, so the tokens
     actually generated are used, not max_tokens.)
  4. Co-location: workers that share a host's cores slow each other. b
     streamed requests decode alone (--colo-batch, long outputs after
     prompts of --colo-decode-prompt tokens), then again while another
     client sends prefill-only requests (max_tokens 1, a prompt of
     --colo-prompt tokens: by default 128, or half the context when that
     is less) back to back; the two alternate, --colo-rounds times each. The
     mean chunk gap over the stretch where all b stream, with the prefills
     against without, less 1, is decode_extra_when_prefilling; those
     prefills' worker time (as in step 1) against the same prompt length's
     alone in step 1, less 1, is prefill_extra_when_decoding (both at least
     0; about 0 for workers on hosts of their own).
  5. Unloaded latencies as the client sees them (step 1's requests: send to
     the end of the non-streamed response, less the router's time from the
     first token to the end, for TTFT; a streamed request's
     chunk gaps for TPOT, as tandem-loadtest measures it), printed with the
     SLOs derived from them (--ttft-x times the TTFT of the longest prompt,
     or of --slo-prompt's; --tpot-x times the streamed TPOT at batch 1 after
     --slo-tpot-prompt's prompt (16 tokens by default), but at least
     --tpot-floor-ms). A trace replayed at its real lengths gives the
     longest prompt it sends and the longest context its requests decode at
     (prompt + half the output), so that each of its requests meets both
     bounds on an idle cluster.
  6. The host's two speeds: --steady-n prefills of
     128 tokens (or half the context) back to back. The fastest fifth's
     bound is the fast speed; a prefill over --slow-x times it is slow.
     host_slow_share = the slow prefills' share of the time, host_slow_factor
     = their median over the fast one, host_slow_mean_us = their time over
     the number of slow runs (0, 0, 0 when none is slow, or all are). The
     simulator draws slow stretches from these (docs/simulator.md); the
     router's policies do not use them.

The prefill fit is to each prompt length's median. The prefill and decode
fits minimize the relative error (a short prompt's
or a small batch's time weighs as much as the longest's). Negative fitted
coefficients are clamped to 0 (the file accepts only numbers >= 0), and the
fit is redone without that term.
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

# Requests carry no temperature, so the workers sample at the API's default
# (temperature 1), as tandem-loadtest's requests do: a greedy profile would
# leave out the softmax and draw over the whole vocabulary that every
# replayed token costs (about a third of a 15m model's decode step).
KEYS = ("prefill_us_fixed", "prefill_us_per_token", "prefill_us_per_token_ctx",
        "decode_step_us_fixed",
        "decode_step_us_per_seq", "decode_step_us_per_ctx_token", "transfer_us_per_block",
        "transfer_us_fixed",
        "prefill_extra_when_decoding", "decode_extra_when_prefilling",
        "host_slow_share", "host_slow_factor", "host_slow_mean_us")


class Client:
    """One keep-alive HTTP connection to the router."""

    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.conn = None

    def request(self, method, path, body=None):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            try:
                data = json.dumps(body).encode() if body is not None else None
                hdr = {"Content-Type": "application/json"} if data else {}
                t0 = time.perf_counter()
                self.conn.request(method, path, body=data, headers=hdr)
                r = self.conn.getresponse()
                raw = r.read()
                dt = time.perf_counter() - t0
                return r.status, json.loads(raw) if raw else None, dt
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def close(self):
        if self.conn:
            self.conn.close()


def complete(cli, model, prompt, max_tokens, rng_tag=""):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": False, "tandem": {"timings": True}}
    status, js, dt = cli.request("POST", "/v1/completions", body)
    if status != 200:
        raise RuntimeError("%s: HTTP %d %s" % (rng_tag, status, json.dumps(js)[:300]))
    t = js["tandem"]["timings"]
    r = {"client_us": dt * 1e6, "completion_tokens": js["usage"]["completion_tokens"],
         "prompt_tokens": js["usage"]["prompt_tokens"], **t}
    # The prefill worker's time for the request: it stamps the compute's start
    # after the first layer, so the first layer is in prefill_queue_us.
    r["compute_us"] = t["prefill_queue_us"] + t["prefill_us"]
    # The client's TTFT: send to the end of the response, less the router's
    # time from the first token to the end.
    r["ttft_client_us"] = r["client_us"] - (t["e2e_us"] - t["first_token_us"])
    return r


def stream_times(url, model, prompt, max_tokens):
    """One streamed request: (send, first chunk, last chunk) on the client's clock, in us, and
    the tokens received (the load tester's view of a request's TTFT and TPOT)."""
    t0, chunks = stream_chunks(url, model, prompt, max_tokens)
    return t0, chunks[0], chunks[-1], len(chunks)


def stream_chunks(url, model, prompt, max_tokens, sampling=None):
    """One streamed request: its send time and every token chunk's arrival on the client's
    clock, in us. sampling: extra body fields (temperature, top_p, ...)."""
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, **(sampling or {})}
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=json.dumps(body).encode(),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError("stream: HTTP %d" % r.status)
    chunks = []
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: {"):
            ev = json.loads(line[6:])
            if ev.get("choices"):
                chunks.append(time.perf_counter() * 1e6)
        elif line.startswith(b"data: [DONE]"):
            break
    c.close()
    if not chunks:
        raise RuntimeError("stream: no tokens")
    return t0 * 1e6, chunks


def stream_tpot(url, model, prompt, max_tokens):
    """Client-side TPOT of one streamed request: (last - first chunk) / (chunks - 1), ms, every
    chunk counted as the load tester counts them (a token that decodes to no text is still a
    chunk)."""
    _, first, last, n = stream_times(url, model, prompt, max_tokens)
    return (last - first) / 1000 / (n - 1) if n >= 2 else 0.0


def lstsq(rows, ys):
    """Least squares for ys ~ rows @ x by the normal equations (tiny systems)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in range(n)]
    for c in range(n):  # Gauss-Jordan with partial pivoting
        p = max(range(c, n), key=lambda k: abs(a[k][c]))
        a[c], a[p], b[c], b[p] = a[p], a[c], b[p], b[c]
        if abs(a[c][c]) < 1e-12:
            raise ValueError("singular fit")
        for k in range(n):
            if k != c:
                f = a[k][c] / a[c][c]
                a[k] = [x - f * y for x, y in zip(a[k], a[c])]
                b[k] -= f * b[c]
    return [b[i] / a[i][i] for i in range(n)]


def fit_nonneg(rows, ys, relative=False):
    """lstsq, dropping any term whose coefficient comes out negative (set to 0). relative:
    minimize the relative error (each row and y divided by y), so the small batches and short
    prompts, whose times are a few percent of the largest, weigh as much as the large ones."""
    if relative:
        rows = [[v / y for v in r] for r, y in zip(rows, ys) if y > 0]
        ys = [1.0 for y in ys if y > 0]
    active = list(range(len(rows[0])))
    while True:
        x = lstsq([[r[i] for i in active] for r in rows], ys)
        neg = [active[k] for k, v in enumerate(x) if v < 0]
        if not neg:
            full = [0.0] * len(rows[0])
            for k, i in enumerate(active):
                full[i] = x[k]
            return full
        active.remove(neg[0])
        if not active:
            return [0.0] * len(rows[0])


def r2(rows, ys, x):
    pred = [sum(a * b for a, b in zip(r, x)) for r in rows]
    mean = sum(ys) / len(ys)
    ss = sum((y - mean) ** 2 for y in ys)
    return 1 - sum((y - p) ** 2 for y, p in zip(ys, pred)) / ss if ss > 0 else 1.0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model-context", type=int, default=0,
                    help="the model's context; 0: the router's max_model_len")
    ap.add_argument("--out", required=True, help="cost-model file (adm_cost_save's format)")
    ap.add_argument("--json", help="also write every measurement and fit here")
    ap.add_argument("--reps", type=int, default=5, help="requests per prompt length")
    ap.add_argument("--batches", default="1,2,4,8,16,32,48", help="decode batch sizes")
    ap.add_argument("--decode-tokens", type=int, default=256, help="max_tokens of decode runs")
    ap.add_argument("--colo-batch", type=int, default=8,
                    help="co-location: sequences decoding while prefills run")
    ap.add_argument("--colo-rounds", type=int, default=3,
                    help="co-location: rounds of decode alone and beside prefills")
    ap.add_argument("--colo-prompt", type=int, default=0,
                    help="co-location: the prefills' prompt length (also profiled alone); 0: 128, "
                    "or half the context when that is less. Give a trace's typical prompt: two "
                    "workers on one host contend for memory more with long prompts and contexts")
    ap.add_argument("--colo-decode-prompt", type=int, default=16,
                    help="co-location: the decoding sequences' prompt length (capped to leave "
                    "room for their tokens)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    ap.add_argument("--steady-n", type=int, default=300,
                    help="back-to-back prefills that measure the host's slow stretches (0: skip)")
    ap.add_argument("--slow-x", type=float, default=1.3,
                    help="a prefill this many times the fast one counts as slow")
    ap.add_argument("--vocab", type=int, default=512, help="prompt ids are drawn below this")
    ap.add_argument("--seed", type=int, default=0,
                    help="prompt ids seed; 0: from the clock (a rerun must not hit the prefix cache)")
    ap.add_argument("--ttft-x", type=float, default=5.0, help="TTFT SLO = this x unloaded")
    ap.add_argument("--tpot-x", type=float, default=3.0, help="TPOT SLO = this x unloaded")
    ap.add_argument("--slo-prompt", type=int, default=0,
                    help="the TTFT SLO is --ttft-x times the unloaded TTFT of a prompt this long "
                    "(also profiled); 0: the longest profiled prompt")
    ap.add_argument("--slo-tpot-prompt", type=int, default=16,
                    help="the TPOT SLO is --tpot-x times the unloaded streamed TPOT at batch 1 "
                    "after a prompt this long (a trace's longest request decodes at the longest "
                    "context: give its prompt + half its output)")
    ap.add_argument("--decode-prompts", default="auto",
                    help="prompt lengths of the decode runs (each capped to leave room for "
                    "--decode-tokens); auto: 16, a quarter and five eighths of the context. "
                    "The longest sets the per-context cost: a fit to short contexts only, "
                    "whose KV stays in the cache, runs 10%% under the steps of a replay at "
                    "long ones (docs/admission.md, the profiler)")
    ap.add_argument("--tpot-floor-ms", type=float, default=1.0,
                    help="TPOT SLO at least this: a client on a shared 2-core host does not "
                    "time sub-millisecond token gaps reliably (docs/loadtest.md: p99 timer "
                    "lateness 0.7-16 ms)")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed or time.time_ns())

    cli = Client(a.url)
    st, models, _ = cli.request("GET", "/v1/models")
    if st != 200:
        sys.exit("profile: GET /v1/models: HTTP %d" % st)
    m0 = models["data"][0]
    model = m0["id"]
    ctx = a.model_context or int(m0.get("max_model_len", 0))
    if ctx < 32:
        sys.exit("profile: give --model-context (the router reports %d)" % ctx)

    def prompt(n):
        # The first id differs per request (random), so prefix blocks never match.
        return [rng.randrange(3, a.vocab) for _ in range(n)]

    for _ in range(5):  # warm the connections and both workers
        complete(cli, model, prompt(16), 2)

    # 1 + 2: prefill and transfer, single requests.
    top = ctx - 8
    slo_p = min(a.slo_prompt, top) if a.slo_prompt > 0 else top
    colo_p = min(a.colo_prompt, top) if a.colo_prompt > 0 else min(128, ctx // 2)
    lengths = sorted({x for x in (8, 16, 32, 64, 128, 192, 256) if x < top} |
                     {top // 2 + top // 4, top, slo_p, colo_p})
    pre = []
    for rep in range(a.reps):
        for p in lengths:
            r = complete(cli, model, prompt(p), 2, "prefill p=%d" % p)
            r["p"] = p
            r["blocks"] = -(-(p + 0) // a.block_size)
            r["residual_us"] = (r["first_token_us"] - r["queue_us"] - r["tokenize_us"]
                                - r["prefill_queue_us"] - r["prefill_us"])
            pre.append(r)
    med = {}
    for p in lengths:
        rs = [r for r in pre if r["p"] == p]
        med[p] = {k: statistics.median(r[k] for r in rs)
                  for k in ("compute_us", "transfer_us", "residual_us", "first_token_us",
                            "client_us", "ttft_client_us", "prefill_queue_us", "blocks")}
    # Fitted to each length's median: on a shared host one slow request in a
    # length's few must not tilt the line.
    rows = [[1.0, float(p), p * (p + 1) / 2.0] for p in lengths]
    pf = fit_nonneg(rows, [med[p]["compute_us"] for p in lengths], relative=True)
    pf_r2 = r2(rows, [med[p]["compute_us"] for p in lengths], pf)
    xf = fit_nonneg([[1.0, float(r["blocks"])] for r in pre], [r["residual_us"] for r in pre])
    tf = lstsq([[1.0, float(r["blocks"])] for r in pre], [r["transfer_us"] for r in pre])

    # 3: decode steps vs batch and context. The b requests do not all decode
    # at once (their prefills run one after another), so each request's batch
    # is measured, not assumed: its decode interval is [send + first_token_us,
    # send + e2e_us] on the client's clock, and its batch is 1 plus the time
    # the other requests' intervals overlap it, over its length.
    batches = [int(x) for x in a.batches.split(",")]
    # Room for the generated tokens: at most half the context (a 256-token
    # model decodes 128 after prompts of 16 to 112 tokens).
    a.decode_tokens = min(a.decode_tokens, ctx // 2)
    dec = []
    wanted = ([16, ctx // 4, ctx * 5 // 8] if a.decode_prompts == "auto"
              else [int(x) for x in a.decode_prompts.split(",")])
    ctx_prompts = sorted({max(16, min(x, ctx - a.decode_tokens - 8)) for x in wanted})
    for p in ctx_prompts:
        for b in batches:
            res = [None] * b
            errs = []

            def one(i):
                try:
                    res[i] = stream_times(a.url, model, prompt(p), a.decode_tokens)
                except Exception as e:  # noqa: BLE001 - reported below
                    errs.append(str(e))

            th = [threading.Thread(target=one, args=(i,)) for i in range(b)]
            for t in th:
                t.start()
            for t in th:
                t.join()
            if errs:
                sys.exit("profile: decode run failed: %s" % errs[0])
            iv = [(f, l, n) for (_, f, l, n) in res]
            for k, (s0, e0, n) in enumerate(iv):
                if n < 2 or e0 <= s0:
                    continue
                ov = sum(max(0.0, min(e0, e1) - max(s0, s1))
                         for j, (s1, e1, _) in enumerate(iv) if j != k)
                beff = 1.0 + ov / (e0 - s0)
                dec.append({"b": b, "p": p, "tokens": n, "step_us": (e0 - s0) / (n - 1),
                            "batch": beff, "sum_ctx": beff * (p + n / 2.0)})
    drows = [[1.0, d["batch"], d["sum_ctx"]] for d in dec]
    df = fit_nonneg(drows, [d["step_us"] for d in dec], relative=True)
    df_r2 = r2(drows, [d["step_us"] for d in dec], df)

    # Streamed, as the load tester sees it: TPOT = (last chunk - first chunk)
    # / (tokens - 1) on the client, batch 1.
    tpot_p = max(1, min(a.slo_tpot_prompt, ctx - a.decode_tokens - 8))
    tpot_stream = []
    for _ in range(a.reps):
        tpot_stream.append(stream_tpot(a.url, model, prompt(tpot_p), a.decode_tokens))

    # 4: co-location, decode alone and beside back-to-back prefills, alternating.
    # colo_p is one of step 1's lengths, so it was timed alone there.
    pre_alone = statistics.median(r["compute_us"] for r in pre if r["p"] == colo_p)
    colo_dp = max(1, min(a.colo_decode_prompt, ctx - 8 - 8))
    colo_tokens = min(a.decode_tokens, ctx - colo_dp - 8)
    colo = {"gap_alone_us": [], "gap_beside_us": [], "prefill_beside_us": []}

    def colo_round(beside):
        res = [None] * a.colo_batch
        errs = []

        def one(i):
            try:
                res[i] = stream_chunks(a.url, model, prompt(colo_dp), colo_tokens)[1]
            except Exception as e:  # noqa: BLE001 - reported below
                errs.append(str(e))

        th = [threading.Thread(target=one, args=(i,)) for i in range(a.colo_batch)]
        for t in th:
            t.start()
        pcli = Client(a.url)
        while beside and any(t.is_alive() for t in th):
            r = complete(pcli, model, prompt(colo_p), 1, "co-location prefill")
            colo["prefill_beside_us"].append(r["compute_us"])
        pcli.close()
        for t in th:
            t.join()
        if errs:
            sys.exit("profile: co-location run failed: %s" % errs[0])
        # The stretch where every stream is past its third chunk and none is in its last three.
        lo, hi = max(c[2] for c in res), min(c[-3] for c in res)
        gaps = [y - x for c in res for x, y in zip(c, c[1:]) if x >= lo and y <= hi]
        if gaps:
            colo["gap_beside_us" if beside else "gap_alone_us"].append(statistics.mean(gaps))

    for _ in range(a.colo_rounds):
        colo_round(False)
        colo_round(True)
    decode_extra = prefill_extra = 0.0
    if colo["gap_alone_us"] and colo["gap_beside_us"]:
        decode_extra = max(0.0, statistics.median(colo["gap_beside_us"]) /
                           statistics.median(colo["gap_alone_us"]) - 1)
    if colo["prefill_beside_us"]:
        prefill_extra = max(0.0, statistics.median(colo["prefill_beside_us"]) / pre_alone - 1)

    # 6: the host's two speeds. The same prefill back to back: on a host of
    # its own every one takes about as long; on a VM whose cores are shared
    # some stretches run slower.
    steady_p = min(128, top // 2)
    steady = [complete(cli, model, prompt(steady_p), 1, "steady")["compute_us"]
              for _ in range(a.steady_n)]
    host = {"share": 0.0, "factor": 0.0, "mean_us": 0.0, "p": steady_p, "times_us": steady}
    if steady:
        fast = sorted(steady)[len(steady) // 5]
        slow = [t > a.slow_x * fast for t in steady]
        runs = sum(1 for i, x in enumerate(slow) if x and (i == 0 or not slow[i - 1]))
        slow_us = sum(t for t, x in zip(steady, slow) if x)
        if runs and runs < len(steady):
            host.update(share=slow_us / sum(steady),
                        factor=statistics.median(t / fast for t, x in zip(steady, slow) if x),
                        mean_us=slow_us / runs)

    # 5: unloaded latencies (client view) and the SLOs.
    ttft_p = {p: med[p]["ttft_client_us"] / 1000 for p in lengths}
    b1 = [d["step_us"] for d in dec if d["b"] == 1]
    step1 = statistics.median(b1) / 1000 if b1 else 0.0
    tpot1 = statistics.median(tpot_stream)

    cost = dict(zip(KEYS, [pf[0], pf[1], pf[2], df[0], df[1], df[2], xf[1], xf[0],
                           prefill_extra, decode_extra, host["share"], host["factor"],
                           host["mean_us"]]))
    with open(a.out, "w") as f:
        f.write("# tandem admission cost model, microseconds (docs/admission.md)\n")
        f.write("# fitted by bench/profile_cost.py from %s, model %s, context %d\n"
                % (a.url, model, ctx))
        for k in KEYS:
            f.write("%s = %.17g\n" % (k, cost[k]))

    print("model %s, context %d, %d prefill requests, %d decode samples" %
          (model, ctx, len(pre), len(dec)))
    print("\nprompt  blocks  compute_us  transfer_us  residual_us  first_token_us  ttft_client_ms")
    for p in lengths:
        m = med[p]
        print("%6d  %6d  %10.0f  %11.0f  %11.0f  %14.0f  %9.2f" %
              (p, m["blocks"], m["compute_us"], m["transfer_us"], m["residual_us"],
               m["first_token_us"], m["ttft_client_us"] / 1000))
    print("\nsent  prompt  measured batch (mean)  tokens(median)  step_us(median)")
    for p in ctx_prompts:
        for b in batches:
            ds = [d for d in dec if d["b"] == b and d["p"] == p]
            if ds:
                print("%4d  %6d  %21.1f  %14.0f  %15.0f" %
                      (b, p, statistics.mean(d["batch"] for d in ds),
                       statistics.median(d["tokens"] for d in ds),
                       statistics.median(d["step_us"] for d in ds)))
    print("\nfit: compute_us = %.1f + %.3f x tokens + %.5f x tokens (tokens + 1) / 2 (R^2 %.3f)"
          % (pf[0], pf[1], pf[2], pf_r2))
    print("fit: residual_us = %.1f + %.1f x blocks; timings.transfer_us = %.1f + %.1f x blocks"
          % (xf[0], xf[1], tf[0], tf[1]))
    print("fit: decode step_us = %.1f + %.1f x batch + %.4f x summed context (R^2 %.3f)" %
          (df[0], df[1], df[2], df_r2))
    print("co-location (%d streams of %d tokens after %d-token prompts, prefills of %d tokens, "
          "%d rounds): decode step %.0f us alone, %.0f us beside prefills (+%.1f%%); "
          "prefill %.0f us alone, %.0f us beside decode (+%.1f%%)" %
          (a.colo_batch, colo_tokens, colo_dp, colo_p, a.colo_rounds,
           statistics.median(colo["gap_alone_us"]) if colo["gap_alone_us"] else 0,
           statistics.median(colo["gap_beside_us"]) if colo["gap_beside_us"] else 0,
           100 * decode_extra, pre_alone,
           statistics.median(colo["prefill_beside_us"]) if colo["prefill_beside_us"] else 0,
           100 * prefill_extra))
    print("host: %d prefills of %d tokens back to back: %.0f%% of the time slow (over %.1fx the "
          "fast one), %.2fx on average there, in stretches of %.0f ms on average" %
          (len(steady), steady_p, 100 * host["share"], a.slow_x, host["factor"],
           host["mean_us"] / 1000))
    mid = lengths[len(lengths) // 2]
    print("\nunloaded (client): TTFT %.2f ms at %d tokens, %.2f ms at %d, %.2f ms at %d; "
          "streamed TPOT %.3f ms at batch 1 after %d prompt tokens (decode step %.3f ms)" %
          (ttft_p[lengths[0]], lengths[0], ttft_p[mid], mid, ttft_p[top], top, tpot1, tpot_p,
           step1))
    slo_ttft = a.ttft_x * ttft_p[slo_p]
    slo_tpot = max(a.tpot_x * tpot1, a.tpot_floor_ms)
    print("SLOs: TTFT <= %.1f ms (%gx the unloaded TTFT of a %d-token prompt), "
          "TPOT <= %.2f ms (%gx the unloaded streamed TPOT at batch 1 after %d prompt tokens "
          "= %.2f ms, at least %g ms)" % (slo_ttft, a.ttft_x, slo_p, slo_tpot, a.tpot_x, tpot_p,
                                          a.tpot_x * tpot1, a.tpot_floor_ms))
    print("wrote %s" % a.out)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"url": a.url, "model": model, "context": ctx, "cost": cost,
                       "fit": {"prefill": pf, "prefill_r2": pf_r2, "residual": xf,
                               "transfer_us": tf,
                               "decode": df, "decode_r2": df_r2,
                               "colocation": colo, "host": host},
                       "unloaded": {"ttft_ms": {str(k): v for k, v in ttft_p.items()},
                                    "tpot_ms_stream": tpot1, "step_ms_batch1": step1},
                       "slo": {"ttft_ms": slo_ttft, "tpot_ms": slo_tpot,
                               "ttft_x": a.ttft_x, "tpot_x": a.tpot_x,
                               "ttft_prompt": slo_p, "tpot_prompt": tpot_p,
                               "tpot_floor_ms": a.tpot_floor_ms},
                       "prefill": pre, "decode": dec}, f, indent=1)
    cli.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Prefill and decode workers as real processes on loopback.

Every generated token is checked against tandem-generate (the single-process
reference path) run on the same prompt with the same sampling parameters.
Cases (each ends with free == total KV blocks on every surviving worker, read
from its metrics endpoint):
  1. 1 prefill + 1 decode (tcp) and 2 + 2 (shm, every pair used): 32
     concurrent requests, prompts of 1 token to most of the context, 1 to 120
     new tokens, greedy, on stories260K (llama2.c and HF, when the shared
     models are present) and on generated tiny, tiny-qwen2, tiny-mistral and
     15m checkpoints;
  2. the same seeded (temperature 0.8, top-p 0.9, a seed per request);
  3. a decode pool with room for a few requests only: all complete, outputs
     unchanged, preemptions counted;
  4. shared-prefix prompts: prefix-cache hits on both sides, outputs unchanged;
  5. failure paths: cancel mid-stream, deadline expiry, prefill SIGKILLed,
     decode SIGKILLed (prefill keeps serving), prefill SIGSTOPped (stall
     detected), mismatched models, a prompt longer than the context, malformed
     requests; a long prompt prefilled in small chunks, whose layers complete
     only with its last chunk, past the stall timeout (not a stall);
  6. SIGTERM during load: running requests finish, new ones are refused, exit 0;
  7. the step events at debug level: one per engine step, each decode step's
     summed context as the request's position says, read back by
     bench/step_fit.py.

Usage: test_workers.py BIN_DIR SHARED_DIR [--quick]
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = sys.argv[1]
SHARED = sys.argv[2]
QUICK = "--quick" in sys.argv
TMP = tempfile.mkdtemp(prefix="tandem-workers-")
PROCS = []
FAILURES = []


def log(msg):
    print(msg, flush=True)


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        log("FAIL: " + what)
    return cond


class Worker:
    def __init__(self, role, model, *args, env=None):
        self.role = role
        exe = os.path.join(BIN, "tandem-" + role)
        cmd = [exe, "--model", model, "--listen", "127.0.0.1:0",
               "--metrics-listen", "127.0.0.1:0", *args]
        self.err_path = os.path.join(TMP, "%s-%d.err" % (role, len(PROCS)))
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.err_path, "w"),
                                  text=True, env=dict(os.environ, **(env or {})))
        PROCS.append(self.p)
        line = self.p.stdout.readline()
        m = re.search(r"grpc=(\S+).*metrics=(\d+)", line)
        if not m:
            raise RuntimeError("%s did not start: %s %s" % (role, line, self.stderr()))
        self.addr = m.group(1)
        self.metrics_port = int(m.group(2))

    def stderr(self):
        try:
            with open(self.err_path) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def metrics(self):
        url = "http://127.0.0.1:%d/metrics" % self.metrics_port
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
        return out

    def blocks_all_free(self, wait_s=5.0):
        """free == total, waiting up to wait_s for in-flight endings."""
        until = time.time() + wait_s
        while True:
            m = self.metrics()
            if m.get("tandem_kv_blocks_free") == m.get("tandem_kv_blocks_total"):
                return True
            if time.time() > until:
                log("%s: free %s of %s blocks" % (self.role, m.get("tandem_kv_blocks_free"),
                                                  m.get("tandem_kv_blocks_total")))
                return False
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return None


def run_cli(decode, prefills, reqs, extra=(), timeout=300):
    path = os.path.join(TMP, "reqs-%d.jsonl" % random.randrange(1 << 30))
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    cmd = [os.path.join(BIN, "tandem-decode-cli"), "--decode", decode.addr,
           "--prefill", ",".join(p.addr for p in prefills), "--requests", path, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    res = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if len(res) != len(reqs):
        raise RuntimeError("cli: %d results for %d requests: %s" % (len(res), len(reqs), out.stderr))
    return {r["id"]: r for r in res}


def reference(model, req):
    """tandem-generate on the same request: its generated token ids."""
    cmd = [os.path.join(BIN, "tandem-generate"), "--model", model, "--json",
           "--prompt-tokens", ",".join(map(str, req["prompt_tokens"])),
           "--max-tokens", str(req["max_tokens"]),
           "--temperature", str(req.get("temperature", 0)),
           "--top-p", str(req.get("top_p", 1)), "--seed", str(req.get("seed", 0))]
    if req.get("ignore_eos"):
        cmd.append("--ignore-eos")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError("tandem-generate failed: " + out.stderr)
    return json.loads(out.stdout)["tokens"]


def health(worker):
    out = subprocess.run([os.path.join(BIN, "tandem-decode-cli"), "--health", worker.addr],
                         capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def make_requests(n, vocab, ctx, seeded, prefix=None, rng=None, tag="r"):
    rng = rng or random.Random(7)
    reqs = []
    for i in range(n):
        if i == 0:
            n_prompt = 1
        elif i == 1:
            n_prompt = ctx - 130  # most of the context, with room for 120 new tokens
        else:
            n_prompt = rng.randint(1, ctx - 130)
        prompt = [rng.randrange(3, vocab) for _ in range(n_prompt)]
        if prefix:
            prompt = prefix + prompt[: max(1, n_prompt - len(prefix))]
        r = {"id": "%s-%d" % (tag, i), "prompt_tokens": prompt,
             "max_tokens": 120 if i == 1 else rng.randint(1, 120)}
        if seeded:
            r.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        reqs.append(r)
    return reqs


def check_outputs(model, reqs, res, what):
    ok = True
    for r in reqs:
        got = res[r["id"]]
        if not check(got["status"] == "OK", "%s %s: status %s %s" % (
                what, r["id"], got["status"], got.get("error", ""))):
            ok = False
            continue
        want = reference(model, r)
        ok &= check(got["tokens"] == want, "%s %s: tokens differ from tandem-generate\n got %s\nwant %s"
                    % (what, r["id"], got["tokens"][:20], want[:20]))
    return ok


def model_facts(model):
    out = subprocess.run([os.path.join(BIN, "tandem-generate"), "--model", model, "--json",
                          "--prompt-tokens", "1", "--max-tokens", "1"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)


def models():
    found = []
    l2c = os.path.join(SHARED, "models/stories260K/stories260K.bin")
    hf = os.path.join(SHARED, "models/stories260K-hf")
    if os.path.exists(l2c):
        found.append(("stories260K", l2c, 512, 512))
    else:
        log("note: %s absent, stories260K cases skipped" % l2c)
    if os.path.isdir(hf):
        found.append(("stories260K-hf", hf, 512, 512))
    shapes = ["tiny", "tiny-qwen2", "tiny-mistral"] + ([] if QUICK else ["15m"])
    for shape in shapes:
        out = os.path.join(TMP, shape)
        fmt = "llama2c" if shape == "15m" else "hf"
        path = out + ".bin" if fmt == "llama2c" else out
        subprocess.run([os.path.join(BIN, "make-test-model"), "--format", fmt, "--shape", shape,
                        "--seed", "3", "--out", path], check=True, capture_output=True)
        vocab = 32000 if shape == "15m" else 512
        found.append((shape, path, vocab, 256))
    return found


def case_equivalence(name, model, vocab, ctx):
    n = 32
    log("== %s: 1 prefill + 1 decode, tcp, %d requests, greedy and seeded" % (name, n))
    pf = Worker("prefill", model)
    dc = Worker("decode", model)
    for seeded in (False, True):
        reqs = make_requests(n, vocab, ctx, seeded, tag="%s-%s" % (name, seeded))
        res = run_cli(dc, [pf], reqs)
        check_outputs(model, reqs, res, "%s 1+1 %s" % (name, "seeded" if seeded else "greedy"))
    check(pf.blocks_all_free() and dc.blocks_all_free(), "%s: blocks leaked" % name)
    check(pf.stop() == 0 and dc.stop() == 0, "%s: SIGTERM exit code" % name)


def case_two_by_two(name, model, vocab, ctx):
    log("== %s: 2 prefill + 2 decode, shm, every pair" % name)
    pfs = [Worker("prefill", model, "--kv-transport", "shm") for _ in range(2)]
    dcs = [Worker("decode", model, "--kv-transport", "shm") for _ in range(2)]
    for seeded in (False, True):
        reqs = make_requests(32, vocab, ctx, seeded, rng=random.Random(11), tag="x%s" % seeded)
        halves = [reqs[0::2], reqs[1::2]]
        for dc, part in zip(dcs, halves):
            res = run_cli(dc, pfs, part)  # round robin over both prefills
            check_outputs(model, part, res, "%s 2x2 %s" % (name, seeded))
    for w in pfs + dcs:
        check(w.blocks_all_free(), "%s 2x2: blocks leaked on %s" % (name, w.role))
        check(w.stop() == 0, "%s 2x2: exit code" % name)


def case_small_pool(name, model, vocab, ctx):
    log("== %s: decode pool with room for a few requests" % name)
    pf = Worker("prefill", model)
    # 24 blocks of 16 tokens: room for one request of 256 tokens and a few
    # short ones at a time.
    dc = Worker("decode", model, "--kv-blocks", "24", "--max-model-len", "256")
    reqs = make_requests(32, vocab, ctx, False, rng=random.Random(5), tag="small")
    for r in reqs:
        r["prompt_tokens"] = r["prompt_tokens"][:100]
        r["max_tokens"] = min(r["max_tokens"], 150)
    res = run_cli(dc, [pf], reqs)
    check_outputs(model, reqs, res, "%s small pool" % name)
    m = dc.metrics()
    check(m.get("tandem_preemptions_total", 0) > 0, "small pool: no preemption counted")
    log("   preemptions: %d" % m.get("tandem_preemptions_total", 0))
    check(dc.blocks_all_free() and pf.blocks_all_free(), "small pool: blocks leaked")
    pf.stop()
    dc.stop()


def case_prefix(name, model, vocab, ctx):
    log("== %s: shared prefixes" % name)
    pf = Worker("prefill", model)
    dc = Worker("decode", model)
    rng = random.Random(3)
    prefix = [rng.randrange(3, vocab) for _ in range(64)]
    first = make_requests(1, vocab, ctx, False, prefix=prefix, rng=rng, tag="warm")
    first[0]["prompt_tokens"] = prefix + [5, 6, 7]
    res = run_cli(dc, [pf], first)
    check_outputs(model, first, res, "prefix warm-up")
    reqs = make_requests(8, vocab, ctx, False, prefix=prefix, rng=rng, tag="pre")
    for r in reqs:
        r["prompt_tokens"] = prefix + r["prompt_tokens"][:40]
    res = run_cli(dc, [pf], reqs)
    check_outputs(model, reqs, res, "prefix")
    cached = [res[r["id"]]["cached_prompt_tokens"] for r in reqs]
    check(all(c >= 64 for c in cached), "prefix: decode-side cached tokens %s" % cached)
    mp, md = pf.metrics(), dc.metrics()
    computed = mp.get("tandem_prompt_tokens_computed_total", 0)
    total = sum(len(r["prompt_tokens"]) for r in first + reqs)
    check(computed < total - 7 * 48,
          "prefix: prefill computed %d of %d prompt tokens" % (computed, total))
    log("   prefill computed %d of %d prompt tokens" % (computed, total))
    check(mp.get("tandem_prefix_cache_hit_blocks_total", 0) > 0, "prefix: no hit on prefill")
    check(md.get("tandem_prefix_cache_hit_blocks_total", 0) > 0, "prefix: no hit on decode")
    log("   hits: prefill %d blocks, decode %d blocks" % (
        mp.get("tandem_prefix_cache_hit_blocks_total", 0),
        md.get("tandem_prefix_cache_hit_blocks_total", 0)))
    check(pf.blocks_all_free() and dc.blocks_all_free(), "prefix: blocks leaked")
    pf.stop()
    dc.stop()


def case_failures(model, other_model, vocab, ctx):
    log("== failure paths (%s)" % model)
    pf = Worker("prefill", model)
    dc = Worker("decode", model, "--prefill-timeout", "2s")
    long_req = {"prompt_tokens": [5] * 50, "max_tokens": 200, "ignore_eos": True}

    # Cancel mid-stream.
    res = run_cli(dc, [pf], [dict(long_req, id="cancel-1", cancel_after=3)])
    check(res["cancel-1"]["status"] == "TD_ECANCELED", "cancel: %s" % res["cancel-1"]["status"])
    check(dc.blocks_all_free() and pf.blocks_all_free(), "cancel: blocks leaked")

    # Deadline expiry.
    res = run_cli(dc, [pf], [dict(long_req, id="deadline-1", max_tokens=ctx - 60, timeout_ms=1)])
    check(res["deadline-1"]["status"] in ("TD_ETIMEDOUT",), "deadline: %s" % res["deadline-1"])
    check(dc.blocks_all_free() and pf.blocks_all_free(), "deadline: blocks leaked")

    # Malformed requests and a prompt longer than the context.
    bad = [
        {"id": "bad-empty", "prompt_tokens": [], "max_tokens": 4},
        {"id": "bad-vocab", "prompt_tokens": [1, vocab], "max_tokens": 4},
        {"id": "bad-long", "prompt_tokens": [1] * (ctx + 1), "max_tokens": 4},
        {"id": "bad-ctx", "prompt_tokens": [1] * (ctx - 10), "max_tokens": 20},
        {"id": "", "prompt_tokens": [1, 2], "max_tokens": 4},
    ]
    res = run_cli(dc, [pf], bad)
    for r in bad:
        got = res.get(r["id"]) or res.get("")
        check(got and got["status"] == "TD_EINVAL", "malformed %s: %s" % (r["id"], got))
    check(dc.blocks_all_free(), "malformed: blocks allocated")

    # A gRPC address already taken: each role says so and exits 1 (wrk_rpc_start).
    for role, taken in (("prefill", dc.addr), ("decode", pf.addr)):
        r = subprocess.run([os.path.join(BIN, "tandem-" + role), "--model", model, "--listen",
                            taken, "--metrics-listen", "127.0.0.1:0"],
                           capture_output=True, text=True, timeout=60)
        check(r.returncode == 1 and ("cannot serve gRPC on %s" % taken) in r.stderr,
              "%s on a taken address: exit %d, %s" % (role, r.returncode, r.stderr[-300:]))

    # Mismatched models: a prefill worker of another model.
    pf_other = Worker("prefill", other_model)
    res = run_cli(dc, [pf_other], [{"id": "mismatch-1", "prompt_tokens": [1, 2, 3], "max_tokens": 4}])
    got = res["mismatch-1"]
    check(got["status"] == "TD_EMISMATCH" and "fingerprint" in got.get("error", ""),
          "mismatch: %s" % got)
    check(dc.blocks_all_free() and pf_other.blocks_all_free(), "mismatch: blocks leaked")
    pf_other.stop()

    # Prefill SIGSTOPped: the stall is detected, the lease released.
    pf_stop = Worker("prefill", model)
    pf_stop.p.send_signal(signal.SIGSTOP)
    t0 = time.time()
    res = run_cli(dc, [pf_stop], [dict(long_req, id="stall-1", max_tokens=4)])
    took = time.time() - t0
    check(res["stall-1"]["status"] == "TD_EUNAVAILABLE", "stall: %s" % res["stall-1"])
    check(took < 4.0, "stall: detected after %.1f s" % took)
    check(dc.blocks_all_free(), "stall: blocks leaked")
    pf_stop.p.send_signal(signal.SIGCONT)
    check(pf_stop.blocks_all_free(), "stall: blocks leaked on the resumed prefill")
    pf_stop.stop()

    # Prefill SIGKILLed during requests: each fails UNAVAILABLE within 2 s or
    # completed before; nothing hangs; the decode worker keeps serving.
    pf_kill = Worker("prefill", model)
    reqs = [dict(long_req, id="pk-%d" % i, prompt_tokens=[5 + i] * (ctx - 60), max_tokens=8)
            for i in range(6)]
    path = os.path.join(TMP, "pk.jsonl")
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    cli = subprocess.Popen([os.path.join(BIN, "tandem-decode-cli"), "--decode", dc.addr,
                            "--prefill", pf_kill.addr, "--requests", path],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.05)
    t_kill = time.time()
    pf_kill.p.kill()
    out, _ = cli.communicate(timeout=30)
    took = time.time() - t_kill
    res = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    check(len(res) == len(reqs), "prefill kill: %d results" % len(res))
    check(all(r["status"] in ("OK", "TD_EUNAVAILABLE") for r in res),
          "prefill kill: statuses %s" % [r["status"] for r in res])
    check(took < 3.0, "prefill kill: requests ended %.1f s after the kill" % took)
    check(dc.blocks_all_free(), "prefill kill: blocks leaked on decode")
    res = run_cli(dc, [pf], [{"id": "after-pk", "prompt_tokens": [1, 2, 3], "max_tokens": 5}])
    check(res["after-pk"]["status"] == "OK", "decode does not serve after a prefill died")

    # Decode SIGKILLed during requests: the prefill worker drops them and keeps
    # serving the next request (to another decode worker).
    dc_kill = Worker("decode", model)
    path = os.path.join(TMP, "dk.jsonl")
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(dict(r, id="d" + r["id"])) + "\n")
    cli = subprocess.Popen([os.path.join(BIN, "tandem-decode-cli"), "--decode", dc_kill.addr,
                            "--prefill", pf.addr, "--requests", path],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.05)
    dc_kill.p.kill()
    cli.communicate(timeout=30)
    check(pf.blocks_all_free(), "decode kill: blocks leaked on prefill")
    res = run_cli(dc, [pf], [{"id": "after-dk", "prompt_tokens": [1, 2, 3], "max_tokens": 5}])
    check(res["after-dk"]["status"] == "OK", "prefill does not serve after a decode died")
    check(pf.stop() == 0 and dc.stop() == 0, "failures: exit codes")


def case_long_chunked_prefill():
    """A long prompt prefilled in small chunks: each layer's last block lands
    only with the last chunk, long after the decode worker's stall timeout,
    while blocks land all along. That is progress, not a stall: the request
    completes in one attempt with the reference's tokens. The 15m geometry
    with a 4,096-token context, so that the prefill takes seconds (a build
    before the rule failed the request after 0.1 s)."""
    log("case: a 4,000-token prompt prefilled in 16-token chunks, prefill timeout 100 ms")
    model = os.path.join(TMP, "m15-4k")
    subprocess.run([os.path.join(BIN, "make-test-model"), "--format", "hf", "--shape", "15m-4k",
                    "--dtype", "bf16", "--seed", "3", "--out", model], check=True,
                   capture_output=True)
    pf = Worker("prefill", model, "--max-chunk-tokens", "16", "--kv-blocks", "512")
    dc = Worker("decode", model, "--prefill-timeout", "100ms", "--kv-blocks", "512")
    rng = random.Random(11)
    req = {"id": "long-chunked", "prompt_tokens": [rng.randrange(3, 32000) for _ in range(4000)],
           "max_tokens": 4, "ignore_eos": True}
    t0 = time.time()
    got = run_cli(dc, [pf], [req])["long-chunked"]
    took = time.time() - t0
    log("long chunked prefill took %.2f s" % took)
    check(got["status"] == "OK", "long chunked prefill: %s" % got)
    check(got.get("tokens") == reference(model, req),
          "long chunked prefill: tokens differ from tandem-generate's")
    # Only a prefill well past the timeout tests anything (2-3 s here).
    check(took > 0.5, "long chunked prefill took %.2f s: too fast to test the stall rule" % took)
    check(dc.blocks_all_free() and pf.blocks_all_free(), "long chunked prefill: blocks leaked")
    pf.stop()
    dc.stop()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def case_decode_restart(model, vocab, ctx):
    """A decode worker killed and started again on the same KV address: the
    prefill worker's connection to it is stale; a burst of requests (opened
    together, kvx_send_begin_batch) reconnects once and is served."""
    log("== decode worker restarted on the same KV address")
    pf = Worker("prefill", model)
    kv = "127.0.0.1:%d" % free_port()
    d1 = Worker("decode", model, "--kv-listen", kv)
    reqs = make_requests(4, vocab, ctx, False, rng=random.Random(21), tag="before")
    check_outputs(model, reqs, run_cli(d1, [pf], reqs), "before the restart")
    d1.p.kill()
    d1.p.wait(10)
    d2 = Worker("decode", model, "--kv-listen", kv)
    reqs = make_requests(12, vocab, ctx, False, rng=random.Random(22), tag="after")
    check_outputs(model, reqs, run_cli(d2, [pf], reqs), "after the restart")
    check(pf.blocks_all_free() and d2.blocks_all_free(), "restart: blocks leaked")
    check(pf.stop() == 0 and d2.stop() == 0, "restart: exit codes")


def case_sigterm(model, vocab, ctx):
    log("== SIGTERM during load")
    pf = Worker("prefill", model)
    dc = Worker("decode", model)
    reqs = [{"id": "t-%d" % i, "prompt_tokens": [7 + i] * 30, "max_tokens": 150,
             "ignore_eos": True} for i in range(8)]
    path = os.path.join(TMP, "term.jsonl")
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    cli = subprocess.Popen([os.path.join(BIN, "tandem-decode-cli"), "--decode", dc.addr,
                            "--prefill", pf.addr, "--requests", path],
                           stdout=subprocess.PIPE, text=True)
    # Wait until they run, then SIGTERM the decode worker.
    until = time.time() + 10
    while time.time() < until and dc.metrics().get("tandem_running_seqs", 0) < 1:
        time.sleep(0.01)
    check(health(dc) == "SERVING", "health before SIGTERM")
    dc.p.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    if dc.p.poll() is None:
        h = health(dc)
        # UNREACHABLE only when the worker finished its drain in between and
        # is shutting its server down: it must then exit at once.
        gone = False
        if h.startswith("UNREACHABLE"):
            try:
                gone = dc.p.wait(10) == 0
            except subprocess.TimeoutExpired:
                gone = False
        check(h == "NOT_SERVING" or gone, "health while draining: %s" % h)
    late = run_cli(dc, [pf], [{"id": "late", "prompt_tokens": [1, 2], "max_tokens": 3}]) \
        if dc.p.poll() is None else None
    out, _ = cli.communicate(timeout=60)
    res = {r["id"]: r for r in (json.loads(x) for x in out.splitlines() if x.startswith("{"))}
    check(len(res) == len(reqs), "sigterm: %d results" % len(res))
    check_outputs(model, reqs, res, "sigterm")
    if late:
        check(late["late"]["status"] == "TD_EUNAVAILABLE", "sigterm: new request %s" % late["late"])
    check(dc.p.wait(30) == 0, "sigterm: decode exit code")
    check(pf.stop() == 0, "sigterm: prefill exit code")


def case_step_events(model, vocab, ctx):
    """One request at a time, so the decode worker's steps are that request's alone: its k-th
    decode step feeds the token at position p + k - 1 and attends over p + k positions."""
    log("== step events at debug level")
    debug = {"TANDEM_LOG_LEVEL": "debug"}
    pf = Worker("prefill", model, env=debug)
    dc = Worker("decode", model, env=debug)
    rng = random.Random(5)
    reqs = [{"id": "s%d" % i, "prompt_tokens": [rng.randrange(3, vocab) for _ in range(p)],
             "max_tokens": m, "ignore_eos": True} for i, (p, m) in enumerate(((5, 9), (37, 4)))]
    for r in reqs:
        check_outputs(model, [r], run_cli(dc, [pf], [r]), "step events")
    check(pf.stop() == 0 and dc.stop() == 0, "step events: exit code")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../bench/step_fit.py")
    sys.path.insert(0, os.path.dirname(script))
    import step_fit  # the analysis script's own reader of these lines
    steps = step_fit.read_log(dc.err_path)
    want = [p + k for p, m in ((5, 9), (37, 4)) for k in range(1, m)]
    check([s["ctx_tokens"] for s in steps] == want,
          "step events: decode steps' ctx_tokens %s, want %s"
          % ([s["ctx_tokens"] for s in steps], want))
    check(all(s["items"] == 1 and s["decode_tokens"] == 1 and s["prefill_tokens"] == 0
              and 0 < s["forward_us"] <= s["step_us"] for s in steps),
          "step events: fields %s" % steps[:2])
    # The script's command line on the same lines (--logs takes a cluster's run dir).
    run = os.path.join(TMP, "steps-run")
    os.makedirs(run, exist_ok=True)
    shutil.copy(dc.err_path, os.path.join(run, "decode-0.log"))
    shutil.copy(pf.err_path, os.path.join(run, "prefill-0.log"))
    cost = os.path.join(run, "cost.txt")
    with open(cost, "w") as f:
        f.write("decode_step_us_fixed = 100\ndecode_step_us_per_seq = 10\n"
                "decode_step_us_per_ctx_token = 1\n")
    out = subprocess.run([sys.executable, script, "--logs", run, cost], capture_output=True,
                         text=True, timeout=60)
    check(out.returncode == 0 and ("%d decode steps" % len(want)) in out.stdout,
          "step_fit.py on the step events: %s %s" % (out.stdout, out.stderr))


def main():
    try:
        ms = models()
        for name, path, vocab, ctx in ms:
            case_equivalence(name, path, vocab, ctx)
        base = ms[0]
        case_two_by_two(*base)
        case_small_pool(*base)
        case_prefix(*base)
        other = [m for m in ms if m[0] == "tiny-qwen2"][0][1]
        tiny = [m for m in ms if m[0] == "tiny"][0]
        case_failures(tiny[1], other, tiny[2], tiny[3])
        case_long_chunked_prefill()
        case_decode_restart(base[1], base[2], base[3])
        case_sigterm(base[1], base[2], base[3])
        case_step_events(tiny[1], tiny[2], tiny[3])
    except Exception as e:
        # The workers' logs stay for inspection, as after a failed check.
        FAILURES.append("exception: %r" % e)
        raise
    finally:
        for p in PROCS:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                    p.wait(5)
                except Exception:
                    pass
        if FAILURES:
            log("kept %s for inspection" % TMP)
        else:
            shutil.rmtree(TMP, ignore_errors=True)
    if FAILURES:
        log("%d check(s) failed" % len(FAILURES))
        sys.exit(1)
    log("all worker checks passed")


if __name__ == "__main__":
    main()

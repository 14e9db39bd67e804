#!/usr/bin/env python3
"""The cluster across emulated hosts (deploy/netns/rig.py), as real processes.

Router, 2 prefill and 2 decode workers, each in a network namespace of its
own with its own address, the tcp KV transport between them, links through a
bridge (netem 0.5 ms and 10 Gbit/s where the kernel has sch_netem). From the
load tester's namespace:
  - greedy completions, streamed and not, equal tandem-generate's text and
    token counts, and they reach every decode worker (the router's log);
  - a short BurstGPT replay (tandem-loadtest replay --max-context 496): every
    request ok;
  - every worker ends with free == total KV blocks;
  - teardown leaves no namespace and no process of the rig.

Exit 77 (skipped) when not root, `ip netns add` fails, or the binaries, the
model or the trace are missing.

Usage: test_netns.py BIN_DIR SHARED_DIR SOURCE_DIR
"""
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BIN, SHARED, SRC = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, os.path.join(SRC, "deploy", "netns"))
import rig as netns  # noqa: E402

FAILURES = []


def log(msg):
    print(msg, flush=True)


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        log("FAIL: " + what)
    return cond


def generate(model, prompt, n):
    out = subprocess.run([os.path.join(BIN, "tandem-generate"), "--model", model, "--json",
                          "--prompt", prompt, "--max-tokens", str(n), "--temperature", "0"],
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def complete(http_addr, body, timeout=60):
    """(status, text, usage or error, request id) of one completion, streamed or not."""
    host, port = http_addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    c.request("POST", "/v1/completions", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if not body.get("stream"):
        data = json.loads(r.read())
        c.close()
        if r.status != 200:
            return r.status, None, data.get("error"), None
        return r.status, data["choices"][0]["text"], data["usage"], data["id"]
    text, usage, rid, err = "", None, None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            err = ev["error"]
            continue
        rid = ev.get("id", rid)
        if ev.get("choices"):
            text += ev["choices"][0].get("text", "")
        if ev.get("usage"):
            usage = ev["usage"]
    c.close()
    return r.status, text, err or usage, rid


def main():
    model = os.path.join(SHARED, "models/stories260K/stories260K.bin")
    trace = os.path.join(SHARED, "data/burstgpt/BurstGPT_1_head.csv")
    need = [os.path.join(BIN, b) for b in ("tandem-router", "tandem-prefill", "tandem-decode",
                                           "tandem-generate", "tandem-loadtest")]
    missing = [p for p in need + [model, trace] if not os.path.exists(p)]
    if missing:
        log("skipped: missing %s" % ", ".join(missing))
        sys.exit(77)
    why = netns.can_create_namespaces()
    if why:
        log("skipped: %s" % why)
        sys.exit(77)

    tmp = tempfile.mkdtemp(prefix="tandem-netns-")
    refs = {p: (n, generate(model, p, n)) for p, n in (("Once upon a time", 40),
                                                        ("The little dog", 25),
                                                        ("Tom and Sue", 60), ("Lily saw a", 30))}
    t0 = time.monotonic()
    tag = None
    try:
        with netns.Rig(delay_ms=0.5, rate="10gbit", log_dir=tmp) as rig:
            tag = rig.tag
            cl = netns.RigCluster(rig, BIN, model, router_args=["--heartbeat-ms", "200"],
                                  token="rig-test-token")
            netns.enter_namespace(rig.ns("load"))
            cl.start()
            log("== up in %.1f s (netem: %s)" % (time.monotonic() - t0,
                                                 rig.netem_error or "0.5 ms, 10gbit"))
            # Each worker advertises its own namespace's address.
            h = cl.health()[1]
            check(h.get("prefill_ready") == 2 and h.get("decode_ready") == 2, "health %s" % h)

            log("== greedy completions equal tandem-generate")
            ids = []
            for rnd in range(3):
                for prompt, (n, ref) in refs.items():
                    for stream in (False, True):
                        body = {"model": "stories260K", "prompt": prompt, "temperature": 0,
                                "max_tokens": n, "stream": stream}
                        if stream:
                            body["stream_options"] = {"include_usage": True}
                        st, text, usage, rid = complete(cl.http, body)
                        ids.append(rid)
                        check(st == 200 and text == ref["text"],
                              "%r stream=%s: %s %r != %r" % (prompt, stream, st, text,
                                                             ref["text"]))
                        check(isinstance(usage, dict) and
                              usage.get("completion_tokens") == len(ref["tokens"]),
                              "%r stream=%s usage %s" % (prompt, stream, usage))
            with open(os.path.join(tmp, "router.log"), errors="replace") as f:
                used = set(re.findall(r"request_end .*?decode=(\S+) prefill=(\S+)", f.read()))
            decodes = {d for d, _ in used}
            prefills = {p for _, p in used}
            check(decodes == {"decode0", "decode1"} and prefills == {"prefill0", "prefill1"},
                  "requests reached decode %s prefill %s" % (sorted(decodes), sorted(prefills)))

            log("== BurstGPT replay from the load tester's namespace")
            out = os.path.join(tmp, "replay")
            p = subprocess.run([os.path.join(BIN, "tandem-loadtest"), "replay", "--trace", trace,
                                "--format", "burstgpt", "--url", "http://" + cl.http,
                                "--model", "stories260K", "--max-requests", "60", "--rate", "6",
                                "--max-context", "496", "--timeout-s", "60", "--no-plots",
                                "--out", out, "--log-level", "warn"],
                               capture_output=True, text=True, timeout=100)
            check(p.returncode == 0, "replay exit %d: %s" % (p.returncode, p.stderr[-2000:]))
            try:
                with open(os.path.join(out, "summary.json")) as f:
                    s = json.load(f)
                log("replay: %d requests, %d ok, %d errors, %.1f req/s, ttft p50 %.1f ms "
                    "p99 %.1f ms" % (s["requests"], s["ok"], s["errors"],
                                     s["throughput"]["req_per_s"], s["ttft_ms"]["p50"],
                                     s["ttft_ms"]["p99"]))
                check(s["requests"] == 60 and s["ok"] == 60, "replay: %d of %d ok" % (
                    s["ok"], s["requests"]))
            except (OSError, ValueError, KeyError) as e:
                check(False, "replay summary: %s" % e)
            bad = cl.blocks_free()
            check(not bad, "KV blocks not free after the runs: %s" % bad)
            procs = list(rig.procs)
    except netns.RigError as e:
        check(False, str(e))
        procs = []
    left = [n for n in netns.rig_namespaces() if tag and n.startswith(tag + "-")]
    check(not left, "namespaces left: %s" % left)
    alive = ["%s %d" % (n, p.pid) for n, p in procs if p.poll() is None]
    check(not alive, "processes left: %s" % alive)

    log("== the rig's CLI tears down after SIGTERM and after a failed start")
    rig_py = os.path.join(SRC, "deploy", "netns", "rig.py")
    p = subprocess.Popen([sys.executable, rig_py, "run", "--bin-dir", BIN, "--model", model,
                          "--log-dir", os.path.join(tmp, "cli"), "--", "sleep", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = p.stdout.readline()
    check(first.startswith("rig: up"), "rig run: %r" % first)
    p.terminate()
    rest = p.communicate(timeout=30)[0]
    check(p.returncode == 143, "rig run after SIGTERM: exit %s %r" % (p.returncode, rest))
    left = [n for n in netns.rig_namespaces() if n.startswith("%s%d-" % (netns.PREFIX, p.pid))]
    check(not left, "namespaces left after SIGTERM: %s" % left)
    p = subprocess.Popen([sys.executable, rig_py, "run", "--bin-dir", BIN, "--model",
                          os.path.join(tmp, "no-such-model"), "--log-dir",
                          os.path.join(tmp, "cli-bad"), "--", "true"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = p.communicate(timeout=60)[1]
    check(p.returncode == 1 and "exited" in err, "rig run with a bad model: %d %r" % (
        p.returncode, err))
    left = [n for n in netns.rig_namespaces() if n.startswith("%s%d-" % (netns.PREFIX, p.pid))]
    check(not left, "namespaces left after a failed start: %s" % left)
    log("== %.1f s in all" % (time.monotonic() - t0))
    if FAILURES:
        log("%d check(s) failed; logs kept in %s" % (len(FAILURES), tmp))
        sys.exit(1)
    shutil.rmtree(tmp, ignore_errors=True)
    log("all netns checks passed")


if __name__ == "__main__":
    main()

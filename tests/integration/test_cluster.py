#!/usr/bin/env python3
"""The local cluster (deploy/local/tandem-cluster) with real processes on loopback.

  1. `up` with 1 prefill + 2 decode workers returns once the router's GET
     /health says every worker is ready; cluster.json names each process;
     a completion goes through the router; a second `up` is refused;
     `status` exits 0 and shows every process alive and ready; `logs` prints.
  2. A decode worker SIGKILLed by hand: `status` reports it dead and exits 1,
     and the router's health, shown by status, drops to one decode worker.
  3. `down` leaves no process of the run (checked with pgrep on the run's
     process groups and on the run directory in command lines), removes
     cluster.json and keeps the logs; `status` then exits 1.
  4. `up` whose decode worker cannot load its model: exit 1, the worker's log
     lines printed, nothing left running, no cluster.json.

Exits 77 (CTest: skipped) when tandem-router is not built, or when it does not
serve HTTP: started alone, it must answer GET /health (any status) within
10 s of its ready line, else the cluster cannot be checked.

Usage: test_cluster.py [BIN_DIR [SOURCE_DIR [SHARED_DIR]]]
(defaults: $TANDEM_BIN_DIR, $TANDEM_SOURCE_DIR, $TANDEM_SHARED_DIR)
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TANDEM_BIN_DIR", "")
SRC = sys.argv[2] if len(sys.argv) > 2 else os.environ.get(
    "TANDEM_SOURCE_DIR", os.path.dirname(os.path.dirname(HERE)))
SHARED = sys.argv[3] if len(sys.argv) > 3 else os.environ.get("TANDEM_SHARED_DIR", "")
CLUSTER = os.path.join(SRC, "deploy", "local", "tandem-cluster")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
FAILURES = []


def log(msg):
    print(msg, flush=True)


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        log("FAIL: " + what)
    return cond


def free_ports(n):
    """n distinct free loopback ports: every socket stays bound until all are
    chosen, or the kernel may hand the same port out twice."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(url, timeout=2.0):
    try:
        with OPENER.open(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError):
        return None, ""


def cluster(*args, timeout=180):
    r = subprocess.run([sys.executable, CLUSTER] + list(args), capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    log(f"$ tandem-cluster {' '.join(args)}  -> {r.returncode}")
    for line in (r.stdout + r.stderr).splitlines():
        log("  | " + line)
    return r


def proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()[0]


def running(pids):
    """The pids that still run (a zombie has exited: it only waits for its
    parent to reap it, which an orphan's init may do late)."""
    return [p for p in pids if proc_state(p) not in (None, "Z", "X")]


def pgrep(*args):
    r = subprocess.run(["pgrep"] + list(args), capture_output=True, text=True, check=False)
    return [int(x) for x in r.stdout.split()]


def left_of_run(run_dir, pgids):
    """Processes of the run still running: members of its process groups and
    anything whose command line names the run directory."""
    found = set()
    for g in pgids:
        found.update(pgrep("-g", str(g)))
    found.update(pgrep("-f", run_dir))
    found.discard(os.getpid())
    return running(sorted(found))


def pick_model(tmp):
    real = os.path.join(SHARED, "models", "stories260K", "stories260K.bin") if SHARED else ""
    if real and os.path.isfile(real):
        return real
    out = os.path.join(tmp, "tiny")
    subprocess.run([os.path.join(BIN, "make-test-model"), "--format", "hf", "--shape", "tiny",
                    "--dtype", "f32", "--seed", "1", "--out", out], check=True,
                   capture_output=True)
    return out


def router_serves_http(model, tmp):
    """Starts tandem-router alone; True when GET /health answers over HTTP."""
    http, grpc = free_ports(2)
    logf = os.path.join(tmp, "probe-router.log")
    with open(logf, "wb") as out:
        p = subprocess.Popen([os.path.join(BIN, "tandem-router"), "--model", model,
                              "--http-listen", f"127.0.0.1:{http}",
                              "--grpc-listen", f"127.0.0.1:{grpc}"],
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        ready = None
        while ready is None and time.monotonic() < deadline and p.poll() is None:
            with open(logf, encoding="utf-8", errors="replace") as f:
                ready = next((ln for ln in f if ln.startswith("tandem-router ready ")), None)
            time.sleep(0.05)
        if ready is None:
            return False, f"no ready line within 10 s (exit {p.poll()}); see {logf}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, body = http_get(f"http://127.0.0.1:{http}/health", timeout=1.0)
            if status is not None:
                return True, f"{status} {body.strip()}"
            if p.poll() is not None:
                break
            time.sleep(0.2)
        return False, f"GET /health on 127.0.0.1:{http} did not answer (ready line: " \
                      f"{ready.strip()})"
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def case_cluster(model, tmp):
    run_dir = os.path.join(tmp, "run")
    http, grpc = free_ports(2)
    common = ["--run-dir", run_dir]
    r = cluster("up", *common, "--bin-dir", BIN, "--model", model, "--prefill", "1",
                "--decode", "2", "--http-listen", f"127.0.0.1:{http}",
                "--grpc-listen", f"127.0.0.1:{grpc}", "--ready-timeout", "60")
    if not check(r.returncode == 0, "up exits 0"):
        return
    check(f"endpoint http://127.0.0.1:{http}/v1" in r.stdout, "up prints the endpoint")
    with open(os.path.join(run_dir, "cluster.json"), encoding="utf-8") as f:
        state = json.load(f)
    procs = {p["name"]: p for p in state["processes"]}
    check(sorted(procs) == ["decode-0", "decode-1", "prefill-0", "router"],
          f"cluster.json names router + 1 prefill + 2 decode: {sorted(procs)}")
    pgids = [p["pid"] for p in procs.values()]
    check(len(running(pgids)) == 4, "every process runs")
    for name, p in procs.items():
        check(os.path.getsize(p["log"]) > 0, f"{name} wrote its log")
        check(os.getpgid(p["pid"]) == p["pid"] and os.getsid(p["pid"]) == p["pid"],
              f"{name} leads its own session and process group")
        if p["role"] != "router":
            check(p.get("grpc", "").startswith("127.0.0.1:") and p.get("metrics", 0) > 0,
                  f"{name}: grpc and metrics addresses recorded")
    status, body = http_get(f"http://127.0.0.1:{http}/health")
    health = json.loads(body) if status == 200 else {}
    check(status == 200 and health.get("prefill_ready") == 1 and health.get("decode_ready") == 2,
          f"router health after up: {status} {body}")

    # One completion through the router.
    name = procs["router"].get("served_model_name", "")
    check(bool(name), "cluster.json has the served model name")
    req = urllib.request.Request(
        f"http://127.0.0.1:{http}/v1/completions",
        data=json.dumps({"model": name, "prompt": "Once upon a time", "max_tokens": 8,
                         "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with OPENER.open(req, timeout=30) as resp:
            answer = json.loads(resp.read())
        check(answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["text"],
              f"a completion through the cluster: {answer}")
    except urllib.error.HTTPError as e:
        check(False, f"a completion through the cluster: {e.code} {e.read()!r}")
    except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
        check(False, f"a completion through the cluster: {e}")

    r = cluster("up", *common, "--bin-dir", BIN, "--model", model)
    check(r.returncode == 1 and "already up" in r.stderr, "a second up is refused")
    check(len(running(pgids)) == 4, "the refused up left the cluster alone")

    r = cluster("status", *common)
    check(r.returncode == 0, "status exits 0 when everything is up")
    lines = {}
    for ln in r.stdout.splitlines():
        words = ln.split()
        if len(words) >= 4 and words[1].isdigit():  # NAME PID STATE READY ADDRESS
            lines[words[0]] = words
    for name in procs:
        row = lines.get(name, [])
        check(len(row) >= 4 and row[2] == "alive" and row[3] == "yes",
              f"status shows {name} alive and ready: {row}")
    r = cluster("logs", *common, "router", "-n", "1000")
    check(r.returncode == 0 and "tandem-router ready" in r.stdout, "logs prints the router's log")

    # A worker killed by hand.
    victim = procs["decode-1"]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while running([victim]) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = cluster("status", *common)
    check(r.returncode == 1, "status exits 1 with a worker down")
    row = next((ln.split() for ln in r.stdout.splitlines() if ln.startswith("decode-1 ")), [])
    check(len(row) >= 3 and row[2] == "dead", f"status reports decode-1 dead: {row}")
    check("dead: decode-1" in r.stdout, "status names the dead worker")
    # The router takes it out of rotation after missed heartbeats.
    deadline = time.monotonic() + 15
    decode_ready = None
    while time.monotonic() < deadline:
        r = cluster("status", *common, "--json")
        try:
            decode_ready = json.loads(r.stdout)["health"]["body"].get("decode_ready")
        except (ValueError, KeyError, AttributeError):
            decode_ready = None
        if decode_ready == 1:
            break
        time.sleep(1)
    check(decode_ready == 1, f"router health drops to 1 decode worker (saw {decode_ready})")

    r = cluster("down", *common, timeout=120)
    check(r.returncode == 0, "down exits 0")
    left = left_of_run(run_dir, pgids)
    check(not left, f"no process of the run left after down: {left}")
    check(not os.path.exists(os.path.join(run_dir, "cluster.json")), "down removes cluster.json")
    check(all(os.path.exists(p["log"]) for p in procs.values()), "down keeps the logs")
    r = cluster("status", *common)
    check(r.returncode == 1 and "no cluster" in r.stdout, "status after down exits 1")
    r = cluster("down", *common)
    check(r.returncode == 0, "a second down is a no-op")


def case_failed_up(model, tmp):
    run_dir = os.path.join(tmp, "run-bad")
    bogus = os.path.join(tmp, "not-a-model.bin")
    with open(bogus, "wb") as f:
        f.write(b"\0" * 64)
    # The router loads the real model; the decode worker gets a file that is
    # not a checkpoint through its extra flags (the last --model wins).
    http, grpc = free_ports(2)
    r = cluster("up", "--run-dir", run_dir, "--bin-dir", BIN, "--model", model,
                "--http-listen", f"127.0.0.1:{http}",
                "--grpc-listen", f"127.0.0.1:{grpc}",
                "--decode-args", f"--model {bogus}", "--ready-timeout", "30")
    check(r.returncode == 1, "up with a broken worker exits 1")
    check("decode-0 exited" in r.stderr and "last lines of" in r.stderr,
          "up names the failed worker and prints its log")
    check(not left_of_run(run_dir, []), "a failed up leaves no process")
    check(not os.path.exists(os.path.join(run_dir, "cluster.json")),
          "a failed up leaves no cluster.json")


def main():
    if not BIN:
        log("usage: test_cluster.py BIN_DIR [SOURCE_DIR [SHARED_DIR]] (or TANDEM_BIN_DIR)")
        return 2
    for b in ("tandem-router", "tandem-prefill", "tandem-decode", "make-test-model"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            log(f"skip: {b} is not built in {BIN}")
            return SKIP
    tmp = tempfile.mkdtemp(prefix="tandem-cluster-test-")
    try:
        model = pick_model(tmp)
        log(f"model: {model}")
        serves, why = router_serves_http(model, tmp)
        if not serves:
            log(f"skip: tandem-router does not serve HTTP yet: {why}")
            return SKIP
        log(f"router HTTP side answers: {why}")
        case_cluster(model, tmp)
        case_failed_up(model, tmp)
    finally:
        # Whatever a failed check left behind.
        for d in ("run", "run-bad"):
            if os.path.exists(os.path.join(tmp, d, "cluster.json")):
                cluster("down", "--run-dir", os.path.join(tmp, d), timeout=120)
        if not FAILURES:
            shutil.rmtree(tmp, ignore_errors=True)
    if FAILURES:
        log(f"{len(FAILURES)} check(s) failed; files kept in {tmp}")
        return 1
    log("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

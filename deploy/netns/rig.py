#!/usr/bin/env python3
"""A multi-host Tandem cluster emulated with Linux network namespaces.

    deploy/netns/rig.py run [--delay-ms D] [--rate R] [--model PATH] -- CMD [ARG ...]
    deploy/netns/rig.py check
    deploy/netns/rig.py clean

One namespace per host: the router, two prefill workers, two decode workers
and a load tester, each with one veth (`eth0`) holding its own address in
10.213.0.0/24. The other ends of the veths are ports of a bridge that lives in
a seventh namespace (the hub), so the host's own network is never touched.
`tc netem` on each eth0 adds a delay and a rate limit when asked (where the
kernel lacks netem, `tc tbf` applies the rate alone and the rig says so). Every
process runs in its own namespace (`ip netns exec`), workers with the tcp KV
transport on their namespace's address and --router set to the router's.

`run` builds the rig, starts the cluster, waits for the router's /health,
runs CMD in the load tester's namespace with TANDEM_RIG_URL (the router's HTTP
endpoint) and TANDEM_RIG_JSON (the rig's layout) in its environment, and
tears everything down afterwards: on success, on a failure, on SIGINT, SIGTERM
or SIGHUP. Teardown kills every process of every namespace of the rig, deletes
the namespaces (their veths and the bridge go with them) and checks that none
is left. `check` exits 77 when namespaces cannot be created here. `clean`
removes what a rig killed by SIGKILL left behind.

Python 3 standard library only; needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN),
`ip` and, for netem, `tc`. See docs/deploy.md.
"""

import argparse
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

SKIP = 77
PREFIX = "tdrig"
SUBNET = "10.213.0"
# Host (namespace) name -> last octet. The order is the start order.
HOSTS = [("router", 2), ("prefill0", 11), ("prefill1", 12), ("decode0", 21), ("decode1", 22),
         ("load", 31)]
HTTP_PORT, GRPC_PORT = 8000, 50051
WORKER_PORT, KV_PORT, METRICS_PORT = 50061, 50062, 9101
CLONE_NEWNET = 0x40000000


def rate_bytes_per_s(rate):
    """tc's rate syntax (10gbit, 100mbit, 500kbps, 1000000bit ...) in bytes/s."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)(bit|bps)?\s*", rate.lower())
    if not m:
        raise RigError("cannot read the rate %r (e.g. 10gbit, 100mbit)" % rate)
    base = 1024 if m.group(3) else 1000
    value = float(m.group(1)) * base ** " kmgt".index(m.group(2) or " ")
    return value if m.group(4) == "bps" else value / 8


class RigError(Exception):
    """A step of the rig failed; the message says which."""


class Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def sh(*argv, check=True):
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RigError("%s: exit %d: %s" % (" ".join(argv), p.returncode, p.stderr.strip()))
    return p


def can_create_namespaces():
    """None when this host can build a rig, else the reason it cannot."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in ("ip",):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in os.environ.get("PATH", "/usr/sbin:/usr/bin").split(":") + ["/usr/sbin",
                                                                                      "/sbin"]):
            return "`%s` (iproute2) not found" % tool
    name = "%sprobe%d" % (PREFIX, os.getpid())
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if p.returncode != 0:
        return "`ip netns add` failed: %s" % p.stderr.strip()
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


_HOME_NS = []  # the network namespace this process started in (an fd), once it left


def _setns(path):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise RigError("setns %s: %s" % (path, os.strerror(ctypes.get_errno())))
    finally:
        os.close(fd)


def enter_namespace(ns):
    """Move the calling thread into namespace NS (threads created later follow);
    leave_namespace() brings it back."""
    if not _HOME_NS:
        _HOME_NS.append(os.open("/proc/self/ns/net", os.O_RDONLY))
    _setns("/var/run/netns/" + ns)


def leave_namespace():
    if _HOME_NS:
        _setns("/proc/self/fd/%d" % _HOME_NS[0])


def rig_namespaces():
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


class Rig:
    """The namespaces, veths, bridge and processes of one rig.

    Use as a context manager: the rig is torn down when the block ends, however
    it ends. Processes started with spawn() are killed at teardown.
    """

    def __init__(self, delay_ms=0.0, rate=None, log_dir="/tmp", tag=None):
        self.tag = tag or "%s%d" % (PREFIX, os.getpid())
        self.delay_ms, self.rate = delay_ms, rate
        self.log_dir = log_dir
        self.hub = self.tag + "-hub"
        self.addr = {h: "%s.%d" % (SUBNET, octet) for h, octet in HOSTS}
        self.procs = []  # [(name, Popen)]
        self.created = []  # namespaces, in creation order
        self.netem_error = None

    def ns(self, host):
        return "%s-%s" % (self.tag, host)

    def __enter__(self):
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc):
        left = self.down()
        if left and exc[0] is None:
            raise RigError("teardown left: " + ", ".join(left))
        return False

    def up(self):
        sh("ip", "netns", "add", self.hub)
        self.created.append(self.hub)
        sh("ip", "-n", self.hub, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for host, _ in HOSTS:
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # Both ends are created in namespaces of the rig: the host's
            # interface names and addresses are never touched.
            sh("ip", "-n", self.hub, "link", "add", "v-" + host, "type", "veth", "peer", "name",
               "eth0", "netns", ns)
            sh("ip", "-n", self.hub, "link", "set", "v-" + host, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", self.addr[host] + "/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            if self.delay_ms or self.rate:
                self.shape(host, ns)

    def shape(self, host, ns):
        """Delay and rate on NS's eth0: netem where the kernel has it; else
        the rate alone with tbf (no delay), else nothing, with a warning."""
        netem = ["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "netem"]
        if self.delay_ms:
            netem += ["delay", "%gms" % self.delay_ms]
        if self.rate:
            netem += ["rate", self.rate]
        got = sh(*netem, check=False)
        if got.returncode == 0:
            return
        # sch_netem is a kernel option (CONFIG_NET_SCH_NETEM) some kernels
        # lack; sch_tbf is more often built in and can still limit the rate.
        self.netem_error = got.stderr.strip()
        if self.rate:
            # Burst: 10 ms at the rate (tbf needs at least one timer tick's
            # worth to reach it), never below 64 KiB.
            burst = max(64 << 10, int(rate_bytes_per_s(self.rate) / 100))
            tbf = sh("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                     self.rate, "burst", str(burst), "latency", "50ms", check=False)
            if tbf.returncode == 0:
                if self.delay_ms:
                    print("rig: warning: netem on %s: %s; rate %s by tbf, no delay"
                          % (host, self.netem_error, self.rate), file=sys.stderr)
                    self.netem_error += " (rate by tbf; no delay)"
                    self.delay_ms = 0.0
                else:
                    self.netem_error += " (rate by tbf)"
                return
            self.netem_error += "; tbf: " + tbf.stderr.strip()
        print("rig: warning: netem on %s: %s; links have no delay or rate limit"
              % (host, self.netem_error), file=sys.stderr)
        self.delay_ms, self.rate = 0.0, None

    def spawn(self, host, name, argv):
        """Start ARGV in HOST's namespace, in a session of its own; stdout and
        stderr go to LOG_DIR/NAME.log. Returns the Popen."""
        log = open(os.path.join(self.log_dir, name + ".log"), "w")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(host)] + list(argv),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def link(self, host, up):
        """Set HOST's link up or down (its bridge port, in the hub)."""
        sh("ip", "-n", self.hub, "link", "set", "v-" + host, "up" if up else "down")

    def down(self):
        """Kill every process of the rig, delete its namespaces; returns what is left."""
        leave_namespace()  # this process may sit in the load tester's namespace
        for _, p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _, p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.created):
            # Anything else that runs there (started by hand, or a child that
            # left its group) goes too, by pid.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                if pid == str(os.getpid()):
                    continue
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            deadline = time.monotonic() + 5
            while sh("ip", "netns", "pids", ns, check=False).stdout.split():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            sh("ip", "netns", "del", ns, check=False)
        self.created = []
        left = [n for n in rig_namespaces() if n.startswith(self.tag + "-")]
        left += ["%s pid %d" % (n, p.pid) for n, p in self.procs if p.poll() is None]
        return left


# --------------------------------------------------------------------------
# The cluster on a rig
# --------------------------------------------------------------------------


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (OSError, ValueError) as e:
        return None, str(e)


class RigCluster:
    """Router + 2 prefill + 2 decode on a rig. Health and metrics are read
    from the load tester's namespace: call enter_namespace(rig.ns("load"))
    before using them (this process then stays there)."""

    def __init__(self, rig, bin_dir, model, router_args=(), worker_args=(), token=None):
        self.rig, self.bin, self.model = rig, bin_dir, model
        self.router_args, self.worker_args = list(router_args), list(worker_args)
        self.token_file = None
        if token:
            self.token_file = os.path.join(rig.log_dir, "cluster-token.conf")
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write('cluster-token = "%s"\n' % token)
        self.http = "%s:%d" % (rig.addr["router"], HTTP_PORT)
        self.grpc = "%s:%d" % (rig.addr["router"], GRPC_PORT)
        self.procs = {}
        self.restarts = {}

    def common(self):
        return ["--config", self.token_file] if self.token_file else []

    def start_router(self):
        self.procs["router"] = self.rig.spawn("router", "router", [
            os.path.join(self.bin, "tandem-router"), "--model", self.model,
            "--http-listen", self.http, "--grpc-listen", self.grpc] + self.common()
            + self.router_args)

    def start_worker(self, host):
        role = host.rstrip("0123456789")
        a = self.rig.addr[host]
        argv = [os.path.join(self.bin, "tandem-" + role), "--model", self.model,
                "--router", self.grpc, "--worker-id", host,
                "--listen", "%s:%d" % (a, WORKER_PORT),
                "--metrics-listen", "%s:%d" % (a, METRICS_PORT), "--kv-transport", "tcp"]
        if role == "decode":
            argv += ["--kv-listen", "%s:%d" % (a, KV_PORT)]
        n = self.restarts.get(host, -1) + 1
        self.restarts[host] = n
        name = host if n == 0 else "%s.%d" % (host, n)
        self.procs[host] = self.rig.spawn(host, name, argv + self.common() + self.worker_args)
        return self.procs[host]

    def workers(self):
        return [h for h, _ in HOSTS if h.startswith(("prefill", "decode"))]

    def start(self, timeout=60):
        self.start_router()
        self.wait_router(timeout)
        for host in self.workers():
            self.start_worker(host)
        self.wait_ready(2, 2, timeout)

    def health(self):
        status, body = http_get("http://%s/health" % self.http)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {}

    def check_alive(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RigError("%s exited with %s; see %s" % (
                    name, p.returncode, os.path.join(self.rig.log_dir, name + ".log")))

    def wait_router(self, timeout):
        deadline = time.monotonic() + timeout
        while self.health()[0] is None:
            self.check_alive()
            if time.monotonic() > deadline:
                raise RigError("router did not answer on %s" % self.http)
            time.sleep(0.1)

    def wait_ready(self, n_prefill, n_decode, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            status, h = self.health()
            if status == 200 and h.get("prefill_ready", 0) >= n_prefill and \
                    h.get("decode_ready", 0) >= n_decode:
                return h
            if time.monotonic() > deadline:
                raise RigError("router health after %gs: %s %s" % (timeout, status, h))
            time.sleep(0.1)

    def worker_blocks(self, host):
        status, text = http_get("http://%s:%d/metrics" % (self.rig.addr[host], METRICS_PORT))
        if status != 200:
            return None
        vals = {}
        for line in text.splitlines():
            m = re.match(r"tandem_kv_blocks_(free|total) (\S+)", line)
            if m:
                vals[m.group(1)] = float(m.group(2))
        return vals

    def blocks_free(self, wait_s=10):
        """{host: (free, total)} of every live worker whose free != total after WAIT_S."""
        bad = {}
        for host in self.workers():
            p = self.procs.get(host)
            if p is None or p.poll() is not None:
                continue
            deadline = time.monotonic() + wait_s
            while True:
                v = self.worker_blocks(host)
                if v and v.get("free") == v.get("total"):
                    bad.pop(host, None)
                    break
                bad[host] = v
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        return bad


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def default_model(repo):
    shared = os.environ.get("TANDEM_SHARED_DIR", os.path.join(os.path.dirname(repo), "shared"))
    return os.path.join(shared, "models/stories260K/stories260K.bin")


def cmd_run(args, repo):
    why = can_create_namespaces()
    if why:
        print("rig: skipped: %s" % why, file=sys.stderr)
        return SKIP
    log_dir = args.log_dir or os.path.join(repo, "build", "rig")
    os.makedirs(log_dir, exist_ok=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)
    rc = 1
    try:
        with Rig(args.delay_ms, args.rate, log_dir) as rig:
            cl = RigCluster(rig, args.bin_dir or os.path.join(repo, "build", "bin"),
                            args.model or default_model(repo),
                            router_args=args.router_args.split(),
                            worker_args=args.worker_args.split())
            enter_namespace(rig.ns("load"))
            cl.start()
            print("rig: up: router %s, workers %s; logs in %s" % (
                cl.http, ", ".join("%s=%s" % (h, rig.addr[h]) for h in cl.workers()), log_dir),
                flush=True)
            env = dict(os.environ, TANDEM_RIG_URL="http://" + cl.http,
                       TANDEM_RIG_JSON=json.dumps({"addr": rig.addr, "ns": {
                           h: rig.ns(h) for h, _ in HOSTS}, "http": cl.http, "grpc": cl.grpc}))
            if args.cmd:
                # This process is already in the load tester's namespace.
                rc = subprocess.run(args.cmd, env=env).returncode
            else:
                rc = 0
    except Interrupted as e:
        print("rig: %s: torn down" % e, file=sys.stderr)
        return 128 + e.signum
    except RigError as e:
        print("rig: %s" % e, file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
    print("rig: torn down; no namespace left", file=sys.stderr)
    return rc


def cmd_clean(_args):
    left = []
    for ns in rig_namespaces():
        m = re.match(PREFIX + r"(\d+)-", ns)
        if m and os.path.exists("/proc/" + m.group(1)):
            continue  # its rig is still running
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.2)
        if sh("ip", "netns", "del", ns, check=False).returncode != 0:
            left.append(ns)
        else:
            print("rig: removed %s" % ns)
    return 1 if left else 0


def main(argv):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    top = argparse.ArgumentParser(prog="rig.py", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="cmd_name", required=True)
    run = sub.add_parser("run", help="build the rig, start the cluster, run CMD, tear down")
    run.add_argument("--delay-ms", type=float, default=0.0, help="netem delay per link (none where the kernel lacks netem)")
    run.add_argument("--rate", default=None, help="rate limit per link (e.g. 10gbit): netem, else tbf")
    run.add_argument("--model", help="checkpoint (default: ../shared stories260K)")
    run.add_argument("--bin-dir", help="where the binaries are (default build/bin)")
    run.add_argument("--log-dir", help="process logs (default build/rig)")
    run.add_argument("--router-args", default="", help="extra router flags")
    run.add_argument("--worker-args", default="", help="extra flags for every worker")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARG ...")
    sub.add_parser("check", help="exit 77 when namespaces cannot be created here")
    sub.add_parser("clean", help="remove namespaces left by a rig that was SIGKILLed")
    args = top.parse_args(argv)
    if args.cmd_name == "check":
        why = can_create_namespaces()
        print("rig: " + (why or "network namespaces can be created"))
        return SKIP if why else 0
    if args.cmd_name == "clean":
        return cmd_clean(args)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    return cmd_run(args, repo)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Disaggregated serving on one GPU: a prefill and a decode worker as two
processes, both with --device cuda and --kv-transport cuda_ipc (the decode
worker's KV pool is device memory the prefill worker writes through a CUDA
IPC handle). Every request's tokens are compared with tandem-generate
--device cuda (the single-process GPU path), and the KV transfer rate (bytes
moved / summed transfer time, from the workers' metrics; a lower bound, since
a transfer's time includes waiting for compute) is printed beside a
device-to-device copy measured by tandem-backend-gpu-check copy-bw.

Uses the worker harness of tests/integration/test_workers.py.
Usage: workers_gpu.py BIN_DIR
TANDEM_CHECK_BACKEND=cpu runs the same on the CPU with the shm transport (to
check this script where there is no GPU).
Exit 0 pass, 1 fail, 77 no device. Prints "INFO transfer ..." and "PASS"/"FAIL"
lines.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = sys.argv[1]
sys.argv = [sys.argv[0], BIN, os.path.join(HERE, "..", "..", "..", "shared")]
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import test_workers as tw  # noqa: E402

DEVICE = os.environ.get("TANDEM_CHECK_BACKEND") or "cuda"


def reference_gpu(model, req):
    cmd = [os.path.join(BIN, "tandem-generate"), "--model", model, "--json", "--device", DEVICE,
           "--prompt-tokens", ",".join(map(str, req["prompt_tokens"])),
           "--max-tokens", str(req["max_tokens"]), "--temperature", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError("tandem-generate --device %s failed: %s" % (DEVICE, out.stderr))
    return json.loads(out.stdout)["tokens"]


def main():
    probe = subprocess.run([os.path.join(BIN, "tandem-backend-gpu-check"), "copy-bw"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode == 77 and DEVICE == "cuda":
        print("SKIP no CUDA device")
        sys.exit(77)
    tmp = tempfile.mkdtemp(prefix="tandem-gpu-workers-")
    model = os.path.join(tmp, "15m")
    subprocess.run([os.path.join(BIN, "make-test-model"), "--format", "hf", "--shape", "15m",
                    "--dtype", "bf16", "--seed", "3", "--out", model], check=True,
                   capture_output=True)
    gpu = ("--device", DEVICE, "--kv-transport", "cuda_ipc" if DEVICE == "cuda" else "shm")
    ok = True
    try:
        pf = tw.Worker("prefill", model, *gpu)
        dc = tw.Worker("decode", model, *gpu)
        reqs = tw.make_requests(16, 32000, 256, False, tag="gpu")
        res = tw.run_cli(dc, [pf], reqs)
        same = 0
        for r in reqs:
            got = res[r["id"]]
            if got["status"] != "OK":
                print("FAIL %s: status %s %s" % (r["id"], got["status"], got.get("error", "")))
                ok = False
                continue
            want = reference_gpu(model, r)
            if got["tokens"] == want:
                same += 1
            else:
                print("FAIL %s: tokens differ from single-process GPU\n got %s\nwant %s"
                      % (r["id"], got["tokens"][:16], want[:16]))
                ok = False
        m = pf.metrics()  # the prefill side counts the bytes it sends
        moved = m.get("tandem_kv_transfer_bytes_total", 0.0)
        secs = m.get("tandem_transfer_seconds_sum", 0.0)
        out = subprocess.run([os.path.join(BIN, "tandem-backend-gpu-check"), "copy-bw"],
                             capture_output=True, text=True, timeout=60)
        copy = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "copy-bw failed"
        # A transfer's time runs from its first post to its end, so it
        # includes waiting for later layers to compute: a lower bound.
        print("INFO transfer %.1f MB in %.3f s summed: %.2f GB/s, at least (%s)"
              % (moved / 1e6, secs, moved / secs / 1e9 if secs > 0 else 0.0, copy))
        print("%s disaggregated on one %s: %d of %d requests identical to single-process"
              % ("PASS" if ok else "FAIL", DEVICE, same, len(reqs)))
        ok &= pf.stop() == 0 and dc.stop() == 0
    finally:
        for p in tw.PROCS:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

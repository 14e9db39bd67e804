#!/usr/bin/env python3
"""Compares tandem-generate with the independent numpy reference.

For each case (format, shape, dtype) it writes a model with make-test-model,
runs

  tandem-generate --model M --prompt-tokens P --max-tokens 32 --temperature 0
                  --json --logits-out L

and scores the engine's trajectory with the reference (tests/reference/ref.py)
fed the engine's own tokens (teacher forcing), so one near tie cannot derail
every later step; along that trajectory the reference's argmax at every step
equals the engine's token exactly when the reference's own free greedy decode
equals the engine's. Checks, per step i:

  rel_i = max_v |engine[i][v] - ref[i][v]| / max_v |ref[i][v]|  <= tol(dtype)

  f32: tol 1e-4, and every engine token is the reference's argmax (so the
       greedy tokens are identical, all 32 unless the engine stopped at EOS).
  f16: tol 5e-3; bf16: tol 3e-2 (the weights are identical for both sides,
       widened from the file; the looser bound lets the engine compute in half
       precision). A token may differ from the reference argmax only where the
       reference's top-2 gap is below 2 * tol * max|ref| (a near tie).
  every dtype: each engine token is the argmax of the engine's own logits row
       (the logits file holds the logits that produced token i).

Contract assumed of tandem-generate --json: stdout holds a JSON object (the
last line that parses as one) with the generated ids under "tokens" (the
prompt excluded; a list holding the prompt and then one id per logits row
is trimmed). The logits file is float32 little-endian [n_generated][vocab].

Usage: test_reference.py [--bin-dir DIR] [--generate BIN] [--cases a,b]
                         [--generate-args "..."] [--keep]
Exit 0 pass, 1 fail, 77 skip (tandem-generate not built, or numpy missing).
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

try:
    import numpy as np
except ImportError:
    print("SKIP: numpy is not installed (pip install numpy)")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import ref  # noqa: E402

STEPS = 32
PROMPT = [1, 5, 77, 300, 12]
TOL = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2}

# name: (format, shape, dtype, extra make-test-model args)
CASES = {
    "llama2c-tiny": ("llama2c", "tiny", "f32", []),
    "llama2c-tiny-untied": ("llama2c", "tiny-untied", "f32", []),
    "llama2c-15m": ("llama2c", "15m", "f32", []),
    "hf-tiny-f32": ("hf", "tiny", "f32", []),
    "hf-tiny-mha-f32": ("hf", "tiny-mha", "f32", []),
    "hf-tiny-untied-f32": ("hf", "tiny-untied", "f32", []),
    "hf-tiny-qwen2-f32": ("hf", "tiny-qwen2", "f32", []),
    "hf-tiny-mistral-f32": ("hf", "tiny-mistral", "f32", []),
    "hf-tiny-sharded-f32": ("hf", "tiny-qwen2", "f32", ["--shards", "3"]),
    "hf-tiny-f16": ("hf", "tiny", "f16", []),
    "hf-tiny-bf16": ("hf", "tiny", "bf16", []),
    "hf-tiny-qwen2-bf16": ("hf", "tiny-qwen2", "bf16", []),
    # A real trained model in both formats (from TANDEM_SHARED_DIR; skipped
    # when absent): peaked, structured logits instead of random ones.
    "stories260K-llama2c": ("shared", "models/stories260K/stories260K.bin", "f32", []),
    "stories260K-hf": ("shared", "models/stories260K-hf", "f32", []),
}


def parse_engine_tokens(stdout, prompt, n_rows):
    """Generated ids from the engine's JSON. n_rows: rows in its logits file,
    used to recognise a list that repeats the prompt before the new ids."""
    obj = None
    try:
        obj = json.loads(stdout)
    except ValueError:
        for line in reversed(stdout.strip().splitlines()):
            try:
                cand = json.loads(line)
            except ValueError:
                continue
            if isinstance(cand, dict) and "tokens" in cand:
                obj = cand
                break
    if not isinstance(obj, dict) or not isinstance(obj.get("tokens"), list):
        raise ValueError("no JSON object with a \"tokens\" list on stdout")
    toks = [int(t) for t in obj["tokens"]]
    if len(toks) == n_rows + len(prompt) and toks[: len(prompt)] == prompt:
        toks = toks[len(prompt) :]
    return toks


def run_case(name, spec, a, tmp):
    fmt, shape, dtype, extra = spec
    tol = TOL[dtype]
    prompt = PROMPT
    if fmt == "shared":
        model = os.path.join(a.shared_dir, shape)
        if not os.path.exists(model):
            return [], f"skip: {name:22s} {model} not found"
        fmt, shape, prompt = "real", os.path.basename(shape), [1]
    else:
        model = os.path.join(tmp, name) if fmt == "hf" else os.path.join(tmp, name, "model.bin")
        r = subprocess.run([a.mtm, "--format", fmt, "--shape", shape, "--dtype", dtype, "--seed", "1234", "--out", model,
                            *extra], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return [f"make-test-model failed: {r.stderr.strip()}"], None
    logits_path = os.path.join(tmp, name + ".logits")
    cmd = [a.generate, "--model", model, "--prompt-tokens", ",".join(map(str, prompt)), "--max-tokens", str(STEPS),
           "--temperature", "0", "--json", "--logits-out", logits_path, *shlex.split(a.generate_args)]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return [f"tandem-generate timed out: {' '.join(cmd)}"], None
    t_engine = time.monotonic() - t0
    if r.returncode != 0:
        return [f"tandem-generate exited {r.returncode}: {r.stderr.strip()[-600:]}\n  command: {' '.join(cmd)}"], None
    m = ref.load(model)
    raw = np.fromfile(logits_path, dtype="<f4") if os.path.exists(logits_path) else np.zeros(0, dtype="<f4")
    try:
        etoks = parse_engine_tokens(r.stdout, prompt, raw.size // m.vocab)
    except ValueError as e:
        return [f"{e}; stdout was: {r.stdout[-400:]!r}"], None
    errs = []
    n = len(etoks)
    if raw.size != n * m.vocab:
        return [f"logits file holds {raw.size} floats, expected {n} steps x {m.vocab} vocab = {n * m.vocab}"], None
    elog = raw.astype(np.float64).reshape(n, m.vocab)
    if n == 0 or n > STEPS:
        return [f"engine generated {n} tokens, expected 1..{STEPS}"], None
    if n < STEPS and etoks[-1] not in m.eos_ids:
        errs.append(f"engine stopped after {n} tokens without EOS (last token {etoks[-1]})")

    t0 = time.monotonic()
    _, rlog = ref.generate(m, prompt, n, force=etoks)
    t_ref = time.monotonic() - t0

    rel = np.max(np.abs(elog - rlog), axis=1) / np.max(np.abs(rlog), axis=1)
    worst = int(np.argmax(rel))
    if rel[worst] > tol:
        errs.append(f"logits differ at step {worst}: relative error {rel[worst]:.3e} > {tol:.0e}; "
                    f"steps over tolerance: {np.flatnonzero(rel > tol).tolist()[:10]}")
    own = [int(np.argmax(elog[i])) for i in range(n)]
    bad_own = [i for i in range(n) if own[i] != etoks[i] and elog[i][etoks[i]] != elog[i][own[i]]]
    if bad_own:
        errs.append(f"engine tokens are not the argmax of its own logits rows at steps {bad_own[:10]}")
    near_ties = 0
    rtop = [int(np.argmax(rlog[i])) for i in range(n)]
    if dtype == "f32":
        # Along the engine's trajectory the reference picks the same token at
        # every step exactly when its own free greedy decode equals the
        # engine's tokens, so this is the "identical greedy tokens" check.
        if etoks != rtop:
            i = next(i for i in range(n) if etoks[i] != rtop[i])
            errs.append(f"greedy tokens differ at step {i}: engine chose {etoks[i]}, reference argmax {rtop[i]} "
                        f"(engine so far {etoks[max(0, i - 3):i + 1]})")
    else:
        for i in range(n):
            if etoks[i] == rtop[i]:
                continue
            gap = rlog[i][rtop[i]] - rlog[i][etoks[i]]
            if gap <= 2 * tol * np.max(np.abs(rlog[i])):
                near_ties += 1
            else:
                errs.append(f"step {i}: engine chose {etoks[i]}, reference argmax {rtop[i]} leads by {gap:.3e}")
                break
    status = "FAIL" if errs else "ok"
    summary = (f"{status}: {name:22s} {fmt:7s} {shape:12s} {dtype:4s} steps={n:2d} max_rel={np.max(rel):.2e} "
               f"(tol {tol:.0e}) near_ties={near_ties} engine={t_engine:.2f}s ref={t_ref:.2f}s")
    return errs, summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.environ.get("TANDEM_BIN_DIR", os.path.join(HERE, "../../build/bin")))
    ap.add_argument("--generate", help="tandem-generate binary (default: BIN_DIR/tandem-generate)")
    ap.add_argument("--shared-dir", default=os.environ.get("TANDEM_SHARED_DIR", os.path.join(HERE, "../../../shared")))
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--generate-args", default=os.environ.get("TANDEM_GENERATE_ARGS", ""),
                    help="extra arguments for tandem-generate (e.g. a backend choice)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary models")
    a = ap.parse_args()
    a.mtm = os.path.join(a.bin_dir, "make-test-model")
    a.generate = a.generate or os.path.join(a.bin_dir, "tandem-generate")
    for b in (a.mtm, a.generate):
        if not os.access(b, os.X_OK):
            print(f"SKIP: {b} is not built yet; this comparison runs once it is")
            return 77
    names = [c for c in a.cases.split(",") if c] or list(CASES)
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
        return 2
    tmp = tempfile.mkdtemp(prefix="tandem-ref-")
    failed = skipped = 0
    try:
        for name in names:
            errs, summary = run_case(name, CASES[name], a, tmp)
            print(summary or f"FAIL: {name}")
            skipped += bool(summary and summary.startswith("skip"))
            if errs:
                failed += 1
                for e in errs:
                    print(f"  {name}: {e}")
    finally:
        if a.keep:
            print(f"models kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(names) - failed - skipped}/{len(names)} cases passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""deploy/k8s: every overlay renders and validates offline.

For each overlay under deploy/k8s/overlays: `kubectl kustomize` renders it;
`kubernetes-validate --strict` checks every object against the Kubernetes
schemas (no cluster needed; a manifest with a field the schema lacks is
shown to fail first, so the validator is known to bite); then the rendered
objects are checked for what the deployment relies on: workers register
with the router's internal Service on its gRPC port, worker probes are gRPC
(grpc.health.v1), the router's readiness is GET /health, every pod template
has Prometheus scrape annotations, a PodDisruptionBudget covers each role,
workers spread over nodes, the secrets come from the Secret, and the gpu
overlay requests nvidia.com/gpu with the nccl transport and NCCL settings.

Exit 77 when kubectl or kubernetes-validate (scripts/deps.sh installs it
from PyPI) is missing.

Usage: test_k8s.py SOURCE_DIR
"""
import os
import shutil
import subprocess
import sys
import tempfile

SRC = sys.argv[1]
FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def container(obj):
    return obj["spec"]["template"]["spec"]["containers"][0]


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def check_overlay(name, objs):
    kinds = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    svc = kinds.get(("Service", "tandem-router-internal"))
    check(svc is not None and svc["spec"].get("publishNotReadyAddresses") is True and
          any(p["port"] == 50051 for p in svc["spec"]["ports"]),
          "%s: tandem-router-internal lists the router before it is ready, on 50051" % name)
    conf = kinds[("ConfigMap", "tandem-config")]["data"]
    router = kinds[("Deployment", "tandem-router")]
    rc = container(router)
    check(rc["readinessProbe"]["httpGet"]["path"] == "/health", "%s: router readiness" % name)
    check("secretKeyRef" in env_of(rc)["TANDEM_CLUSTER_TOKEN"]["valueFrom"],
          "%s: router's cluster token from the Secret" % name)
    for role in ("prefill", "decode"):
        sts = kinds.get(("StatefulSet", "tandem-" + role))
        if not check(sts is not None, "%s: StatefulSet tandem-%s" % (name, role)):
            continue
        c = container(sts)
        check("router = tandem-router-internal:50051" in conf[role + ".conf"],
              "%s: %s registers with the router's Service" % (name, role))
        check(any(a.startswith("--config=/etc/tandem/%s.conf" % role) for a in c["args"]),
              "%s: %s reads its config" % (name, role))
        check(any(a.startswith("--listen=$(POD_IP):") for a in c["args"]),
              "%s: %s listens on (and advertises) its pod IP" % (name, role))
        port = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"][0]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            check(c.get(probe, {}).get("grpc", {}).get("port") == port,
                  "%s: %s %s is a gRPC health check on %d" % (name, role, probe, port))
        ann = sts["spec"]["template"]["metadata"].get("annotations", {})
        check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port"),
              "%s: %s Prometheus annotations" % (name, role))
        check("podAntiAffinity" in sts["spec"]["template"]["spec"].get("affinity", {}),
              "%s: %s anti-affinity" % (name, role))
        check(("PodDisruptionBudget", "tandem-" + role) in kinds, "%s: %s PDB" % (name, role))
        sc = sts["spec"]["template"]["spec"]["securityContext"]
        check(sc.get("runAsNonRoot") is True, "%s: %s runs as non-root" % (name, role))
        env = env_of(c)
        res = c["resources"]
        if name == "gpu":
            check(str(res["limits"].get("nvidia.com/gpu")) == "1",
                  "gpu: %s limits nvidia.com/gpu" % role)
            check(env["TANDEM_KV_TRANSPORT"]["value"] == "nccl" and "NCCL_SOCKET_IFNAME" in env,
                  "gpu: %s nccl transport and NCCL env" % role)
        else:
            check("nvidia.com/gpu" not in res.get("limits", {}),
                  "%s: %s asks for no GPU" % (name, role))
            check(env["TANDEM_KV_TRANSPORT"]["value"] == "tcp", "%s: %s tcp" % (name, role))
    ann = router["spec"]["template"]["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true", "%s: router annotations" % name)


def main():
    kubectl = shutil.which("kubectl")
    validate = shutil.which("kubernetes-validate")
    if not kubectl or not validate:
        print("skipped: kubectl (%s) or kubernetes-validate (%s) missing; scripts/deps.sh "
              "installs kubernetes-validate" % (kubectl, validate))
        sys.exit(77)
    try:
        import yaml
    except ImportError:
        print("skipped: PyYAML missing (kubernetes-validate brings it)")
        sys.exit(77)
    tmp = tempfile.mkdtemp(prefix="tandem-k8s-")
    try:
        # The validator bites: an unknown field fails strict validation.
        bad = os.path.join(tmp, "bad.yaml")
        with open(bad, "w") as f:
            f.write("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n"
                    "  ports:\n    - port: 80\n      targetPortt: 8000\n")
        p = subprocess.run([validate, "--strict", "--quiet", bad], capture_output=True,
                           text=True)
        check(p.returncode != 0, "kubernetes-validate accepted an unknown field")
        overlays = os.path.join(SRC, "deploy", "k8s", "overlays")
        names = sorted(os.listdir(overlays))
        check(set(names) >= {"cpu", "gpu"}, "overlays: %s" % names)
        for name in names:
            out = os.path.join(tmp, name + ".yaml")
            p = subprocess.run([kubectl, "kustomize", os.path.join(overlays, name)],
                               capture_output=True, text=True)
            if not check(p.returncode == 0, "%s: kustomize: %s" % (name, p.stderr)):
                continue
            with open(out, "w") as f:
                f.write(p.stdout)
            v = subprocess.run([validate, "--strict", "--quiet", out], capture_output=True,
                               text=True)
            check(v.returncode == 0, "%s: kubernetes-validate: %s%s" % (name, v.stdout,
                                                                        v.stderr))
            objs = [o for o in yaml.safe_load_all(p.stdout) if o]
            print("%s: %d objects rendered and valid" % (name, len(objs)), flush=True)
            check_overlay(name, objs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if FAILURES:
        print("%d check(s) failed" % len(FAILURES))
        sys.exit(1)
    print("all k8s checks passed")


if __name__ == "__main__":
    main()

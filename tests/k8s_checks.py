"""deploy/k8s checkers for tests/test_k8s_render.py and tests/test_k8s_resources.py: each returns a list
of problems; the tests assert it is empty, and non-empty on a broken copy."""

from __future__ import annotations

import base64
import re

from k8s_render import (
    SERVER_COMMANDS,
    containers,
    find,
    flags,
    mount_source,
    pod_specs,
    trainer_config,
    trainer_containers,
)

KSERVE_DEPLOYMENT_MODES = {"RawDeployment", "Serverless", "Standard"}
PYTORCHJOB_SPEC_KEYS = {"runPolicy", "pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode"}
PYTORCHJOB_RUNPOLICY_KEYS = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                             "schedulingPolicy", "suspend", "managedBy"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
TOKEN_LIKE = re.compile(r"[A-Za-z0-9_+/=.\-]{16,}")


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

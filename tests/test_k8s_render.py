"""deploy/k8s rendered with kubectl kustomize and validated against the Kubernetes OpenAPI schemas;
every reference a pod makes resolves (see tests/k8s_render.py for what is and is not checked)."""

from __future__ import annotations

import copy

import pytest
from k8s_checks import reference_problems
from k8s_render import (
    CUSTOM_KINDS,
    K8S,
    K8S_VERSIONS,
    NAMESPACE,
    containers,
    docs_fixture,  # noqa: F401 (the docs fixture)
    mount_source,
    needs_kubectl,
    one,
    pod_specs,
    render,
)


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

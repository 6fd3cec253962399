"""Which rewards an instance serves: --rewards spec strings, the YAML file, env vars, batching flags,
and that a served alias reaches clients through ListRewards."""

from __future__ import annotations

import grpc
import pytest

from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc
from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward import main as reward_main
from epgrpo.services.reward.config import BatchingConfig, RewardEntry, load_config_file, merge_entries, parse_spec


def test_parse_spec():
    assert parse_spec(" digit , jpeg_compressibility,") == [RewardEntry("digit", "digit"),
                                                             RewardEntry("jpeg_compressibility", "jpeg_compressibility")]
    assert parse_spec("clip_l=clipscore:path=/m/clip-l;dtype=float16") == [
        RewardEntry("clip_l", "clipscore", {"path": "/m/clip-l", "dtype": "float16"})]
    assert parse_spec("judge=vlm_judge:url=http://vllm:8000/v1") == [
        RewardEntry("judge", "vlm_judge", {"url": "http://vllm:8000/v1"})]
    for bad, message in [("=clipscore", "expected \\[name=\\]backend"), ("ocr:threads", "option 'threads': expected key=value")]:
        with pytest.raises(InvalidArgument, match=message):
            parse_spec(bad)


def test_yaml_file(tmp_path):
    path = tmp_path / "rewards.yaml"
    path.write_text(
        "rewards:\n"
        "  digit:\n"
        "  judge: {backend: vlm_judge, url: 'http://h:1/v1', pattern: 'Score: ([0-9]{1,2})', score_max: 10}\n"
        "batching: {max_size: 16, max_delay_ms: 3}\n"
    )
    entries, batching = load_config_file(path)
    assert entries == [RewardEntry("digit", "digit"),
                       RewardEntry("judge", "vlm_judge", {"url": "http://h:1/v1", "pattern": "Score: ([0-9]{1,2})", "score_max": 10})]
    assert batching == BatchingConfig(16, 3)
    path.write_text("batching: {max_size: 16, delay: 3}\n")
    with pytest.raises(InvalidArgument, match="'batching' takes max_size and max_delay_ms"):
        load_config_file(path)
    path.write_text("reward: {}\n")
    with pytest.raises(InvalidArgument, match="expected a mapping with keys 'rewards'"):
        load_config_file(path)


def test_merge_drops_repeats_but_rejects_conflicts():
    assert merge_entries(parse_spec("digit,jpeg_compressibility"), parse_spec("digit")) == parse_spec("digit,jpeg_compressibility")
    with pytest.raises(InvalidArgument, match="'ocr' is configured twice, differently"):
        merge_entries(parse_spec("ocr"), parse_spec("ocr:threads=1"))


def test_resolution_order_of_flags_env_and_file(tmp_path, monkeypatch):
    for name in ("EPGRPO_REWARDS", "EPGRPO_REWARDS_CONFIG", "EPGRPO_BATCH_MAX_SIZE", "EPGRPO_BATCH_MAX_DELAY_MS"):
        monkeypatch.delenv(name, raising=False)
    entries, batching = reward_main.resolve_rewards(reward_main.parse_args([]))
    assert [e.name for e in entries] == reward_main.DEFAULT_REWARDS.split(",") and not batching.enabled
    monkeypatch.setenv("EPGRPO_REWARDS", "ocr:threads=1")
    monkeypatch.setenv("EPGRPO_BATCH_MAX_SIZE", "8")
    entries, batching = reward_main.resolve_rewards(reward_main.parse_args([]))
    assert entries == [RewardEntry("ocr", "ocr", {"threads": "1"})] and batching == BatchingConfig(8, 0.0)
    config = tmp_path / "r.yaml"
    config.write_text("rewards: {jpeg_compressibility: {}}\nbatching: {max_size: 4, max_delay_ms: 7}\n")
    monkeypatch.delenv("EPGRPO_REWARDS")
    args = reward_main.parse_args(["--rewards-config", str(config), "--batch-max-delay-ms", "1.5"])
    entries, batching = reward_main.resolve_rewards(args)  # the file alone: no default rewards added
    assert [e.name for e in entries] == ["jpeg_compressibility"] and batching == BatchingConfig(8, 1.5)
    args = reward_main.parse_args(["--rewards-config", str(config), "--rewards", "digit"])
    assert [e.name for e in reward_main.resolve_rewards(args)[0]] == ["jpeg_compressibility", "digit"]


def test_cli_reports_bad_options_before_serving(capsys):
    assert reward_main.main(["--rewards", "jpeg_compressibility,ocr:threads=two", "--port", "0"]) == 2
    assert "rewards: ocr: option threads: expected int, got 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reward_main.parse_args(["--batch-max-size", "0"])


def test_an_alias_is_served_and_listed_under_its_name(background_server):
    server = background_server(reward_main.build_registrar(["cheap=jpeg_compressibility"]))
    with grpc.insecure_channel(server.address) as channel:
        rewards = reward_pb2_grpc.RewardServiceStub(channel).ListRewards(reward_pb2.ListRewardsRequest(), timeout=30).rewards
    assert [(r.name, r.range) for r in rewards] == [("cheap", "(-inf, 0)")] and "JPEG" in rewards[0].description


def test_list_rewards_prints_every_backend_with_what_it_computes(capsys):
    from epgrpo.services.reward.backends.base import available_backends

    assert reward_main.main(["--list-rewards"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == available_backends()
    assert "edit distance" in out and "logit_scale" in out and "/v1/chat/completions" in out

"""Prometheus endpoint and structured access logs, scraped and read from real servers."""

from __future__ import annotations

import io
import json
import logging
import queue
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epgrpo.protos import codec
from epgrpo.protos.channel import PRUNER_SERVICE, REWARD_SERVICE
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc
from epgrpo.services.common import metrics
from epgrpo.services.common.logs import JsonFormatter, configure_logging
from epgrpo.services.common.server import ServerConfig
from epgrpo.services.pruner.main import build_registrar
from epgrpo.services.reward import metrics as reward_metrics  # noqa: F401 - Score's extractor, for CountingReward


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} from the /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def checkpoint(group: str, step: int, ids, scores=None) -> pruner_pb2.GroupCheckpoint:
    scores = np.linspace(0, 1, len(ids)) if scores is None else scores
    return pruner_pb2.GroupCheckpoint(group_id=group, step=step, trajectory_ids=list(ids),
                                      scores=pruner_pb2.ScoreList(values=[float(s) for s in scores]))


@pytest.fixture
def access_log():
    """The access logger's records as parsed JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("epgrpo.access")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not assignment: it clears the loggers' isEnabledFor caches
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_pruner_metrics_and_access_log(background_server, access_log):
    server = background_server(build_registrar("127.0.0.1:1"), ServerConfig(metrics_port=0))
    port = server.running.metrics_port
    channel = grpc.insecure_channel(server.address)
    stub = pruner_pb2_grpc.PrunerServiceStub(channel)
    requests: queue.Queue = queue.Queue()
    requests.put(pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
        rollout_id="it7", num_steps=10, schedule=[pruner_pb2.Checkpoint(step=4, keep=4)])))
    responses = stub.PruneRollout(iter(requests.get, None), timeout=10)
    for group in ("it7-g0", "it7-g1"):
        requests.put(pruner_pb2.PruneStreamRequest(checkpoint=checkpoint(group, 4, range(8))))
        assert len(next(responses).survivor_ids) == 4
    during = scrape(port)  # the stream is still open
    assert sample(during, "epgrpo_grpc_requests_in_flight", service=PRUNER_SERVICE, method="PruneRollout") == 1
    requests.put(None)
    assert list(responses) == []
    stub.Prune(pruner_pb2.PruneRequest(checkpoint=checkpoint("u", 1, range(6)), keep=2), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Prune(pruner_pb2.PruneRequest(checkpoint=checkpoint("bad", 1, range(6)), keep=0), timeout=5)
    channel.close()

    m = scrape(port)
    rollout, prune = dict(service=PRUNER_SERVICE, method="PruneRollout"), dict(service=PRUNER_SERVICE, method="Prune")
    assert sample(m, "epgrpo_grpc_requests_total", **rollout, code="OK") == 1
    assert sample(m, "epgrpo_grpc_requests_total", **prune, code="OK") == 1
    assert sample(m, "epgrpo_grpc_requests_total", **prune, code="INVALID_ARGUMENT") == 1
    assert sample(m, "epgrpo_grpc_requests_in_flight", **rollout) == 0
    assert sample(m, "epgrpo_grpc_request_duration_seconds_count", **prune) == 2
    assert sample(m, "epgrpo_grpc_request_duration_seconds_sum", **prune) > 0
    assert sample(m, "epgrpo_grpc_messages_total", **rollout, direction="in") == 3  # open + 2 checkpoints
    assert sample(m, "epgrpo_grpc_messages_total", **rollout, direction="out") == 2
    # Batch sizes: 8 trajectories per checkpoint (x2), 6 in each unary request (x2).
    assert sample(m, "epgrpo_batch_size_count", **rollout) == 2 and sample(m, "epgrpo_batch_size_sum", **rollout) == 16
    assert sample(m, "epgrpo_batch_size_sum", **prune) == 12
    assert sample(m, "epgrpo_batch_size_bucket", **rollout, le="8.0") == 2
    assert sample(m, "epgrpo_pruner_trajectories_total", outcome="kept") == 4 + 4 + 2
    assert sample(m, "epgrpo_pruner_trajectories_total", outcome="pruned") == 4 + 4 + 4

    lines = {line["rpc"].rsplit("/", 1)[1] + ":" + line["code"]: line for line in access_log() if "rpc" in line}
    stream_line = lines["PruneRollout:OK"]
    assert stream_line["rollout_id"] == "it7" and stream_line["group_ids"] == ["it7-g0", "it7-g1"]
    assert stream_line["items"] == 16 and stream_line["messages_in"] == 3 and stream_line["ms"] > 0
    assert lines["Prune:INVALID_ARGUMENT"]["group_ids"] == ["bad"] and lines["Prune:INVALID_ARGUMENT"]["level"] == "WARNING"
    assert stream_line["peer"].startswith("ipv4:127.0.0.1:")


class CountingReward(reward_pb2_grpc.RewardServiceServicer):
    async def Score(self, request, context):
        return reward_pb2.ScoreResponse(scores=[0.5] * request.images.shape[0])


def test_reward_batch_sizes_and_request_ids(background_server, access_log):
    def register(server):
        reward_pb2_grpc.add_RewardServiceServicer_to_server(CountingReward(), server)
        return [REWARD_SERVICE]

    server = background_server(register, ServerConfig(metrics_port=0))
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for n in (3, 16, 5):
            images = codec.encode(np.zeros((n, 8, 8, 1), np.uint8))
            stub.Score(reward_pb2.ScoreRequest(images=images, prompts=["p"] * n, request_id=f"it2/it2-g{n}/step4"),
                       timeout=5)
    m = scrape(server.running.metrics_port)
    score = dict(service=REWARD_SERVICE, method="Score")
    assert sample(m, "epgrpo_batch_size_count", **score) == 3 and sample(m, "epgrpo_batch_size_sum", **score) == 24
    assert sample(m, "epgrpo_batch_size_bucket", **score, le="4.0") == 1
    assert sample(m, "epgrpo_batch_size_bucket", **score, le="16.0") == 3
    assert sample(m, "epgrpo_grpc_requests_total", **score, code="OK") == 3
    ids = [line.get("request_id") for line in access_log() if line.get("rpc", "").endswith("/Score")]
    assert ids == ["it2/it2-g3/step4", "it2/it2-g16/step4", "it2/it2-g5/step4"]


def test_each_service_registers_the_extractors_of_its_own_messages():
    """By message class, not by name: a renamed message fails at import instead of zeroing metrics."""
    import epgrpo.services.pruner.servicer  # noqa: F401
    import epgrpo.services.reward.servicer  # noqa: F401

    requests = {reward_pb2.ScoreRequest, pruner_pb2.PruneStreamRequest, pruner_pb2.PruneRequest}
    assert requests <= set(metrics.REQUEST_ITEMS)
    assert pruner_pb2.PruneDecision in metrics.DECISION_COUNTS
    ids: dict = {}
    request = reward_pb2.ScoreRequest(images=codec.encode(np.zeros((3, 2, 2, 1), np.uint8)), request_id="r1")
    assert metrics.REQUEST_ITEMS[reward_pb2.ScoreRequest](request, ids) == 3 and ids == {"request_id": "r1"}
    decision = pruner_pb2.PruneDecision(survivor_ids=[1, 4], proxy_scores=[0.1, 0.2, 0.3, 0.4, 0.5])
    assert metrics.DECISION_COUNTS[pruner_pb2.PruneDecision](decision) == (2, 3)
    with pytest.raises(TypeError, match="protobuf message class"):
        metrics.request_items("ScoreRequest")
    with pytest.raises(ValueError, match="already counted by"):
        metrics.request_items(reward_pb2.ScoreRequest)(lambda message, ids: 0)


def test_json_log_format_is_one_object_per_line(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", "json")
    try:
        logging.getLogger("epgrpo.test").warning("hello %s", "world", extra={"fields": {"group_id": "g1"}})
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    entry = json.loads(line)
    assert entry["msg"] == "hello world" and entry["level"] == "WARNING" and entry["group_id"] == "g1"
    with pytest.raises(ValueError, match="--log-format"):
        configure_logging("INFO", "xml")


def test_trainer_tensorboard_has_reward_nfe_pruning_ratio_and_step_time(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from epgrpo.trainer.report import MetricsWriter

    writer = MetricsWriter(tmp_path)
    record = {"iteration": 1, "reward_mean": 0.5, "nfe": 102, "nfe_full": 144, "iteration_s": 1.5,
              "survivors_per_step": [24, 24, 24, 12, 12, 6]}
    writer.write("metrics", record, 1)
    writer.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["pruning_ratio"] == 0.75 and line["nfe_ratio"] == pytest.approx(102 / 144)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
    assert scalars["metrics/pruning_ratio"] == 0.75 and scalars["metrics/reward_mean"] == 0.5
    assert scalars["metrics/nfe"] == 102 and scalars["metrics/nfe_full"] == 144 and scalars["metrics/iteration_s"] == 1.5
    assert scalars["metrics/nfe_ratio"] == pytest.approx(102 / 144)

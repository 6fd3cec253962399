"""pruner.deadline_s bounds each pruning decision, not the stream: a rollout (and, with waves, the
other waves' denoising) may take longer than it between checkpoints; an unanswered decision fails
within it, retryably."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc
from epgrpo.trainer.clients import PrunerClient, ServiceCallError
from epgrpo.trainer.rollout import GroupState

SCHEDULE = [(1, 4), (2, 2)]


def group(ids, seed=0):
    previews = torch.rand(len(ids), 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return GroupState("g0", list(ids), previews, "a handwritten digit 3")


def test_a_stream_outlives_its_deadline_when_each_decision_is_in_time(services):
    _, pruner = services
    client = PrunerClient(pruner.address, deadline_s=1.0)
    try:
        with client.open(SCHEDULE, 4, [("jpeg_compressibility", 1.0)], rollout_id="long") as stream:
            first = stream.decide(1, 0.5, [group(range(8))])["g0"]
            time.sleep(1.5)  # the denoising between two checkpoints takes longer than deadline_s
            second = stream.decide(2, 0.3, [group(first, seed=1)])["g0"]
    finally:
        client.close()
    assert len(first) == 4 and len(second) == 2 and set(second) <= set(first)


class Silent(pruner_pb2_grpc.PrunerServiceServicer):
    """Reads the stream and never answers."""

    def PruneRollout(self, request_iterator, context):
        for _ in request_iterator:
            pass
        return iter(())


@pytest.fixture
def silent_pruner():
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pruner_pb2_grpc.add_PrunerServiceServicer_to_server(Silent(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_an_unanswered_decision_fails_within_the_deadline_retryably(silent_pruner):
    client = PrunerClient(silent_pruner, deadline_s=1.0)
    start = time.monotonic()
    try:
        with pytest.raises(ServiceCallError) as info, client.open(SCHEDULE, 4, [("jpeg_compressibility", 1.0)]) as stream:
            stream.decide(1, 0.5, [group(range(8))])
    finally:
        client.close()
    assert 0.9 < time.monotonic() - start < 10
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and info.value.retryable
    assert "no decision within pruner.deadline_s=1 s" in str(info.value)

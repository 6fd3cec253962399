"""gRPC clients of the reward and pruner services, as the trainer uses them.

Channels come from ``epgrpo.protos.channel`` (size limits, retries for UNAVAILABLE, round_robin
over replicas); every call carries a deadline. Failures surface as :class:`ServiceCallError`
naming the service, the method, the status code and the server's message.
"""

from __future__ import annotations

import queue
import uuid
from typing import Sequence

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.channel import PRUNER_SERVICE, REWARD_SERVICE, create_channel
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.trainer.rollout import GroupState

STRATEGIES = {"ovf": pruner_pb2.STRATEGY_OVF, "random": pruner_pb2.STRATEGY_RANDOM}


class ServiceCallError(RuntimeError):
    def __init__(self, service: str, method: str, error: grpc.RpcError):
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        super().__init__(f"{service}.{method} failed: {code.name if code else 'ERROR'}: {details}")
        self.code = code


def _specs(rewards: Sequence[tuple[str, float]]) -> list[tensor_pb2.RewardSpec]:
    return [tensor_pb2.RewardSpec(name=n, weight=w) for n, w in rewards]


class RewardClient:
    def __init__(self, address: str, deadline_s: float = 60.0, max_batch: int = 256):
        self.channel = create_channel(address, [REWARD_SERVICE])
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.deadline_s = deadline_s
        self.max_batch = max_batch

    def list_rewards(self) -> dict[str, str]:
        try:
            response = self.stub.ListRewards(reward_pb2.ListRewardsRequest(), timeout=self.deadline_s)
        except grpc.RpcError as e:
            raise ServiceCallError("reward", "ListRewards", e) from e
        return {r.name: r.description for r in response.rewards}

    def require(self, names: Sequence[str], field: str) -> None:
        """Fails fast, before any work, when the service does not serve a reward we need."""
        served = self.list_rewards()
        missing = [n for n in names if n not in served]
        if missing:
            raise ValueError(f"{field}: reward service does not serve {', '.join(missing)}; it serves: {', '.join(sorted(served))}")

    def score(self, images: np.ndarray, prompts: Sequence[str], rewards: Sequence[tuple[str, float]],
              request_id: str = "") -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Combined scores [N] and each reward's raw scores; sent in chunks of ``max_batch``."""
        combined, raw = [], {}
        for start in range(0, len(images), self.max_batch):
            chunk = slice(start, start + self.max_batch)
            request = reward_pb2.ScoreRequest(
                images=codec.encode(np.ascontiguousarray(images[chunk])), prompts=list(prompts[chunk]),
                rewards=_specs(rewards), request_id=request_id,
            )
            try:
                response = self.stub.Score(request, timeout=self.deadline_s)
            except grpc.RpcError as e:
                raise ServiceCallError("reward", "Score", e) from e
            combined.append(np.asarray(response.scores, dtype=np.float32))
            for r in response.per_reward:
                raw.setdefault(r.name, []).append(np.asarray(r.scores, dtype=np.float32))
        return np.concatenate(combined), {k: np.concatenate(v) for k, v in raw.items()}

    def close(self) -> None:
        self.channel.close()


class PrunerClient:
    def __init__(self, address: str, deadline_s: float = 600.0):
        self.channel = create_channel(address, [PRUNER_SERVICE])
        self.stub = pruner_pb2_grpc.PrunerServiceStub(self.channel)
        self.deadline_s = deadline_s

    def open(self, schedule: Sequence[tuple[int, int]], num_steps: int, proxy_rewards: Sequence[tuple[str, float]],
             strategy: str = "ovf", seed: int = 0, decoder: str = "pixel", rollout_id: str | None = None) -> "PrunerStream":
        message = pruner_pb2.OpenRollout(
            rollout_id=rollout_id or uuid.uuid4().hex, schedule=[pruner_pb2.Checkpoint(step=s, keep=k) for s, k in schedule],
            strategy=STRATEGIES[strategy], proxy_rewards=_specs(proxy_rewards), seed=seed, num_steps=num_steps,
            decoder=decoder,
        )
        return PrunerStream(self.stub, message, self.deadline_s)

    def select_by_scores(self, group_id: str, trajectory_ids: Sequence[int], scores: np.ndarray, keep: int,
                         strategy: str = "ovf", seed: int = 0) -> list[int]:
        """One stateless decision on precomputed scores (used for OVF after full sampling)."""
        request = pruner_pb2.PruneRequest(
            checkpoint=pruner_pb2.GroupCheckpoint(group_id=group_id, trajectory_ids=list(trajectory_ids),
                                                  scores=pruner_pb2.ScoreList(values=[float(s) for s in scores])),
            keep=keep, strategy=STRATEGIES[strategy], seed=seed,
        )
        try:
            return list(self.stub.Prune(request, timeout=self.deadline_s).survivor_ids)
        except grpc.RpcError as e:
            raise ServiceCallError("pruner", "Prune", e) from e

    def close(self) -> None:
        self.channel.close()


class PrunerStream:
    """One bidirectional stream per rollout; ``decide`` sends every group's checkpoint, then
    reads one decision per group (pipelined)."""

    def __init__(self, stub, open_message: pruner_pb2.OpenRollout, deadline_s: float):
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(pruner_pb2.PruneStreamRequest(open=open_message))
        self._responses = stub.PruneRollout(iter(self._requests.get, None), timeout=deadline_s)
        self.rollout_id = open_message.rollout_id

    def decide(self, step: int, sigma: float, groups: Sequence[GroupState]) -> dict[str, list[int]]:
        for g in groups:
            self._requests.put(pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
                group_id=g.group_id, step=step, sigma=sigma, trajectory_ids=g.trajectory_ids,
                previews=codec.encode(g.previews.float().cpu()), prompts=[g.prompt],
            )))
        decisions = {}
        try:
            for _ in groups:
                d = next(self._responses)
                decisions[d.group_id] = list(d.survivor_ids)
        except grpc.RpcError as e:
            raise ServiceCallError("pruner", "PruneRollout", e) from e
        return decisions

    def close(self) -> None:
        self._requests.put(None)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass

    def __enter__(self) -> "PrunerStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

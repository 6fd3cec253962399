"""The trainer's client of the reward services: byte-bounded chunks with several in flight, whole
groups for group-aware rewards, and a router when each reward has its own service
(``reward.services``). Retries and errors are ``clients``'s (one budget per chunk)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Sequence

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.channel import DEFAULT_MAX_MESSAGE_BYTES, REWARD_SERVICE, ChannelSecurity, create_channel
from epgrpo.protos.reward_names import served_name
from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.trainer.clients import RetryBudget, ServiceCallError, capped_deadline, reward_specs, security_from


def group_chunks(groups: Sequence[str], bytes_per_item: int, max_bytes: int, max_items: int,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[np.ndarray]:
    """Index arrays of whole groups (in order of first appearance), packed greedily into chunks of at
    most ``max_bytes`` / ``max_items`` (``codec.batch_slices``' limits): what a group-aware reward needs,
    since it scores each image against the rest of its group. A group over the limits is a chunk of its
    own; one over the channel's message limit cannot be sent at all (ValueError)."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    size = max(1, min(max_items, max_bytes // max(1, bytes_per_item)))
    chunks, current = [], []
    for g, indices in members.items():
        if len(indices) * bytes_per_item > max_message_bytes * 0.95:  # leave room for prompts and metadata
            raise ValueError(f"groups: group {g!r} has {len(indices)} images of {bytes_per_item} bytes, over the "
                             f"{max_message_bytes} byte message limit; a group-aware reward needs a group in one "
                             "request: use smaller groups or images")
        if current and len(current) + len(indices) > size:
            chunks.append(np.asarray(current))
            current = []
        current.extend(indices)
    if current:
        chunks.append(np.asarray(current))
    return chunks


def _contiguous(indices: np.ndarray) -> bool:
    return len(indices) > 0 and bool((np.diff(indices) == 1).all())


class RewardClient:
    """One reward service. ``score`` sends a batch as byte-bounded chunks (``codec.batch_slices``),
    up to ``max_in_flight`` at a time, so no legal batch exceeds the message limit and transfer
    overlaps scoring. With ``groups`` (each image's GRPO group, sent as metadata ``group``) and a
    group-aware reward among those asked for (ListRewards says which), chunks hold whole groups."""

    def __init__(self, address: str, deadline_s: float = 60.0, max_batch: int = codec.DEFAULT_MAX_REQUEST_ITEMS,
                 security: ChannelSecurity = ChannelSecurity(), retry_budget_s: float = 120.0,
                 max_request_bytes: int = codec.DEFAULT_MAX_REQUEST_BYTES, max_in_flight: int = 4):
        self.address = address
        self.channel = create_channel(address, [REWARD_SERVICE], security=security)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.deadline_s = deadline_s
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self.retry = RetryBudget(retry_budget_s)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="reward-chunk")
        self._group_aware: set[str] | None = None  # served group-aware rewards, from the first ListRewards

    @classmethod
    def from_config(cls, section) -> "RewardClient":
        """From ``config.reward``; token from ``token_file``, $EPGRPO_REWARD_TOKEN or $EPGRPO_TOKEN."""
        return cls(section.address, deadline_s=section.deadline_s, retry_budget_s=section.retry_budget_s,
                   security=security_from(section))

    def _call(self, method: str, request, what: str):
        def attempt(limit):
            try:
                return getattr(self.stub, method)(request, timeout=capped_deadline(self.deadline_s, limit))
            except grpc.RpcError as e:
                raise ServiceCallError("reward", method, e) from e

        return self.retry.call(attempt, f"reward service ({self.address}) {what}")

    def list_rewards(self) -> dict[str, str]:
        response = self._call("ListRewards", reward_pb2.ListRewardsRequest(), "ListRewards")
        self._group_aware = {r.name for r in response.rewards if r.group_aware}
        return {r.name: r.description for r in response.rewards}

    def group_aware(self, names: Sequence[str]) -> bool:
        """Whether any of these rewards scores groups jointly (asks the service once; an older service
        without the field says none)."""
        if self._group_aware is None:
            self.list_rewards()
        return any(n in self._group_aware for n in names)

    def require(self, names: Sequence[str], field: str) -> None:
        """Fails fast, before any work, when the service does not serve a reward we need."""
        served = self.list_rewards()
        missing = [n for n in names if served_name(n) not in served]  # frames(digit) needs digit
        if missing:
            raise ValueError(f"{field}: reward service does not serve {', '.join(missing)}; it serves: {', '.join(sorted(served))}")

    def score(self, images: np.ndarray, prompts: Sequence[str], rewards: Sequence[tuple[str, float]],
              request_id: str = "", groups: Sequence | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Combined scores [N] and each reward's raw scores. Scoring is idempotent, so a chunk that
        failed on a dead replica is simply sent again (each chunk has its own retry budget).
        ``groups``: N group ids (any values, compared as strings), for group-aware rewards."""
        metadata = None
        if groups is not None:
            groups = [str(g) for g in groups]
            if len(groups) != len(images):
                raise ValueError(f"groups: expected {len(images)} group ids (one per image), got {len(groups)}")
            metadata = [tensor_pb2.Metadata(fields={"group": g}) for g in groups]
        if groups is not None and len(images) and self.group_aware([n for n, _ in rewards]):
            parts = group_chunks(groups, images[:1].nbytes, self.max_request_bytes, self.max_batch)
        else:
            parts = [np.arange(s.start, s.stop) for s in
                     codec.batch_slices(len(images), images[:1].nbytes, self.max_request_bytes, self.max_batch)]

        def send(k: int, part: np.ndarray) -> reward_pb2.ScoreResponse:
            chunk = images[part.min():part.max() + 1] if _contiguous(part) else images[part]  # a view if it can
            request = reward_pb2.ScoreRequest(
                images=codec.encode(np.ascontiguousarray(chunk)), prompts=[prompts[i] for i in part],
                metadata=None if metadata is None else [metadata[i] for i in part],
                rewards=reward_specs(rewards), request_id=request_id if len(parts) == 1 else f"{request_id}#{k}",
            )
            return self._call("Score", request, f"Score {request.request_id}")

        if len(parts) <= 1:
            responses = [send(0, part) for part in parts]
        else:
            futures = [self._pool.submit(send, k, part) for k, part in enumerate(parts)]
            try:
                responses = [f.result() for f in futures]
            finally:
                for f in futures:
                    f.cancel()
        if not responses:
            return np.zeros(0, np.float32), {name: np.zeros(0, np.float32) for name, _ in rewards}
        # Chunks of whole groups need not be contiguous: every answer goes back to its own images.
        combined = np.zeros(len(images), np.float32)
        raw: dict[str, np.ndarray] = {}
        for part, response in zip(parts, responses):
            combined[part] = np.asarray(response.scores, dtype=np.float32)
            for r in response.per_reward:
                raw.setdefault(r.name, np.zeros(len(images), np.float32))[part] = np.asarray(r.scores, np.float32)
        return combined, raw

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.channel.close()


class RewardRouter:
    """Rewards spread over several reward services (``reward.services``): each reward is scored
    by its own service, or by the default one. The combined score is the sum of each service's
    weighted sum, i.e. the single-service combination split by reward."""

    def __init__(self, default: RewardClient, routes: dict[str, RewardClient]):
        self.default, self.routes = default, dict(routes)
        self.address = default.address
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.clients())), thread_name_prefix="reward-route")

    def clients(self) -> list[RewardClient]:
        return list({id(c): c for c in (self.default, *self.routes.values())}.values())

    def split(self, rewards: Sequence[tuple[str, float]]) -> list[tuple[RewardClient, list[tuple[str, float]]]]:
        parts: dict[int, tuple[RewardClient, list]] = {}
        for name, weight in rewards:
            client = self.routes.get(name, self.routes.get(served_name(name), self.default))
            parts.setdefault(id(client), (client, []))[1].append((name, weight))
        return list(parts.values())

    def require(self, names: Sequence[str], field: str) -> None:
        for client, specs in self.split([(n, 1.0) for n in names]):
            client.require([n for n, _ in specs], field)

    def score(self, images: np.ndarray, prompts: Sequence[str], rewards: Sequence[tuple[str, float]],
              request_id: str = "", groups: Sequence | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        parts = self.split(rewards)
        futures = [self._pool.submit(client.score, images, prompts, specs, request_id, groups)
                   for client, specs in parts]
        results = [f.result() for f in futures]
        combined = np.sum([c.astype(np.float64) for c, _ in results], axis=0).astype(np.float32)
        return combined, {name: values for _, raw in results for name, values in raw.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients():
            client.close()


def reward_client_from_config(section) -> "RewardClient | RewardRouter":
    """``config.reward``: one client, or a router when ``reward.services`` names per-reward services
    (each entry an address, or a mapping overriding any of the section's connection options)."""
    clients: dict[tuple, RewardClient] = {}

    def client(overrides: dict) -> RewardClient:
        merged = replace(section, **overrides)
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in clients:
            clients[key] = RewardClient.from_config(merged)
        return clients[key]

    default = client({})
    if not section.services:
        return default
    routes = {name: client({"address": entry} if isinstance(entry, str) else dict(entry))
              for name, entry in section.services.items()}
    return RewardRouter(default, routes)

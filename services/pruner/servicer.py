"""PrunerService over gRPC: proto <-> arrays, validation, and calls into the pure parts.

The algorithm lives in ``ovf`` and ``session``; previews are decoded by ``decode`` and scored by
the reward service through ``proxy``. Expected errors propagate as typed exceptions and
``map_errors`` turns them into statuses naming the field.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.channel import DEFAULT_MAX_MESSAGE_BYTES
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc
from epgrpo.services.common.admission import reserve, unreserve
from epgrpo.services.common.errors import FailedPrecondition, InvalidArgument, show
from epgrpo.services.common.limits import check_count, check_id, metadata_dicts, texts
from epgrpo.services.common.server import map_errors
from epgrpo.services.pruner import metrics as _metrics  # noqa: F401 - registers this service's metric extractors
from epgrpo.services.pruner.decode import Decoder, decoder_descriptions, get_decoder_async
from epgrpo.services.pruner.proxy import ProxyScorer
from epgrpo.services.pruner.session import RolloutSession, check_ids, check_scores, select_survivors, strategy_or_raise

GROUP_KEY = "group"  # the reward service's per-image group metadata (services/reward/backends/base.py)

log = logging.getLogger("epgrpo.pruner")

PREVIEW_DTYPES = ("float16", "bfloat16", "float32")
# Copies of a checkpoint's text the upstream Score requests hold: the request objects, their
# serialization, and the prompt/metadata lists built here.
UPSTREAM_COPIES = 3
WHOLE_GROUP_BYTES = int(0.95 * DEFAULT_MAX_MESSAGE_BYTES)  # room left for prompts and metadata (proxy.py)


@dataclass(frozen=True)
class _ProxyConfig:
    """How a checkpoint's previews become scores (from OpenRollout, or from a unary PruneRequest)."""

    rewards: tuple[tuple[str, float], ...]
    rewards_field: str  # where the client sets the rewards, for error messages
    decoder: Decoder


async def _proxy_config(reward_specs, decoder_name: str, prefix: str) -> _ProxyConfig:
    rewards = []
    for i, spec in enumerate(reward_specs):
        if not spec.name:
            raise InvalidArgument(f"{prefix}proxy_rewards[{i}].name: expected a reward name, got ''")
        if not math.isfinite(spec.weight):
            raise InvalidArgument(f"{prefix}proxy_rewards[{i}].weight: expected a finite number, got {spec.weight}")
        rewards.append((spec.name, spec.weight))
    return _ProxyConfig(tuple(rewards), f"{prefix}proxy_rewards",
                        await get_decoder_async(decoder_name, f"{prefix}decoder"))


def _per_trajectory(values: list, n: int, field: str, what: str) -> list:
    """One entry broadcast to the group (the same object n times: nothing is copied), or one per trajectory."""
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InvalidArgument(f"{field}: expected 1 {what} (broadcast to the group) or {n} (one per trajectory), "
                              f"got {len(values)}")
    return values


def check_whole_group_bytes(images: np.ndarray, group_size: int) -> None:
    """A group-aware proxy scores a whole group in one upstream request: refuse a group whose
    decoded images cannot fit in one, at its first part rather than after holding all of them."""
    per_image = images[:1].nbytes
    if group_size * per_image > WHOLE_GROUP_BYTES:
        raise InvalidArgument(
            f"checkpoint.group_size: a group-aware proxy reward scores a group in one request, but {group_size} "
            f"decoded images of {per_image} bytes take {group_size * per_image} bytes, over the {WHOLE_GROUP_BYTES} "
            "bytes one request may carry; use smaller groups or previews")


class PrunerServicer(pruner_pb2_grpc.PrunerServiceServicer):
    def __init__(self, scorer: ProxyScorer):
        self.scorer = scorer
        # Rollout streams open right now; state lives only as long as its stream.
        self.active_sessions = 0

    async def _proxy_scores(self, checkpoint, n: int, proxy: _ProxyConfig, request_id: str,
                            whole_group: bool = False) -> np.ndarray:
        """The N proxy scores of a checkpoint: given, or previews decoded and scored upstream."""
        kind = checkpoint.WhichOneof("proxy")
        if kind == "scores":
            return check_scores(checkpoint.scores.values, n)
        if kind is None:
            raise InvalidArgument("checkpoint.proxy: expected previews (a Tensor) or scores, got neither")
        images, prompts, metadata, reserved = await self._proxy_inputs(checkpoint, n, proxy)
        try:
            return await self.scorer.score(images, prompts, metadata, proxy.rewards, request_id, whole_group)
        finally:
            unreserve(reserved)

    @staticmethod
    def _checked_previews(checkpoint, n: int, proxy: _ProxyConfig) -> np.ndarray:
        """A previews checkpoint's tensor (a view), its rewards, dtype and shape checked: cheap, so a
        bad request is answered before any call upstream (a reward service failure never masks it)."""
        if not proxy.rewards:
            raise InvalidArgument(f"{proxy.rewards_field}: expected at least one reward to score checkpoint.previews, "
                                  "got none")
        previews = codec.to_numpy(checkpoint.previews, "checkpoint.previews", dtypes=PREVIEW_DTYPES)
        if previews.ndim not in (4, 5):
            raise InvalidArgument(f"checkpoint.previews.shape: expected [N, C, H, W] (images) or [N, C, F, H, W] "
                                  f"(videos), got {list(previews.shape)}")
        if previews.shape[0] != n:
            raise InvalidArgument(f"checkpoint.previews.shape: expected {n} previews (one per trajectory id), "
                                  f"got {previews.shape[0]}")
        return previews

    async def _proxy_inputs(self, checkpoint, n: int, proxy: _ProxyConfig) -> tuple[np.ndarray, list, list, int]:
        """A previews checkpoint's decoded uint8 images, prompts and metadata (each image's ``group``:
        the checkpoint's group_id, for group-aware proxy rewards), and the bytes reserved in the
        memory budget for the text the upstream requests will carry (``unreserve`` them once scored)."""
        previews = self._checked_previews(checkpoint, n, proxy)
        codec.finite_or_raise(previews, "checkpoint.previews")
        # counts first: nothing is copied out of a checkpoint whose lists do not match its ids
        check_count(len(checkpoint.prompts), (1, n), "checkpoint.prompts", "prompts (1: broadcast to the group, "
                    f"{n}: one per trajectory)")
        check_count(len(checkpoint.metadata), (0, 1, n), "checkpoint.metadata", "entries (1: broadcast to the group, "
                    f"{n}: one per trajectory)")
        prompts = _per_trajectory(texts(checkpoint.prompts, "checkpoint.prompts"), n, "checkpoint.prompts", "prompt")
        metadata = metadata_dicts(checkpoint.metadata, "checkpoint.metadata")
        metadata = _per_trajectory(metadata, n, "checkpoint.metadata", "entry") if metadata else [{}] * n
        metadata = [{**m, GROUP_KEY: checkpoint.group_id} for m in metadata]
        # One prompt or entry broadcast to every trajectory is copied into each upstream request (and
        # its serialization): budget what is built, not what was received.
        text = sum(map(len, prompts)) + sum(len(k) + len(v) for m in metadata for k, v in m.items())
        reserved = UPSTREAM_COPIES * text
        await reserve(reserved, "checkpoint.prompts/metadata broadcast to the group")
        # Off the event loop: a latent decoder (VAE) takes real compute.
        try:
            images = await asyncio.to_thread(proxy.decoder, previews, "checkpoint.previews")
        except BaseException:
            unreserve(reserved)
            raise
        return images, prompts, metadata, reserved

    async def _whole_group(self, checkpoint, proxy: _ProxyConfig) -> bool:
        """Whether this checkpoint's previews must be scored as one whole group (a group-aware proxy)."""
        return checkpoint.WhichOneof("proxy") == "previews" and bool(proxy.rewards) and \
            await self.scorer.group_aware(proxy.rewards)

    @staticmethod
    def _decision(checkpoint, survivors: list[int], scores: np.ndarray, keep: int) -> pruner_pb2.PruneDecision:
        return pruner_pb2.PruneDecision(group_id=checkpoint.group_id, step=checkpoint.step, survivor_ids=survivors,
                                        proxy_scores=scores.tolist(), keep=keep)

    @staticmethod
    def _part_shape(checkpoint) -> tuple[int, ...] | None:
        """Per-trajectory shape of a checkpoint's proxy, to compare a group's parts: () for scores."""
        kind = checkpoint.WhichOneof("proxy")
        if kind == "scores":
            return ()
        return tuple(checkpoint.previews.shape[1:]) if kind == "previews" else None

    @map_errors
    async def PruneRollout(self, request_iterator, context):
        # A coroutine writing with context.write (not an async generator), so a client that goes
        # away cancels exactly this frame and the `finally` below runs at once.
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return  # the client closed without opening anything
        if first.WhichOneof("message") != "open":
            raise FailedPrecondition(f"first message must be 'open', got {first.WhichOneof('message')!r}")
        opened = first.open
        check_id(opened.rollout_id, "open.rollout_id")  # logged below: bounded first
        session = RolloutSession.create([(c.step, c.keep) for c in opened.schedule], opened.num_steps,
                                        opened.strategy, opened.seed, opened.rollout_id)
        proxy = await _proxy_config(opened.proxy_rewards, opened.decoder, "open.")
        rollout = opened.rollout_id or "<unnamed>"
        self.active_sessions += 1
        decisions = parts = 0
        log.info("rollout %s opened: schedule %s over %d steps, strategy %s", rollout,
                 [(c.step, c.keep) for c in session.schedule], session.num_steps,
                 pruner_pb2.Strategy.Name(session.strategy))  # validated by RolloutSession.create
        try:
            async for request in requests:
                if request.WhichOneof("message") != "checkpoint":
                    raise FailedPrecondition(f"message: rollout {show(rollout)} is already open; "
                                             f"expected 'checkpoint', got {request.WhichOneof('message')!r}")
                checkpoint = request.checkpoint
                part_shape = self._part_shape(checkpoint)
                _, ids = session.validate(checkpoint.group_id, checkpoint.step, checkpoint.trajectory_ids,
                                          checkpoint.group_size, part_shape)
                request_id = f"{rollout}/{checkpoint.group_id}/step{checkpoint.step}"
                if checkpoint.WhichOneof("proxy") == "previews":
                    self._checked_previews(checkpoint, len(ids), proxy)
                if await self._whole_group(checkpoint, proxy):
                    # A group-aware proxy scores each preview against its whole group: the parts'
                    # decoded images wait in the session until the last part, then go in one request.
                    images, prompts, metadata, reserved = await self._proxy_inputs(checkpoint, len(ids), proxy)
                    held = reserved + images.nbytes  # until the group's last part: in the budget meanwhile
                    try:
                        check_whole_group_bytes(images, checkpoint.group_size or len(ids))
                        await reserve(images.nbytes, "checkpoint.previews (parts held until the group is complete)")
                        collected = session.collect(checkpoint.group_id, checkpoint.step, ids, checkpoint.group_size,
                                                    part_shape, (images, prompts, metadata, held))
                    except BaseException:
                        unreserve(held)
                        raise
                    parts += 1
                    decision = None
                    if collected is not None:
                        payloads = collected.payloads
                        try:
                            scores = await self.scorer.score(
                                np.concatenate([part[0] for part in payloads]),
                                [p for part in payloads for p in part[1]], [m for part in payloads for m in part[2]],
                                proxy.rewards, request_id, whole_group=True)
                        finally:
                            unreserve(sum(part[3] for part in payloads))
                        decision = session.finish(checkpoint.group_id, collected, scores)
                else:
                    if len(ids) < checkpoint.group_size:  # one of several parts: tell them apart upstream
                        request_id += f"/part@{session.received(checkpoint.group_id)}"
                    # A part's previews are scored as it arrives and dropped: only its scores are kept.
                    scores = await self._proxy_scores(checkpoint, len(ids), proxy, request_id)
                    parts += 1
                    decision = session.add(checkpoint.group_id, checkpoint.step, ids, scores, checkpoint.group_size,
                                           part_shape)
                if decision is None:
                    log.debug("rollout %s group %s step %d: part of %d ids (group_size %d)", rollout,
                              checkpoint.group_id, checkpoint.step, len(ids), checkpoint.group_size)
                    continue
                log.debug("rollout %s group %s step %d: %d -> %d (%d part%s)", rollout, checkpoint.group_id,
                          checkpoint.step, len(decision.trajectory_ids), decision.keep, decision.parts,
                          "" if decision.parts == 1 else "s")
                await context.write(self._decision(checkpoint, decision.survivors, decision.scores, decision.keep))
                decisions += 1
            incomplete = session.incomplete()
            if incomplete:
                raise InvalidArgument("checkpoint.group_size: the stream ended before every part of a split "
                                      "checkpoint arrived: " + "; ".join(incomplete))
        finally:
            self.active_sessions -= 1
            log.info("rollout %s closed after %d decisions over %d groups (%d checkpoint messages)", rollout,
                     decisions, session.num_groups, parts)

    @map_errors
    async def Prune(self, request, context):
        if not request.HasField("checkpoint"):
            raise InvalidArgument("checkpoint: required")
        checkpoint = request.checkpoint
        if checkpoint.step < 0:
            raise InvalidArgument(f"checkpoint.step: expected >= 0, got {checkpoint.step}")
        ids = check_ids(checkpoint.trajectory_ids)
        if checkpoint.group_size not in (0, len(ids)):
            raise InvalidArgument(f"checkpoint.group_size: a Prune request holds the whole group; expected 0 or "
                                  f"{len(ids)} (the number of trajectory ids), got {checkpoint.group_size}")
        if not 1 <= request.keep <= len(ids):
            raise InvalidArgument(f"keep: expected 1 <= keep <= {len(ids)} (the number of trajectory ids), "
                                  f"got {request.keep}")
        strategy_or_raise(request.strategy, "strategy")
        proxy = await _proxy_config(request.proxy_rewards, request.decoder, "")
        request_id = f"prune/{checkpoint.group_id}/step{checkpoint.step}"
        scores = await self._proxy_scores(checkpoint, len(ids), proxy, request_id,
                                          whole_group=await self._whole_group(checkpoint, proxy))
        survivors = select_survivors(ids, scores, request.keep, request.strategy, request.seed,
                                     checkpoint.group_id, checkpoint.step)
        log.debug("prune group %s step %d: %d -> %d", checkpoint.group_id, checkpoint.step, len(ids), request.keep)
        return self._decision(checkpoint, survivors, scores, request.keep)

    @map_errors
    async def ListDecoders(self, request, context):
        return pruner_pb2.ListDecodersResponse(decoders=[
            pruner_pb2.DecoderInfo(name=name, description=text) for name, text in decoder_descriptions().items()])

"""gRPC clients of the reward and pruner services, as the trainer uses them.

Channels come from ``epgrpo.protos.channel`` (size limits, round_robin over every replica,
TLS / token, retries for UNAVAILABLE through the service config); every call carries a deadline.
On top of the channel's few fast retries, each call is retried with backoff inside a total
budget (:class:`RetryBudget`): a replica that dies is routed around at once, a service that
restarts is waited for, and one that stays away ends the run with :class:`ServicesUnavailable`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.channel import PRUNER_SERVICE, ChannelSecurity, create_channel, is_budget_rejection, read_token
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, tensor_pb2
from epgrpo.trainer.rollout import GroupState

log = logging.getLogger("epgrpo.clients")

STRATEGIES = {"ovf": pruner_pb2.STRATEGY_OVF, "random": pruner_pb2.STRATEGY_RANDOM}
# Worth retrying: the server is down/restarting, or did not answer in time. Anything else
# (bad request, unauthenticated, unknown reward) would fail the same way again.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
T = TypeVar("T")


class ServiceCallError(RuntimeError):
    def __init__(self, service: str, method: str, error: grpc.RpcError):
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        super().__init__(f"{service}.{method} failed: {code.name if code else 'ERROR'}: {details}")
        self.service, self.method, self.code = service, method, code
        # RESOURCE_EXHAUSTED from a server's full memory budget (not from a too-large message)
        self.budget_rejection = is_budget_rejection(error)

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE or self.budget_rejection


class ServicesUnavailable(RuntimeError):
    """A service stayed unreachable for a whole retry budget; the run cannot go on."""

    def __init__(self, what: str, budget_s: float, attempts: int, last: ServiceCallError):
        super().__init__(f"{what}: gave up after {attempts} attempts over the {budget_s:g} s retry budget; "
                         f"last error: {last}")
        self.last = last
        self.checkpoint = None  # set by whoever saves what the run has before exiting
        self.hint = ""  # what to do instead, when no checkpoint could be saved


class PeerServiceFailure(ServiceCallError):
    """Another rank's service call failed retryably in this iteration: every rank retries it together
    (data-parallel ranks re-run an iteration in step, or their collectives would stop lining up)."""

    def __init__(self):
        RuntimeError.__init__(self, "another rank's service call failed; every rank retries the iteration")
        self.service, self.method, self.code, self.budget_rejection = "peer", "", grpc.StatusCode.UNAVAILABLE, False


class PeerGaveUp(ServicesUnavailable):
    """Another rank gave up on its services: every rank stops together (and saves the same checkpoint)."""

    def __init__(self):
        RuntimeError.__init__(self, "another rank's service stayed unreachable for its whole retry budget "
                                    "(its log names the service); every rank stops")
        self.last, self.checkpoint, self.hint = None, None, ""


class PeerRejected(ServiceCallError):
    """Another rank's service call was rejected (not retryable, e.g. a reward the service does not
    serve): every rank stops with the same kind of error, none waits for the others in a checkpoint."""

    def __init__(self):
        RuntimeError.__init__(self, "another rank's service call was rejected (its log names the service and "
                                    "why); every rank stops")
        self.service, self.method, self.code, self.budget_rejection = "peer", "", grpc.StatusCode.INVALID_ARGUMENT, False


@dataclass
class RetryBudget:
    """Retries retryable :class:`ServiceCallError` s with exponential backoff until ``total_s``
    have passed since the first failure; then raises :class:`ServicesUnavailable`."""

    total_s: float = 120.0
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 5.0
    retries: int = 0  # retries made so far, over all calls (for metrics and tests)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def call(self, fn: Callable[[float | None], T], what: str, on_retry: Callable[[], None] | None = None,
             agree: Callable[[bool], bool] | None = None) -> T:
        """``fn(limit)`` runs one attempt; ``limit`` is None on the first attempt, then the budget
        left (callers clamp their deadlines to it, so giving up never waits a full deadline more).
        ``agree(out_of_budget)``, when given, turns each give-up decision into a common one (ranks
        that fail in step must also stop in step): it returns whether anyone gives up."""
        first_failure, backoff, attempts, limit = None, self.initial_backoff_s, 0, None
        while True:
            attempts += 1
            try:
                return fn(limit)
            except ServiceCallError as e:
                if not e.retryable:
                    raise
                now = self.clock()
                first_failure = now if first_failure is None else first_failure
                left = self.total_s - (now - first_failure)
                give_up = left <= 0 if agree is None else agree(left <= 0)
                if give_up:
                    raise ServicesUnavailable(what, self.total_s, attempts, e) from e
                wait = max(0.0, min(backoff, left))
                log.warning("%s: %s; retry %d in %.2f s (%.1f s of the %g s budget left)", what, e, attempts,
                            wait, left, self.total_s)
                self.sleep(wait)
                backoff = min(backoff * 2, self.max_backoff_s)
                limit = max(0.5, left - wait)
                self.retries += 1
                if on_retry is not None:
                    on_retry()


def reward_specs(rewards: Sequence[tuple[str, float]]) -> list[tensor_pb2.RewardSpec]:
    return [tensor_pb2.RewardSpec(name=n, weight=w) for n, w in rewards]


def security_from(section) -> ChannelSecurity:
    """TLS + token of a RewardConfig / PrunerConfig; the token never lives in the config (it
    is written to out_dir): it comes from ``token_file`` or the environment."""
    token = read_token(section.token_file, (section.token_env, "EPGRPO_TOKEN"))
    return ChannelSecurity(tls_ca=section.tls_ca, tls_cert=section.tls_cert, tls_key=section.tls_key,
                           server_name=section.tls_server_name, token=token)


def capped_deadline(base: float, limit: float | None) -> float:
    return base if limit is None else min(base, limit)


class PrunerClient:
    """The pruner service. A pruning stream sends each group's previews as byte-bounded parts of at
    most ``max_request_bytes`` (``codec.batch_slices``; GroupCheckpoint.group_size), so no group
    size or resolution exceeds the message limit."""

    def __init__(self, address: str, deadline_s: float = 600.0, security: ChannelSecurity = ChannelSecurity(),
                 retry_budget_s: float = 120.0, max_request_bytes: int = codec.DEFAULT_MAX_REQUEST_BYTES):
        self.address = address
        self.channel = create_channel(address, [PRUNER_SERVICE], security=security)
        self.stub = pruner_pb2_grpc.PrunerServiceStub(self.channel)
        self.deadline_s = deadline_s
        self.max_request_bytes = max_request_bytes
        self.retry = RetryBudget(retry_budget_s)  # a broken stream: see Trainer.iteration_with_retries

    @classmethod
    def from_config(cls, section) -> "PrunerClient":
        """From ``config.pruner``; token from ``token_file``, $EPGRPO_PRUNER_TOKEN or $EPGRPO_TOKEN."""
        return cls(section.address, deadline_s=section.deadline_s, retry_budget_s=section.retry_budget_s,
                   security=security_from(section))

    def open(self, schedule: Sequence[tuple[int, int]], num_steps: int, proxy_rewards: Sequence[tuple[str, float]],
             strategy: str = "ovf", seed: int = 0, decoder: str = "pixel", rollout_id: str | None = None,
             preview_frames: str = "all") -> "PrunerStream":
        """A pruning stream. ``preview_frames="first"``: of video previews [n, C, F, H, W] only the
        first latent frame goes to the pruner (``prune.preview_frames``)."""
        message = pruner_pb2.OpenRollout(
            rollout_id=rollout_id or uuid.uuid4().hex, schedule=[pruner_pb2.Checkpoint(step=s, keep=k) for s, k in schedule],
            strategy=STRATEGIES[strategy], proxy_rewards=reward_specs(proxy_rewards), seed=seed, num_steps=num_steps,
            decoder=decoder,
        )
        return PrunerStream(self.stub, message, self.deadline_s, self.max_request_bytes, preview_frames)

    def list_decoders(self) -> dict[str, str] | None:
        """The pruner's preview decoders by name; None for a pruner that predates ListDecoders."""
        def attempt(limit):
            try:
                return self.stub.ListDecoders(pruner_pb2.ListDecodersRequest(), timeout=capped_deadline(30.0, limit))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                raise ServiceCallError("pruner", "ListDecoders", e) from e

        response = self.retry.call(attempt, f"pruner service ({self.address}) ListDecoders")
        return None if response is None else {d.name: d.description for d in response.decoders}

    def require_decoder(self, name: str, field: str = "model.preview_decoder") -> None:
        """Fails fast, before any sampling, when the pruner cannot decode this model's previews."""
        served = self.list_decoders()
        if served is None or name in served:
            return
        raise ValueError(f"{field}: the pruner at {self.address} has no preview decoder {name!r}; it has: "
                         f"{', '.join(sorted(served))}; start it with --vae {name}=DIR (the model's VAE, or a "
                         f"pipeline directory with vae/), or set {field} to one it has")

    def select_by_scores(self, group_id: str, trajectory_ids: Sequence[int], scores: np.ndarray, keep: int,
                         strategy: str = "ovf", seed: int = 0, use_budget: bool = True) -> list[int]:
        """One stateless decision on precomputed scores (used for OVF after full sampling).
        ``use_budget=False``: one attempt (the channel's own retries only), for callers with a fallback."""
        request = pruner_pb2.PruneRequest(
            checkpoint=pruner_pb2.GroupCheckpoint(group_id=group_id, trajectory_ids=list(trajectory_ids),
                                                  scores=pruner_pb2.ScoreList(values=[float(s) for s in scores])),
            keep=keep, strategy=STRATEGIES[strategy], seed=seed,
        )

        def attempt(limit):
            try:
                return list(self.stub.Prune(request, timeout=capped_deadline(self.deadline_s, limit)).survivor_ids)
            except grpc.RpcError as e:
                raise ServiceCallError("pruner", "Prune", e) from e

        if not use_budget:
            return attempt(None)
        return self.retry.call(attempt, f"pruner service ({self.address}) Prune {group_id}")

    def close(self) -> None:
        self.channel.close()


# Preview dtypes sent as they are (the pruner decodes each bit-exactly); anything else goes as float32.
_PREVIEW_WIRE_DTYPES = ("float16", "bfloat16", "float32")


class PrunerStream:
    """One bidirectional stream per rollout; ``decide`` sends every group's checkpoint, then
    reads one decision per group (pipelined). A group's previews go as parts of at most
    ``max_request_bytes`` each (all but a small group: one part), in their own dtype when it is
    float16 / bfloat16 / float32; a part is encoded only when gRPC takes it for sending, so the
    stream holds about one part's bytes, not a whole step's. A broken stream is not resumed: the
    rollout is run again from the start (its noise is seeded, so it is the same rollout)."""

    def __init__(self, stub, open_message: pruner_pb2.OpenRollout, deadline_s: float,
                 max_request_bytes: int = codec.DEFAULT_MAX_REQUEST_BYTES, preview_frames: str = "all"):
        if preview_frames not in ("all", "first"):
            raise ValueError(f"prune.preview_frames: expected all or first, got {preview_frames!r}")
        self.preview_frames = preview_frames
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(pruner_pb2.PruneStreamRequest(open=open_message))
        # deadline_s bounds each decision (decide), not the stream: a stream lives through its rollout's
        # denoising, which with waves includes the other waves' (an idle stream costs the server nothing)
        self.deadline_s = deadline_s
        self._expired = threading.Event()
        # no deadline for the whole stream (timeout=None): each decision has its own timer (decide)
        self._responses = stub.PruneRollout(self._outgoing(), timeout=None)
        self.rollout_id = open_message.rollout_id
        self.max_request_bytes = max_request_bytes
        self.messages_sent = 0  # checkpoint messages (parts) so far, for logs and tests

    def _outgoing(self):
        """The request iterator gRPC consumes on its own thread: builds each queued part just in time."""
        for item in iter(self._requests.get, None):
            yield item() if callable(item) else item

    def _parts(self, step: int, sigma: float, g: GroupState) -> list[Callable[[], pruner_pb2.PruneStreamRequest]]:
        previews = g.previews.detach()
        if self.preview_frames == "first" and previews.ndim == 5:  # [n, C, F, H, W]: the first latent frame
            previews = previews[:, :, :1].contiguous()
        if str(previews.dtype).removeprefix("torch.") not in _PREVIEW_WIRE_DTYPES:
            previews = previews.float()
        ids = list(g.trajectory_ids)
        slices = codec.batch_slices(len(ids), previews[:1].nelement() * previews.element_size(),
                                    self.max_request_bytes) or [slice(0, 0)]  # (an empty group: the pruner says why)
        group_size = len(ids) if len(slices) > 1 else 0  # 0: one message holds the whole group, as always

        def part(s: slice) -> pruner_pb2.PruneStreamRequest:
            return pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
                group_id=g.group_id, step=step, sigma=sigma, trajectory_ids=ids[s], group_size=group_size,
                previews=codec.encode(previews[s]), prompts=[g.prompt],
            ))

        return [lambda s=s: part(s) for s in slices]

    def decide(self, step: int, sigma: float, groups: Sequence[GroupState]) -> dict[str, list[int]]:
        for g in groups:
            for part in self._parts(step, sigma, g):
                self._requests.put(part)
                self.messages_sent += 1
        decisions = {}
        timer = threading.Timer(self.deadline_s, self._expire)  # this decision's deadline
        timer.daemon = True
        timer.start()
        try:
            for _ in groups:
                d = next(self._responses)
                decisions[d.group_id] = list(d.survivor_ids)
        except grpc.RpcError as e:
            raise ServiceCallError("pruner", "PruneRollout",
                                   _DecisionDeadline(self.deadline_s) if self._expired.is_set() else e) from e
        except StopIteration:
            raise ServiceCallError("pruner", "PruneRollout", _Ended()) from None
        finally:
            timer.cancel()
        return decisions

    def _expire(self) -> None:
        self._expired.set()
        self._responses.cancel()

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


class _DecisionDeadline(grpc.RpcError):
    """A pruning decision not answered within pruner.deadline_s (the stream is cancelled)."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s

    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return f"no decision within pruner.deadline_s={self.deadline_s:g} s of sending the checkpoint"


class _Ended(grpc.RpcError):
    """The server closed the stream before answering every group (e.g. while shutting down)."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "the pruning stream ended before every group had its decision"

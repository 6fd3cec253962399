"""What the pruner's messages count for in the shared metrics (see services/common/metrics.py)."""

from __future__ import annotations

from epgrpo.protos.v1 import pruner_pb2
from epgrpo.services.common.metrics import decision_counts, request_items


# Group ids an access-log line names (the count of distinct ones follows): one line per stream
# however many groups it holds, and constant work per message.
LOGGED_GROUPS = 8


def _checkpoint(checkpoint: pruner_pb2.GroupCheckpoint, ids: dict) -> int:
    seen = ids.setdefault("_groups", set())  # not logged (underscore); bounded by the session's group limit
    if checkpoint.group_id not in seen:
        seen.add(checkpoint.group_id)
        if len(seen) <= LOGGED_GROUPS:
            ids.setdefault("group_ids", []).append(checkpoint.group_id)
        ids["groups"] = len(seen)
    return len(checkpoint.trajectory_ids)


@request_items(pruner_pb2.PruneStreamRequest)
def stream_request(message: pruner_pb2.PruneStreamRequest, ids: dict) -> int | None:
    """Trajectories per checkpoint; the rollout id of 'open' and each group id for the access log."""
    if message.WhichOneof("message") == "open":
        ids["rollout_id"] = message.open.rollout_id
        return None
    return _checkpoint(message.checkpoint, ids) if message.HasField("checkpoint") else None


@request_items(pruner_pb2.PruneRequest)
def prune_request(message: pruner_pb2.PruneRequest, ids: dict) -> int | None:
    """Trajectories per unary Prune request; its group id for the access log."""
    return _checkpoint(message.checkpoint, ids) if message.HasField("checkpoint") else None


@decision_counts(pruner_pb2.PruneDecision)
def decision(message: pruner_pb2.PruneDecision) -> tuple[int, int]:
    """(kept, pruned) trajectories of one decision."""
    kept = len(message.survivor_ids)
    return kept, max(0, len(message.proxy_scores) - kept)

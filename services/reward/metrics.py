"""What the reward service's messages count for in the shared metrics (see services/common/metrics.py)."""

from __future__ import annotations

from epgrpo.protos.v1 import reward_pb2
from epgrpo.services.common.metrics import request_items


@request_items(reward_pb2.ScoreRequest)
def score_request(message: reward_pb2.ScoreRequest, ids: dict) -> int:
    """Images per Score request; its request_id for the access log."""
    if message.request_id:
        ids.setdefault("request_id", message.request_id)
    return int(message.images.shape[0]) if message.images.shape else 0

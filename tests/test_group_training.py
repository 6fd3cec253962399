"""A short Expand-and-Prune training run with a group-aware reward (pickscore_pairwise on a tiny random
CLIP) as both the training reward and the pruner's proxy, through real reward and pruner servers. The
clients' limits are set so low that previews and final images must be split: the reward backend must
still see every group whole, once per checkpoint and once at the end."""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np

from epgrpo.services.pruner.session import RolloutSession
from epgrpo.services.reward.backends.clip import PickScorePairwise
from epgrpo.services.reward.backends.tiny_clip import save_tiny_clip
from epgrpo.services.reward.config import RewardEntry
from epgrpo.trainer.clients import PrunerClient
from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.loop import Trainer

ITERATIONS, GROUPS = 2, 2


def test_pairwise_reward_training_scores_every_group_whole(background_server, tiny_policy_factory, tmp_path,
                                                           monkeypatch):
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.services.reward.main import build_registrar as reward_registrar

    clip = save_tiny_clip(tmp_path / "clip")
    calls, collected, lock = [], [], threading.Lock()
    score, collect = PickScorePairwise._score, RolloutSession.collect

    def spy_score(self, images, prompts, metadata):
        with lock:
            calls.append((metadata[0].get("group") if metadata else None, len(images)))
        return score(self, images, prompts, metadata)

    def spy_collect(self, *args, **kwargs):
        result = collect(self, *args, **kwargs)
        collected.append(result is not None)  # False: a part that waits for the rest of its group
        return result

    monkeypatch.setattr(PickScorePairwise, "_score", spy_score)
    monkeypatch.setattr(RolloutSession, "collect", spy_collect)
    reward = background_server(reward_registrar([RewardEntry("pickscore_pairwise", "pickscore_pairwise",
                                                             {"path": str(clip)})]))
    pruner = background_server(pruner_registrar(reward.address))
    config = load_config(None, [
        "prune.group_size=8", "prune.steps=[2,4]", "prune.keeps=[4,2]", "sampling.num_steps=6",
        f"train.iterations={ITERATIONS}", f"train.prompts_per_iteration={GROUPS}", "eval.samples_per_prompt=2",
        "eval.every=0", "eval.max_prompts=2", "reward.rewards=pickscore_pairwise:1.0", "reward.judge=",
        "prune.proxy_rewards=pickscore_pairwise:1.0", f"out_dir={tmp_path / 'run'}", "launch_services=false",
        "progress=false",
    ])
    policy = tiny_policy_factory()
    channels, side, _ = policy.latent_shape  # previews are float32 latents; images uint8 [side, side, 1]
    # One image per Score chunk and three previews per stream message: only grouping keeps groups whole.
    reward_client = RewardClient(reward.address, max_request_bytes=side * side)
    pruner_client = PrunerClient(pruner.address, max_request_bytes=3 * 4 * channels * side * side)
    try:
        path = Trainer(config, policy, reward_client, pruner_client).run()
    finally:
        reward_client.close()
        pruner_client.close()
    summary = json.loads(path.read_text())
    metrics = [json.loads(line) for line in (path.parent / "metrics.jsonl").open()]
    assert summary["iterations"] == ITERATIONS and len(metrics) == ITERATIONS
    for m in metrics:
        assert np.isfinite(m["reward_mean"]) and "skipped" not in m
        assert abs(m["reward_mean"] - 0.5) < 1e-6  # win rates average 0.5 in every group
        assert m["survivors_per_step"] == [16, 16, 16, 8, 8, 4]

    preview_calls = Counter(size for group, size in calls if group and group.startswith("it"))
    final_calls = Counter(size for group, size in calls if group and not group.startswith("it"))
    # Each checkpoint scores each group once, whole: 8 previews at step 2, its 4 survivors at step 4 ...
    assert preview_calls == {8: ITERATIONS * GROUPS, 4: ITERATIONS * GROUPS}
    # ... and the trainer's final Score chunks hold whole groups of 2 (one image per chunk otherwise).
    assert final_calls == {2: ITERATIONS * GROUPS}
    assert collected.count(False) > 0, "the pruner client's limit should split groups into parts"
    assert collected.count(True) == 2 * ITERATIONS * GROUPS

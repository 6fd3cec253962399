"""Training monitors every algorithm logs: groups without a learning signal, and reward hacking.

``zero_std_ratio``: the fraction of groups whose kept rewards are all equal (their advantages are 0:
the group costs a rollout and teaches nothing). ``reward_judge_gap``: at each evaluation, the
training reward minus the held-out judge on the same samples, and its growth since the first
evaluation; a gap that grows while the reward rises is the policy learning the reward's quirks
rather than the task (larger, expanded groups find them faster: flow_grpo issue 92).
"""

from __future__ import annotations

import torch


def zero_std_ratio(rewards: torch.Tensor, groups: torch.Tensor) -> float:
    """Fraction of groups (by ``groups`` index) whose rewards are all equal."""
    ids = torch.unique(groups)
    if len(ids) == 0:
        return 0.0
    flat = sum(1 for g in ids if bool((rewards[groups == g] == rewards[groups == g][0]).all()))
    return flat / len(ids)


def reward_judge_gap(record: dict, first: dict | None) -> dict:
    """{'reward_judge_gap': reward - judge, 'reward_judge_gap_growth': its change since ``first``}
    for an evaluation record holding both (else {})."""
    if "judge" not in record:
        return {}
    gap = record["reward"] - record["judge"]
    base = first["reward"] - first["judge"] if first and "judge" in first else gap
    return {"reward_judge_gap": gap, "reward_judge_gap_growth": gap - base}

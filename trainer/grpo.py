"""GRPO advantages and the clipped policy loss (pure torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    eps: float = 1e-4,
    clip: float = 5.0,
    global_std: bool = False,
) -> torch.Tensor:
    """(R - mean_g) / (std_g + eps) per group, clipped to +-clip.

    Pass only the survivors: the mean and std are those of the trajectories that are trained on.
    ``global_std`` divides by the std over all rewards instead (Flow-GRPO option).
    """
    rewards = rewards.double()
    advantages = torch.empty_like(rewards)
    global_scale = rewards.std(unbiased=False) if global_std else None
    for g in torch.unique(group_index):
        members = group_index == g
        r = rewards[members]
        scale = global_scale if global_std else r.std(unbiased=False)
        advantages[members] = (r - r.mean()) / (scale + eps)
    return advantages.clamp(-clip, clip).float()


@dataclass
class LossTerms:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    ratio_mean: float
    clip_fraction: float
    approx_kl: float


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
) -> LossTerms:
    """mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))) + beta mean(KL)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.mean() if kl is not None else torch.zeros((), device=log_prob.device)
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean().item()
        approx_kl = (0.5 * (log_prob - old_log_prob) ** 2).mean().item()
    return LossTerms(policy_loss + beta * kl_mean, policy_loss, kl_mean, ratio.mean().item(), clip_fraction, approx_kl)


class PromptStatTracker:
    """Per-prompt reward statistics for advantages (Flow-GRPO's per-prompt stat tracking).

    ``buffer_size`` 0: each prompt's mean/std come from this iteration's rewards of that prompt
    (its survivors; groups sharing a prompt are pooled), as Flow-GRPO. ``buffer_size`` N > 0: from
    the last N rewards of the prompt across iterations (DDPO's tracker); a prompt with fewer than
    ``min_count`` rewards in its buffer uses the whole batch's mean/std instead. ``global_std``
    divides by the std of all rewards of the batch. The state is JSON (checkpoints).
    """

    def __init__(self, buffer_size: int = 0, min_count: int = 0, global_std: bool = False,
                 eps: float = 1e-4, clip: float = 5.0):
        self.buffer_size, self.min_count, self.global_std = buffer_size, min_count, global_std
        self.eps, self.clip = eps, clip
        self.buffers: dict[str, list[float]] = {}

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        rewards = rewards.double().cpu()
        advantages = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            members = torch.tensor([p == prompt for p in prompts])
            r = rewards[members]
            if self.buffer_size > 0:
                buffer = (self.buffers.get(prompt, []) + r.tolist())[-self.buffer_size:]
                self.buffers[prompt] = buffer
                history = torch.tensor(buffer, dtype=torch.float64)
            else:
                history = r
            if len(history) < max(self.min_count, 1):
                mean, std = batch_mean, batch_std
            else:
                mean, std = history.mean(), history.std(unbiased=False)
            advantages[members] = (r - mean) / ((batch_std if self.global_std else std) + self.eps)
        return advantages.clamp(-self.clip, self.clip).float()

    def state_dict(self) -> dict:
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {k: list(map(float, v)) for k, v in state.get("buffers", {}).items()}

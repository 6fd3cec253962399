"""Options that would be accepted and ignored are refused (exit 2, naming the option and why); a pruner
answer is checked before any row is picked by it."""

import pytest
import torch

from epgrpo.trainer.cli import main
from epgrpo.trainer.config import load_config
from epgrpo.trainer.config_checks import check_sampler_options
from epgrpo.trainer.pruning import select_after_sampling
from epgrpo.trainer.rollout import RolloutResult, rollout, sample_seeds
from epgrpo.trainer.samplers import DDIMSampler, FlowSampler


@pytest.mark.parametrize("overrides, message", [
    (["sampling.sde_window_range=[0,4]"], "sampling.sde_window_range: expected [] without sampling.sde_window_size"),
    (["sampling.sde_window_size=2", "sampling.sde_last_step=true"],
     "sampling.sde_last_step: expected false with sampling.sde_window_size"),
    (["model.preview_vae=/models/vae", "launch_services=false"],
     "model.preview_vae: expected empty with launch_services=false"),
    (["model.dtype=fp16"], "model.dtype: expected auto, fp32 or bf16: fp16 trains without loss scaling"),
])
def test_ignored_or_unsafe_options_exit_2_naming_the_option(overrides, message, capsys):
    assert main(["train", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_sampling_options_the_models_sampler_does_not_read_are_refused():
    from diffusers import DDIMScheduler

    ddim, flow = DDIMSampler.from_scheduler(DDIMScheduler(), 10), FlowSampler.uniform(10)
    for override in ("sampling.shift=3.0", "sampling.noise_level=0.9"):
        with pytest.raises(ValueError, match=f"{override.split('=')[0]}: model.name=sd samples with DDIMSampler, "
                                             "which does not use it"):
            check_sampler_options(load_config(None, ["model.name=sd", override]), ddim)
    with pytest.raises(ValueError, match="sampling.eta: model.name=sd3 samples with FlowSampler, which does not use it"):
        check_sampler_options(load_config(None, ["model.name=sd3", "sampling.eta=0.5"]), flow)
    check_sampler_options(load_config(None, ["model.name=sd", "sampling.eta=0.5"]), ddim)  # the options it reads
    check_sampler_options(load_config(None, ["model.name=sd3", "sampling.shift=3.0", "sampling.noise_level=0.9"]), flow)


def test_the_trainer_refuses_eta_for_the_flow_toy(tiny_policy_factory):
    from epgrpo.trainer.loop import Trainer

    with pytest.raises(ValueError, match="sampling.eta: model.name=toy_digits samples with FlowSampler"):
        Trainer(load_config(None, ["sampling.eta=0.5"]), tiny_policy_factory(), None, None)


class Answers:
    """A pruner session answering each group with ``answer(ids)``."""

    def __init__(self, answer):
        self.answer = answer

    def decide(self, step, sigma, groups):
        return {g.group_id: self.answer(list(g.trajectory_ids)) for g in groups}


@pytest.mark.parametrize("answer, message", [
    (lambda ids: ids[:1] + [max(ids) + 100], "survivors \\[\\d+\\] of group g0 are not among its live trajectories"),
    (lambda ids: ids[:3], "group g0 keeps 3 of 8 trajectories, the schedule says 2"),
    (lambda ids: [ids[0], ids[0]], "group g0 names a survivor twice"),
])
def test_a_pruner_answer_naming_strangers_or_the_wrong_count_stops_the_rollout(tiny_policy_factory, answer, message):
    policy = tiny_policy_factory()
    with pytest.raises(ValueError, match=f"pruner answer at step 2: .*{message}"):
        rollout(policy, ["a handwritten digit 3", "a handwritten digit 8"], 8, FlowSampler.uniform(4),
                seeds=sample_seeds(0, 1, 16), schedule=[(2, 2)], pruner=Answers(answer), group_ids=["g0", "g1"])
    whole = rollout(policy, ["a handwritten digit 3"], 8, FlowSampler.uniform(4), seeds=sample_seeds(0, 1, 8),
                    schedule=[(2, 2)], pruner=Answers(lambda ids: ids), group_ids=["g0"])  # unpruned: allowed
    assert len(whole.trajectory_ids) == 8


class Prune:
    def __init__(self, answer):
        self.answer = answer

    def select_by_scores(self, group_id, ids, scores, keep, use_budget=True):
        return self.answer(list(ids))


def test_full_ovf_checks_the_pruners_answer():
    batch = RolloutResult.__new__(RolloutResult)
    batch.group_index = torch.tensor([0, 0, 0, 0])
    batch.trajectory_ids = torch.tensor([0, 1, 2, 3])
    rewards = torch.arange(4.0).numpy()
    rows, _ = select_after_sampling(Prune(lambda ids: [0, 3]), batch, rewards, 1, 2, fallback=False)
    assert rows.tolist() == [0, 3]
    with pytest.raises(ValueError, match="after sampling \\(full_ovf\\): survivors \\[7\\] of group it1-g0"):
        select_after_sampling(Prune(lambda ids: [0, 7]), batch, rewards, 1, 2, fallback=False)
    with pytest.raises(ValueError, match="it1-g0 keeps 1 of 4 trajectories, the schedule says 2"):
        select_after_sampling(Prune(lambda ids: [1]), batch, rewards, 1, 2, fallback=False)

"""Checkpoints and exact resume: N iterations, stop, resume, M more == N + M uninterrupted."""

import json

import pytest
import torch
from safetensors.torch import load_file

from epgrpo.trainer.checkpoint import latest_checkpoint, save_checkpoint
from epgrpo.trainer.clients import PrunerClient
from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.loop import Trainer

TIMING = ("rollout_s", "train_s", "iteration_s")


# Every stateful part in play: LoRA + AdamW, LR warm-up, EMA, a per-prompt reward buffer, the prompt
# sampler (2 of 10 prompts per iteration), random trained-step subsets, SDE windows, several
# optimizer steps per iteration.
OPTIONS = [
    "prune.group_size=4", "prune.steps=[2]", "prune.keeps=[2]", "sampling.num_steps=5",
    "sampling.sde_window_size=3", "sampling.sde_window_range=[0,5]", "train.prompts_per_iteration=2",
    "train.lr=3e-3", "train.lr_schedule=constant_with_warmup", "train.lr_warmup_iterations=3", "train.ema=true",
    "train.stat_buffer=8", "train.timestep_fraction=0.34", "train.inner_epochs=2", "train.train_batch_size=2",
    "train.gradient_accumulation=1", "reward.rewards=jpeg_compressibility:1", "reward.judge=", "eval.samples_per_prompt=1",
    "eval.every=0", "eval.max_prompts=2", "launch_services=false", "progress=false",
]


def train(services, policy, out, *overrides):
    reward, pruner = services
    config = load_config(None, [*OPTIONS, f"out_dir={out}", *overrides])
    reward_client, pruner_client = RewardClient(reward.address), PrunerClient(pruner.address)
    try:
        trainer = Trainer(config, policy, reward_client, pruner_client)
        trainer.run()
    finally:
        reward_client.close()
        pruner_client.close()
    return trainer


def metrics(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.parametrize("lora_rank", [4, pytest.param(0, marks=pytest.mark.slow)], ids=["lora", "full"])
def test_resume_reproduces_the_uninterrupted_run_exactly(services, tiny_policy_factory, tmp_path, lora_rank):
    straight = train(services, tiny_policy_factory(lora_rank=lora_rank), tmp_path / "a", "train.iterations=3")
    first = train(services, tiny_policy_factory(lora_rank=lora_rank), tmp_path / "b", "train.iterations=2")
    checkpoint = latest_checkpoint(tmp_path / "b")
    assert checkpoint.name == "iter_000002"
    resumed = train(services, tiny_policy_factory(lora_rank=lora_rank), tmp_path / "b", "train.iterations=3",
                    f"train.resume_from={checkpoint}")

    assert resumed.completed_iteration == straight.completed_iteration == 3
    for name, value in straight.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[name], value), name
    assert not all(torch.equal(first.policy.state_dict()[n], v) for n, v in straight.policy.state_dict().items())
    for a, b in zip(straight.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)
    optimizer_a, optimizer_b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert optimizer_a["param_groups"] == optimizer_b["param_groups"]
    for i, state in optimizer_a["state"].items():
        assert all(torch.equal(value, optimizer_b["state"][i][k]) for k, value in state.items()), i
    assert straight.tracker.buffers == resumed.tracker.buffers and straight.tracker.buffers
    assert resumed.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()
    m = metrics(tmp_path / "a")
    assert metrics(tmp_path / "b") == m and len(m) == 3
    assert len({tuple(r["trained_steps"]) for r in m}) > 1  # windows and step subsets vary per iteration
    assert [r["lr"] for r in m] == pytest.approx([0, 1e-3, 2e-3])
    assert all(r["optimizer_steps"] == 4 for r in m)  # 2 epochs x 2 steps (4 trajectories, batches of 2)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["nfe_used"] == straight.nfe_cumulative == resumed.nfe_cumulative


def test_checkpoint_holds_no_pickle_and_resume_latest(services, tiny_policy_factory, tmp_path, caplog):
    trainer = train(services, tiny_policy_factory(lora_rank=4), tmp_path, "train.iterations=2",
                    "train.checkpoint_every=1", "train.checkpoint_keep=1")
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()  # iteration 1's was pruned (keep 1)
    assert checkpoint.name == "iter_000002"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == ["ema.safetensors", "eval.jsonl", "metrics.jsonl", "optimizer.safetensors", "rng_rank0.json",
                     "rng_rank0.safetensors", "state.json", "weights.safetensors"]
    weights = load_file(checkpoint / "weights.safetensors")
    assert set(weights) == set(trainer.policy.state_dict()) and all("lora" in k for k in weights)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["iteration"] == 2 and state["nfe_cumulative"] == trainer.nfe_cumulative
    # the files are Trainer.state_dict(): a safetensors file per tensor group, the rest state.json (keys kept
    # as they were, so older checkpoints load)
    tensors, meta = trainer.state_dict()
    assert list(state) == list(meta) == ["iteration", "world_size", "optimizer", "lr_scheduler", "prompt_rng",
                                         "stat_tracker", "nfe_cumulative", "nfe_full_cumulative", "config", "ema"]
    for group in ("weights", "optimizer", "ema"):
        saved = load_file(checkpoint / f"{group}.safetensors")
        assert set(saved) == {k.partition("/")[2] for k in tensors if k.startswith(f"{group}/")} and saved, group
        assert all(torch.equal(v.cpu(), tensors[f"{group}/{k}"].cpu()) for k, v in saved.items()), group
    # the crashed tail of a run (iteration 3 after the checkpoint) is dropped when resuming
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "reward_mean": 0.0}) + "\n")
    resumed = train(services, tiny_policy_factory(lora_rank=4), tmp_path, "train.iterations=3",
                    "train.resume_from=latest", "train.beta=0.05")
    assert [r["iteration"] for r in metrics(tmp_path)] == [1, 2, 3] and resumed.completed_iteration == 3
    changed = [r.getMessage() for r in caplog.records if "changed option" in r.getMessage()]
    assert len(changed) == 1 and "train.beta: 0.04 -> 0.05" in changed[0]  # iterations may change silently
    assert metrics(tmp_path)[2]["reward_mean"] != 0.0
    # save_checkpoint is callable from outside the loop (e.g. on a fatal error)
    target = save_checkpoint(resumed, tmp_path / "manual")
    assert json.loads((target / "state.json").read_text())["iteration"] == 3


def test_trainer_state_round_trips(services, tiny_policy_factory, tmp_path):
    """load_state_dict(state_dict()) into a fresh trainer restores every part of the state."""
    trained = train(services, tiny_policy_factory(lora_rank=4), tmp_path / "a", "train.iterations=1")
    tensors, meta = trained.state_dict()
    assert {k.partition("/")[0] for k in tensors} == {"weights", "optimizer", "ema"}
    config = load_config(None, [*OPTIONS, f"out_dir={tmp_path / 'b'}", "train.iterations=1"])
    fresh = Trainer(config, tiny_policy_factory(lora_rank=4), None, None)
    assert fresh.completed_iteration == 0 and fresh.rng.getstate() != trained.rng.getstate()
    fresh.load_state_dict({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    again, again_meta = fresh.state_dict()
    assert again_meta.pop("config")["out_dir"] != meta["config"]["out_dir"]  # the config is the new run's
    assert again_meta == {k: v for k, v in meta.items() if k != "config"} and set(again) == set(tensors)
    assert all(torch.equal(again[k], v) for k, v in tensors.items())
    assert fresh.completed_iteration == 1 and fresh.rng.getstate() == trained.rng.getstate()
    without_ema = {k: v for k, v in meta.items() if k != "ema"}
    with pytest.raises(ValueError, match="train.ema: the checkpoint was saved without EMA weights"):
        fresh.load_state_dict(tensors, without_ema)


def test_resume_from_a_missing_checkpoint_is_a_clear_error(services, tiny_policy_factory, tmp_path):
    with pytest.raises(ValueError, match="train.resume_from: .* is not a checkpoint"):
        train(services, tiny_policy_factory(), tmp_path, "train.iterations=1", f"train.resume_from={tmp_path / 'x'}")


class Killed(BaseException):
    """The process dying in the middle of a save (nothing after it runs)."""


def test_resume_latest_skips_a_checkpoint_killed_mid_save(services, tiny_policy_factory, tmp_path, monkeypatch):
    from epgrpo.trainer import checkpoint

    copy = checkpoint.shutil.copyfile

    def killed_at_iteration_3(source, target):  # state.json is written, the metric files are not
        if ".tmp" in str(target) and "iter_000003" in str(target):
            raise Killed()
        return copy(source, target)

    monkeypatch.setattr(checkpoint.shutil, "copyfile", killed_at_iteration_3)
    with pytest.raises(Killed):
        train(services, tiny_policy_factory(lora_rank=4), tmp_path, "train.iterations=4", "train.checkpoint_every=1")
    monkeypatch.setattr(checkpoint.shutil, "copyfile", copy)
    half = tmp_path / "checkpoints" / "iter_000003.tmp"
    assert (half / "state.json").is_file() and not (half / "metrics.jsonl").exists()
    assert latest_checkpoint(tmp_path).name == "iter_000002"
    resumed = train(services, tiny_policy_factory(lora_rank=4), tmp_path, "train.iterations=4",
                    "train.checkpoint_every=1", "train.resume_from=latest")
    assert [r["iteration"] for r in metrics(tmp_path)] == [1, 2, 3, 4] and resumed.completed_iteration == 4
    # the half-written one was replaced by a complete save; checkpoint_keep (2) holds the newest
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000003", "iter_000004"]


def test_a_missing_rng_file_of_this_rank_is_an_error_naming_it(services, tiny_policy_factory, tmp_path):
    train(services, tiny_policy_factory(lora_rank=4), tmp_path, "train.iterations=1")
    (tmp_path / "checkpoints" / "iter_000001" / "rng_rank0.json").unlink()
    with pytest.raises(ValueError, match="train.resume_from: .*iter_000001 has no rng_rank0.safetensors / "
                                         "rng_rank0.json \\(rank 0's RNG state"):
        train(services, tiny_policy_factory(lora_rank=4), tmp_path, "train.iterations=2", "train.resume_from=latest")


def test_extending_a_decaying_lr_schedule_on_resume_is_refused(services, tiny_policy_factory, tmp_path):
    """The linear LR at an iteration depends on train.iterations: resuming with more would silently change it."""
    schedule = "linear"
    train(services, tiny_policy_factory(lora_rank=4), tmp_path, "train.iterations=1", f"train.lr_schedule={schedule}")
    with pytest.raises(ValueError, match=f"train.iterations: the checkpoint's run has 1 iterations and "
                                         f"train.lr_schedule={schedule} decays over them; resuming with 2"):
        train(services, tiny_policy_factory(lora_rank=4), tmp_path, "train.iterations=2",
              f"train.lr_schedule={schedule}", "train.resume_from=latest")
    assert json.loads((tmp_path / "checkpoints" / "iter_000001" / "state.json").read_text())["iteration"] == 1


def test_the_cli_refuses_extending_a_cosine_schedule_with_exit_2(services, tiny_policy_factory, tmp_path, capsys):
    from epgrpo.trainer import cli

    reward, pruner = services
    toy = tiny_policy_factory().model_dir
    args = ["train", *OPTIONS, f"model.path={toy}", "model.device=cpu", f"reward.address={reward.address}",
            f"pruner.address={pruner.address}", f"out_dir={tmp_path}", "train.lr_schedule=cosine"]
    assert cli.main([*args, "train.iterations=1"]) == 0
    assert cli.main([*args, "train.iterations=3", "train.resume_from=latest"]) == 2
    assert "epgrpo: error: train.iterations: the checkpoint's run has 1 iterations" in capsys.readouterr().err
    assert cli.main([*args, "train.iterations=1", "train.resume_from=latest"]) == 0  # the same horizon resumes

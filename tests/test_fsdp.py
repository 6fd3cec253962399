"""FSDP full fine-tuning (``train.fsdp``, torch FSDP2 ``fully_shard``) on 2 gloo CPU ranks with a
tiny random SD3 transformer: sharded updates equal unsharded ones, each rank holds half of every
state, sharded checkpoints resume exactly, and ``epgrpo train`` runs end to end under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epgrpo.trainer.config import load_config

WORKER = Path(__file__).with_name("fsdp_worker.py")
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], cwd: Path, timeout: int = 240) -> str:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", "2", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, "PYTHONPATH": str(WORKER.parent)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_sharded_update_equals_the_unsharded_one_with_half_of_every_state_per_rank(tiny_sd3_dir, tmp_path):
    torchrun([str(WORKER), str(tiny_sd3_dir), str(tmp_path / "record")], tmp_path)
    ranks = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text()) for r in range(2)]
    full = ranks[0]["full"]
    for facts in ranks:  # each rank stores half of the policy, of the reference and of AdamW's moments
        assert facts["dtensor"] and facts["full"] == full
        assert facts["policy"] + ranks[1 - ranks.index(facts)]["policy"] == full
        for key in ("policy", "reference", "optimizer_local"):
            assert abs(facts[key] - full / 2) <= 0.01 * full, (key, facts[key], full)
        assert facts["rollout_diff"] == 0.0  # sampling through the sharded transformer: bit for bit
        assert facts["steps"] == 2 and facts["padded_calls"] == 4

    equal = ranks[0]["equal"]  # vs ONE unsharded process on both ranks' data
    assert equal["moved"] > 1e-3  # two AdamW steps of lr 1e-3 moved the weights
    # the ranks' mean is summed in another order than one process's (last bits); AdamW's first steps
    # (m / sqrt(v)) turn that into up to ~0.3% of lr on weights whose gradient is near zero (measured
    # 2.8e-6; with SGD in place of AdamW the same comparison gives 1.5e-8)
    assert equal["weights_diff"] < 1e-5 and equal["ema_diff"] < 1e-5
    assert equal["grad_norm"][0] == pytest.approx(equal["grad_norm"][1], rel=1e-5)  # global norm of DTensor grads
    assert equal["grad_norm"][1] > 0.02  # above max_grad_norm: clipping scaled both updates
    assert equal["kl"][0] == pytest.approx(equal["kl"][1], rel=1e-4) and equal["kl"][1] > 0  # the sharded reference

    padded = ranks[0]["padded"]  # rank 1 with 2 zero-weight micro-batches vs replicas that all-reduce
    assert padded["moved"] > 5e-4 and padded["weights_diff"] < 1e-7
    assert padded["grad_norm"][0] == pytest.approx(padded["grad_norm"][1], rel=1e-6) and padded["grad_norm"][1] > 0.02


def test_fsdp_needs_full_fine_tuning_and_equal_transformer_calls():
    assert load_config(None, ["train.fsdp=true"]).train.fsdp
    with pytest.raises(ValueError, match=r"model\.lora_rank: expected 0 \(full fine-tuning\) with train\.fsdp=true"):
        load_config(None, ["train.fsdp=true", "model.lora_rank=4"])
    with pytest.raises(ValueError, match=r"sampling\.batch_size: expected 0 with train\.fsdp=true and "
                                         r"pruner\.on_unavailable=no_prune"):
        load_config(None, ["train.fsdp=true", "pruner.on_unavailable=no_prune", "sampling.batch_size=4"])
    load_config(None, ["train.fsdp=true", "pruner.on_unavailable=no_prune"])  # one call per step: fine


def test_the_sharder_refuses_lora(tiny_sd3_dir):
    from epgrpo.trainer.fsdp import FSDP
    from epgrpo.trainer.policy.base import create_policy

    policy = create_policy("sd3", path=str(tiny_sd3_dir), device="cpu", lora_rank=2, max_sequence_length=8)
    with pytest.raises(ValueError, match="train.fsdp: needs full fine-tuning"):
        FSDP(policy, 2, torch.device("cpu"))  # refused before any process group is needed


def test_one_process_shards_nothing_and_a_sharded_checkpoint_needs_a_sharded_run(tiny_policy_factory, tmp_path):
    from epgrpo.trainer.loop import Trainer

    trainer = Trainer(load_config(None, ["train.fsdp=true", f"out_dir={tmp_path}"]), tiny_policy_factory(), None, None)
    assert trainer.fsdp is None  # one process: nothing to shard, the usual full state
    tensors, meta = trainer.state_dict()
    assert "fsdp" not in meta and any(k.startswith("weights/") for k in tensors)
    with pytest.raises(ValueError, match=r"train\.fsdp: the checkpoint was saved with FSDP sharding, this run is "
                                         r"not sharded \(train\.fsdp=True, 1 ranks\)"):
        trainer.load_state_dict(tensors, {**meta, "fsdp": {"optimizer_state": True}})


def train_args(tiny_sd3_dir, services, prompts, *extra):
    reward, pruner = services
    return ["-m", "epgrpo.trainer.cli", "train", "model.name=sd3", f"model.path={tiny_sd3_dir}",
            "model.max_sequence_length=8", "model.preview_decoder=tiny-sd3-vae", "model.device=cpu",
            "sampling.guidance_scale=4.5", "sampling.num_steps=3", "prune.group_size=4", "prune.steps=[1]",
            "prune.keeps=[2]", "train.prompts_per_iteration=2", f"train.prompt_file={prompts}", "train.lr=1e-3",
            "train.fsdp=true", "train.ema=true", "train.train_batch_size=1", "train.gradient_accumulation=1",
            "train.checkpoint_every=1", "reward.rewards=jpeg_compressibility:1", "reward.judge=",
            "eval.samples_per_prompt=1", "eval.every=0", "eval.max_prompts=2", f"reward.address={reward.address}",
            f"pruner.address={pruner.address}", "launch_services=false", "progress=false", "out_dir=run", *extra]


@pytest.mark.slow
def test_epgrpo_train_with_fsdp_checkpoints_sharded_and_resumes_exactly(sd3_services, tiny_sd3_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\n")
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    torchrun(train_args(tiny_sd3_dir, sd3_services, prompts, "train.iterations=2"), whole)
    torchrun(train_args(tiny_sd3_dir, sd3_services, prompts, "train.iterations=1"), split)
    checkpoint = split / "run" / "checkpoints" / "iter_000001"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["fsdp"] == {"optimizer_state": True} and state["world_size"] == 2
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == [  # no full copy of any state
        "rng_rank0.safetensors", "rng_rank1.safetensors"]
    torchrun(train_args(tiny_sd3_dir, sd3_services, prompts, "train.iterations=2", "train.resume_from=latest"), split)

    runs = [whole / "run", split / "run"]
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    timing = ("rollout_s", "train_s", "iteration_s")
    assert [{k: v for k, v in m.items() if k not in timing} for m in metrics[0]] == \
           [{k: v for k, v in m.items() if k not in timing} for m in metrics[1]]  # the same run, resumed or not
    assert all(m["optimizer_steps"] == 2 and m["kept"] == 4 and "skipped" not in m for m in metrics[0])
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["trained_weights"] == [str(Path("run") / "transformer")]

    # the exported transformer (EMA weights, gathered to rank 0) loads with diffusers; resumed == uninterrupted
    exported = [SD3Transformer2DModel.from_pretrained(run / "transformer", local_files_only=True).state_dict()
                for run in runs]
    initial = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer",
                                                    local_files_only=True).state_dict()
    assert set(exported[0]) == set(initial)
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in initial)
    assert max((exported[0][k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # trained

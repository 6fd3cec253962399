"""Training the Wan 2.x adapter on a tiny random WanPipeline: the first GRPO ratio is exactly 1, the
trained LoRA loads with ``load_lora_weights`` and reproduces the trainer's sample, full fine-tuning
exports a loadable transformer, FSDP shards the transformer's blocks (2 gloo ranks: sampling bit for
bit, one update equal to the unsharded one, export gathered), and Wan 2.2 A14B's two experts switch
like the pipeline with both LoRAs round-tripping."""

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.rollout import rollout, sample_ode, sample_seeds
from epgrpo.trainer.samplers import SamplerOptions
from wan_fixtures import (  # noqa: F401 - fixtures, used by name
    LATENT_SHAPE, PROMPTS, SEEDS, STEPS, _one_torch_thread, load_pipeline, make_policy, pipeline_sample,
    tiny_wan_a14b_dir, tiny_wan_dir, to_uint8
)


def test_first_ratio_is_one_and_the_lora_moves_away_from_the_reference(tiny_wan_dir):
    policy = make_policy(tiny_wan_dir, lora_rank=4)
    trainable = policy.trainable_parameters()
    names = list(policy.state_dict())
    assert trainable and all("lora" in n for n in names) and all(p.dtype == torch.float32 for p in trainable)
    # flow_grpo's Wan targets: self- and cross-attention q/k/v/out of every block, not the FFN
    for layer in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v"):
        assert any(n.startswith(f"blocks.1.{layer}.lora_A") for n in names), layer
    assert not any("ffn" in n for n in names)
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    batch = rollout(policy, PROMPTS, 2, sampler, seeds=sample_seeds(0, 1, 4))
    assert batch.latents.shape == (4, STEPS + 1, *LATENT_SHAPE) and batch.nfe == 4 * STEPS * 2
    assert torch.isfinite(batch.log_probs[:, :-1]).all() and torch.isnan(batch.log_probs[:, -1]).all()
    advantages = group_advantages(torch.tensor([1.0, -1.0, 0.5, -0.5]), batch.group_index)
    (stats,) = policy_update(policy, torch.optim.SGD(trainable, lr=0.0), batch, advantages, sampler, clip_range=1e-4,
                             beta=0.04, inner_epochs=1, max_grad_norm=1.0, train_batch_size=2, gradient_accumulation=1)
    assert stats.ratio_mean == pytest.approx(1.0, rel=0, abs=1e-12) and stats.clip_fraction == 0.0
    assert stats.approx_kl == 0.0 and stats.kl == 0.0 and stats.policy_loss == 0.0

    x = batch.latents[:, 1]
    cond = policy.encode_prompts(batch.prompts)
    with torch.no_grad():
        v_policy = policy.predict(x, sampler.timestep(1), cond)
        with policy.reference():
            v_reference = policy.predict(x, sampler.timestep(1), cond)
    assert torch.equal(v_policy, v_reference)  # LoRA B starts at zero
    policy_update(policy, torch.optim.AdamW(trainable, lr=0.05), batch, advantages, sampler, clip_range=0.2,
                  beta=0.0, inner_epochs=1, max_grad_norm=1.0, train_batch_size=4, train_steps=[0, 1])
    with torch.no_grad():
        v_policy = policy.predict(x, sampler.timestep(1), cond)
        with policy.reference():
            assert torch.equal(policy.predict(x, sampler.timestep(1), cond), v_reference)  # the base is untouched
    assert (v_policy - v_reference).abs().max() > 1e-5  # 3.6e-5 measured: one small step of a tiny model




def test_lora_round_trip_through_load_lora_weights(tiny_wan_dir, tmp_path):
    policy = make_policy(tiny_wan_dir, lora_rank=4, lora_alpha=8)
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    base = sample_ode(policy, PROMPTS, SEEDS, sampler)
    batch = rollout(policy, PROMPTS, 3, sampler, seeds=sample_seeds(0, 1, 6))
    advantages = group_advantages(torch.randn(6, generator=torch.Generator().manual_seed(0)), batch.group_index)
    policy_update(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=0.05), batch, advantages, sampler,
                  clip_range=1e-4, beta=0.0, inner_epochs=1, max_grad_norm=1.0, train_batch_size=6)
    trained = sample_ode(policy, PROMPTS, SEEDS, sampler)
    assert (trained - base).abs().max() > 1e-3
    with policy.reference():  # the adapter disabled is the base model
        torch.testing.assert_close(sample_ode(policy, PROMPTS, SEEDS, sampler), base, rtol=0, atol=0)

    (path,) = policy.export(tmp_path)
    assert path == tmp_path / "lora" and (path / "pytorch_lora_weights.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(path / "pytorch_lora_weights.safetensors", "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        lora_b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
        assert all(k.startswith("transformer.blocks.") for k in f.keys())
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)

    pipe = load_pipeline(tiny_wan_dir)
    torch.testing.assert_close(pipeline_sample(pipe, "latent"), base, rtol=0, atol=1e-5)
    base_videos = to_uint8(pipeline_sample(pipe, "np"))
    pipe.load_lora_weights(path)
    # equal to our trained policy: without the saved metadata (alpha) diffusers would scale it differently
    torch.testing.assert_close(pipeline_sample(pipe, "latent"), trained, rtol=0, atol=1e-5)
    videos = to_uint8(pipeline_sample(pipe, "np"))
    assert np.abs(videos.astype(int) - base_videos).max() > 0, "the LoRA changed nothing"
    assert np.abs(videos.astype(int) - policy.decode(trained)).max() <= 1


def test_full_fine_tuning_exports_a_loadable_transformer_and_fsdp_shards_its_blocks(tiny_wan_dir, tmp_path):
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from epgrpo.trainer.fsdp import blocks

    policy = make_policy(tiny_wan_dir, gradient_checkpointing=True)
    units = blocks(policy.transformer)  # what train.fsdp gathers one at a time
    assert len(units) == 2 and all(isinstance(b, WanTransformerBlock) for b in units)
    assert units == list(policy.transformer.blocks) and policy.transformer.gradient_checkpointing
    with torch.no_grad():
        policy.transformer.proj_out.bias.add_(0.5)  # stands in for training
    (path,) = policy.export(tmp_path)
    assert path == tmp_path / "transformer"
    loaded = WanTransformer3DModel.from_pretrained(path, local_files_only=True)
    for name, value in policy.transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with policy.reference():  # the frozen copy is untouched
        assert not torch.equal(policy._active.proj_out.bias, policy.transformer.proj_out.bias)




def test_two_experts_switch_at_the_boundary_like_the_pipeline_and_both_loras_round_trip(tiny_wan_a14b_dir, tmp_path):
    policy = make_policy(tiny_wan_a14b_dir, lora_rank=4, lora_alpha=8)
    experts = policy.transformer
    assert policy.two_experts and experts.boundary == 800.0
    assert experts.high is policy.pipe.transformer and experts.low is policy.pipe.transformer_2
    names = list(policy.state_dict())
    assert any(n.startswith("high.blocks.0.attn1.to_q.lora_A") for n in names)
    assert any(n.startswith("low.blocks.0.attn1.to_q.lora_A") for n in names)
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    assert sampler.timesteps.tolist() == [999, 900, 750, 500]
    calls = []
    for name, expert in (("high", experts.high), ("low", experts.low)):
        expert.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    base = sample_ode(policy, PROMPTS, SEEDS, sampler)
    assert calls == ["high", "high", "low", "low"]  # CFG in one batch: one call per step

    pipe = load_pipeline(tiny_wan_a14b_dir)
    torch.testing.assert_close(pipeline_sample(pipe, "latent"), base, rtol=0, atol=1e-5)
    with mock.patch.object(policy.transformer, "boundary", 0.0):  # the high-noise expert alone samples elsewhere
        assert (sample_ode(policy, PROMPTS, SEEDS, sampler) - base).abs().max() > 1e-3

    batch = rollout(policy, PROMPTS, 3, sampler, seeds=sample_seeds(0, 1, 6))
    advantages = group_advantages(torch.randn(6, generator=torch.Generator().manual_seed(0)), batch.group_index)
    policy_update(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=0.05), batch, advantages, sampler,
                  clip_range=1e-4, beta=0.04, inner_epochs=1, max_grad_norm=1.0, train_batch_size=6)
    trained = sample_ode(policy, PROMPTS, SEEDS, sampler)
    with policy.reference():  # both adapters disabled: the base experts
        torch.testing.assert_close(sample_ode(policy, PROMPTS, SEEDS, sampler), base, rtol=0, atol=0)
    paths = policy.export(tmp_path)
    assert paths == [tmp_path / "lora", tmp_path / "lora_2"]
    from safetensors.torch import load_file

    for path in paths:  # steps 0-2 were trained: both experts' LoRAs moved
        lora_b = [v for k, v in load_file(path / "pytorch_lora_weights.safetensors").items() if "lora_B" in k]
        assert lora_b and all(v.abs().max() > 0 for v in lora_b), path
    pipe.load_lora_weights(paths[0])
    pipe.load_lora_weights(paths[1], load_into_transformer_2=True)
    torch.testing.assert_close(pipeline_sample(pipe, "latent"), trained, rtol=0, atol=1e-5)
    assert (trained - base).abs().max() > 1e-4


@pytest.mark.slow
def test_fsdp_shards_the_wan_blocks_on_two_ranks(tiny_wan_dir, tmp_path):
    import os
    import subprocess
    import sys

    worker = Path(__file__).with_name("fsdp_wan_worker.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", "2", str(worker), str(tiny_wan_dir), str(tmp_path / "record")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    ranks = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text()) for r in range(2)]
    full = ranks[0]["full"]
    assert ranks[0]["policy"] + ranks[1]["policy"] == full  # each rank holds its half of every parameter
    for facts in ranks:
        assert facts["units"] == ["WanTransformerBlock"] * 2 and facts["reference"] == facts["policy"]
        assert abs(facts["policy"] - full / 2) <= 0.05 * full
        assert facts["sample_diff"] == 0.0  # CFG sampling through the sharded blocks: bit for bit
        # one SGD step on sharded vs whole weights (measured 1.7e-6) that moved the velocity
        assert facts["update_diff"] < 1e-4 and facts["moved"] > 100 * facts["update_diff"]
    assert ranks[0]["export_diff"] < 1e-6  # the gathered export is the unsharded model's weights

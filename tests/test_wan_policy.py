"""The Wan 2.x adapter on a tiny random WanPipeline loaded through its real loading path: the sigma
grid and timesteps are UniPC's (flow_shift), ODE sampling in the VAE's layout [C, F', h, w] equals
the stock ``WanPipeline`` run with an Euler scheduler on that grid (with and without CFG, Wan 2.2
TI2V's per-token timesteps), videos decode like the pipeline's, UMT5 conditioning is the
pipeline's, bad options name their key and bf16 keeps what must stay fp32."""

import json
from unittest import mock

import numpy as np
import pytest
import torch

from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.rollout import rollout, sample_ode, sample_seeds
from epgrpo.trainer.samplers import SamplerOptions
from wan_fixtures import (  # noqa: F401 - fixtures, used by name
    FRAMES, GUIDANCE, LATENT_SHAPE, PROMPTS, REPO, SEEDS, SIDE, STEPS, TOKENS, _one_torch_thread, load_pipeline,
    make_policy, pipeline_sample, seed_noise, tiny_wan_dir, tiny_wan_ti2v_dir, to_uint8
)


@pytest.mark.parametrize("variant", ["cfg", "no_cfg", "ti2v_expand_timesteps"])
def test_ode_sampling_equals_the_stock_pipeline(variant, tiny_wan_dir, request):
    path = request.getfixturevalue("tiny_wan_ti2v_dir") if variant.startswith("ti2v") else tiny_wan_dir
    guidance = 1.0 if variant == "no_cfg" else GUIDANCE
    policy = make_policy(path, guidance_scale=guidance)  # full fine-tuning, fp32 on CPU
    assert policy.latent_shape == LATENT_SHAPE and policy.nfe_per_sample == (1 if variant == "no_cfg" else 2)
    assert policy.expand_timesteps == variant.startswith("ti2v") and policy.tokens_per_sample == 2 * 2 * 2
    frozen = [policy.vae, policy.pipe.text_encoder]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in policy.transformer.parameters()}
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    latents = sample_ode(policy, PROMPTS, SEEDS, sampler)
    assert latents.shape == (2, *LATENT_SHAPE)

    pipe = load_pipeline(path)
    stock = pipeline_sample(pipe, "latent", guidance)
    # without CFG the very same operations; with CFG our one batch [neg, pos] against the pipeline's
    # two calls may move the last bits
    torch.testing.assert_close(latents, stock, rtol=0, atol=1e-5 if guidance > 1 else 0)
    torch.testing.assert_close(pipe.scheduler.sigmas, sampler.sigmas, rtol=0, atol=0)  # the same grid
    videos = policy.decode(latents)
    assert videos.dtype == np.uint8 and videos.shape == (2, FRAMES, SIDE, SIDE, 3)
    stock_videos = to_uint8(pipeline_sample(pipe, "np", guidance))
    assert np.abs(stock_videos.astype(int) - videos).max() <= (1 if guidance > 1 else 0)
    if variant == "cfg":  # the negative branch really ran (on both sides): CFG changes the sample
        plain = sample_ode(make_policy(path, guidance_scale=1.0), PROMPTS, SEEDS, sampler)
        assert (plain - latents).abs().max() > 1e-3


def test_grid_is_unipcs_flow_sigmas_and_leaves_the_pipelines_scheduler_alone(tiny_wan_dir):
    policy = make_policy(tiny_wan_dir, lora_rank=4)
    policy.pipe.scheduler.set_timesteps(7)
    before = policy.pipe.scheduler.sigmas.clone()
    sampler = policy.make_sampler(10, SamplerOptions(noise_level=0.9))
    assert torch.equal(policy.pipe.scheduler.sigmas, before)  # a copy of the scheduler was used
    assert sampler.noise_level == 0.9 and sampler.num_steps == 10 and sampler.sigma_guard == float(sampler.sigmas[1])
    # UniPC's flow sigmas, transcribed: s = linspace(1, 1/1000, N + 1)[:-1] shifted by flow_shift 3,
    # the first lowered by 1e-6, then 0; the transformer's timesteps are s x 1000 truncated to integers
    s = np.linspace(1.0, 1 / 1000, 11)[:-1]
    s = 3.0 * s / (1 + 2.0 * s)
    s[0] -= 1e-6
    torch.testing.assert_close(sampler.sigmas, torch.tensor([*s, 0.0], dtype=torch.float32), rtol=0, atol=0)
    assert sampler.timesteps.tolist() == [int(v) for v in s * 1000]
    assert [float(sampler.timestep(i)) for i in (0, 9)] == [999.0, float(int(s[9] * 1000))]
    with pytest.warns(UserWarning, match="sampling.shift=3.0 does not apply to wan"):
        policy.make_sampler(4, SamplerOptions(shift=3.0))
    moved = sampler.to("cpu")
    assert torch.equal(moved.timesteps, sampler.timesteps) and moved.sigma_guard == sampler.sigma_guard




def test_umt5_conditioning_is_the_pipelines_and_each_prompt_is_encoded_once(tiny_wan_dir):
    policy = make_policy(tiny_wan_dir)
    calls = []
    encode = policy.pipe.encode_prompt
    with mock.patch.object(policy.pipe, "encode_prompt", side_effect=lambda **kw: calls.append(kw["prompt"]) or
                           encode(**kw)):
        cond = policy.encode_prompts(["a red cat", "a blue dog", "a red cat"])
        policy.encode_prompts(["a red cat"])
    assert calls == [["a red cat", "a blue dog"], [""], ["a red cat"]]  # the negative prompt once per run
    embeds, negative = cond["prompt_embeds"], cond["negative_prompt_embeds"]
    assert embeds.shape == negative.shape == (3, TOKENS, 32) and torch.equal(embeds[0], embeds[2])
    stock, stock_negative = load_pipeline(tiny_wan_dir).encode_prompt(
        ["a red cat", "a blue dog", "a red cat"], do_classifier_free_guidance=True, max_sequence_length=TOKENS)
    torch.testing.assert_close(embeds, stock, rtol=0, atol=1e-6)
    torch.testing.assert_close(negative, stock_negative, rtol=0, atol=1e-6)
    real = len(policy.pipe.tokenizer("a red cat").input_ids)  # zeroed past the real tokens, as the pipeline
    assert embeds[0, real:].abs().max() == 0 and embeds[0, :real].abs().min() > 0




def test_config_errors_name_their_key(tiny_wan_dir, tmp_path):
    from tiny_wan import build_tiny_wan

    with pytest.raises(ValueError, match="model.path: the wan model needs"):
        create_policy("wan")
    with mock.patch("diffusers.WanPipeline.from_pretrained", side_effect=AssertionError("loaded the model")):
        with pytest.raises(ValueError, match=r"model.resolution: expected a positive multiple of 16 .* got 40"):
            make_policy(tiny_wan_dir, resolution=40)
        with pytest.raises(ValueError, match=r"model.num_frames: expected 1 \+ 4k frames .* got 8"):
            make_policy(tiny_wan_dir, num_frames=8)
        with pytest.raises(ValueError, match="model.max_sequence_length: expected 1..512 for wan"):
            make_policy(tiny_wan_dir, max_sequence_length=600)
        # Wan 2.2 A14B (two experts): full fine-tuning refused from the directory's model_index.json, before loading
        two_experts = build_tiny_wan(tmp_path / "a14b", boundary_ratio=0.875)
        with pytest.raises(ValueError, match=r"model.lora_rank: Wan 2.2 A14B \(two 14B experts\) trains with LoRA only"):
            make_policy(two_experts)
        index = json.loads((two_experts / "model_index.json").read_text())
        index["boundary_ratio"] = None  # a second expert that would never run
        (two_experts / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=r"model.path: a Wan pipeline with transformer_2 set and boundary_ratio "
                                             r"None: two experts need both"):
            make_policy(two_experts, lora_rank=4)
    default = make_policy(tiny_wan_dir, resolution=0, num_frames=0)  # the pipeline's own: 480p, 81 frames
    assert (default.resolution, default.num_frames, default.latent_shape) == (480, 81, (16, 21, 60, 60))
    assert default.max_sequence_length == TOKENS


def test_wan21_t2v_1_3b_config_validates():
    from epgrpo.trainer.config import load_config, schedule

    config = load_config(REPO / "trainer" / "configs" / "wan21_t2v_1_3b.yaml", [])
    m, s, p = config.model, config.sampling, config.prune
    assert (m.name, m.lora_rank, m.lora_alpha, m.resolution, m.num_frames) == ("wan", 32, 64.0, 480, 81)
    assert m.max_sequence_length == 512 and m.dtype == "bf16" and m.gradient_checkpointing and m.lora_targets == ""
    assert (s.num_steps, s.guidance_scale, s.noise_level) == (20, 4.5, 0.7)
    assert p.mode == "expand_prune" and p.group_size == 16 and schedule(config) == [(8, 8), (12, 4)]
    # NFE per group as the comment says: 16 trajectories make steps 0-8, 8 steps 9-12, 4 steps 13-19
    survivors = [16 if i <= 8 else 8 if i <= 12 else 4 for i in range(s.num_steps)]
    assert sum(survivors) == 16 * 9 + 8 * 4 + 4 * 7 == 204 and 16 * s.num_steps == 320
    assert config.eval.num_steps == 50 and config.train.train_batch_size == 1 and config.train.ema
    assert config.reward.rewards == "frames(pickscore):1.0" and p.preview_frames == "all"




def test_bf16_keeps_the_vae_lora_and_log_probs_in_fp32(tiny_wan_dir):
    policy = make_policy(tiny_wan_dir, lora_rank=4, dtype="bf16")
    assert policy.vae.dtype == torch.float32  # loaded in fp32, not cast up from bf16
    assert policy.pipe.text_encoder.dtype == torch.bfloat16
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in policy.transformer.parameters() if not p.requires_grad} == {torch.bfloat16}
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    batch = rollout(policy, PROMPTS, 2, sampler, seeds=sample_seeds(0, 2, 4))
    assert batch.log_probs.dtype == torch.float32 and torch.isfinite(batch.log_probs[:, :-1]).all()
    full = make_policy(tiny_wan_dir, lora_rank=4)
    x = seed_noise()
    v32 = full.predict(x, sampler.timestep(1), full.encode_prompts(PROMPTS))
    v16 = policy.predict(x, sampler.timestep(1), policy.encode_prompts(PROMPTS))
    assert v16.dtype == torch.float32 and v16.shape == x.shape
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()  # bf16 is close, not equal
    videos = policy.decode(batch.final)
    assert videos.dtype == np.uint8 and videos.shape == (4, FRAMES, SIDE, SIDE, 3)

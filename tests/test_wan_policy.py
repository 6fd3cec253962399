"""The Wan 2.x adapter on a tiny random WanPipeline loaded through its real loading path: the sigma
grid and timesteps are UniPC's (flow_shift), ODE sampling in the VAE's layout [C, F', h, w] equals
the stock ``WanPipeline`` run with an Euler scheduler on that grid (with and without CFG, Wan 2.2
TI2V's per-token timesteps), videos decode like the pipeline's, the first GRPO ratio is exactly 1,
the trained LoRA loads with ``load_lora_weights`` and reproduces the trainer's sample, full
fine-tuning exports a loadable transformer, FSDP shards the transformer's blocks (2 gloo ranks:
sampling bit for bit, one update equal to the unsharded one, export gathered), Wan 2.2 A14B's two
experts switch like the pipeline and both LoRAs round-trip, the pruner's Wan
VAE decoder equals the adapter's decode for any number of latent frames, and bad options name
their key."""

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.rollout import rollout, sample_ode, sample_seeds
from epgrpo.trainer.samplers import SamplerOptions

PROMPTS = ["a red cat", "a blue dog"]
SEEDS = [11, 12]
STEPS, GUIDANCE = 4, 5.0
SIDE, FRAMES, TOKENS = 32, 5, 16  # tiny_wan.RESOLUTION, NUM_FRAMES, MAX_TOKENS
LATENT_SHAPE = (16, 2, 4, 4)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models are tiny: intra-op threads cost more than they save on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


def make_policy(path, **options):
    options = {"guidance_scale": GUIDANCE, "max_sequence_length": TOKENS, "resolution": SIDE, "num_frames": FRAMES,
               "progress": False, **options}
    return create_policy("wan", path=str(path), device="cpu", **options)


def seed_noise(latent_shape=LATENT_SHAPE) -> torch.Tensor:
    """The rollout's per-trajectory noise [B, C, F', h, w], one generator per seed."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])


def euler_on_the_pipelines_grid(pipe):
    """A FlowMatchEulerDiscreteScheduler that, asked for N steps, takes the sigmas and timesteps the
    pipeline's own UniPC scheduler gives for N: the deterministic Euler (probability-flow ODE) step
    on Wan's grid, what the adapter's ODE sampling does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    unipc_class, unipc_config = type(pipe.scheduler), pipe.scheduler.config

    class EulerOnUniPCGrid(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            unipc = unipc_class.from_config(unipc_config)
            unipc.set_timesteps(num_inference_steps)
            super().set_timesteps(sigmas=unipc.sigmas[:-1].numpy(), timesteps=unipc.timesteps.numpy(), device=device)

    return EulerOnUniPCGrid(shift=1.0)  # shift 1: the given sigmas are used as they are


def load_pipeline(path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = euler_on_the_pipelines_grid(pipe)
    return pipe


def pipeline_sample(pipe, output_type, guidance_scale=GUIDANCE):
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, height=SIDE, width=SIDE,
                num_frames=FRAMES, max_sequence_length=TOKENS, latents=seed_noise(), output_type=output_type).frames


def to_uint8(frames01: np.ndarray) -> np.ndarray:
    return (frames01 * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_wan_ti2v_dir(tmp_path_factory):
    """Wan 2.2 TI2V-like: per-token timesteps (expand_timesteps), flow_shift 5."""
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan-ti2v"), seed=1, flow_shift=5.0, expand_timesteps=True)


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


def test_pruner_wan_vae_decoder_agrees_with_the_adapter_for_any_number_of_latent_frames(tiny_wan_dir, tmp_path):
    from epgrpo.services.common.errors import InvalidArgument
    from epgrpo.services.pruner.decode import decoder_descriptions, get_decoder, register_vae_decoder
    from epgrpo.services.pruner.decode_wan import WanVaeDecoder

    policy = make_policy(tiny_wan_dir)
    assert policy.preview_decoder == "vae"
    source = policy.preview_decoder_source(tmp_path)
    assert source == str(Path(tiny_wan_dir).resolve()) and not any(tmp_path.iterdir())  # the local directory
    register_vae_decoder("tiny-wan-test", source)  # what `epgrpo-pruner --vae tiny-wan-test=DIR` does
    assert "AutoencoderKLWan" in decoder_descriptions()["tiny-wan-test"]
    decoder = get_decoder("tiny-wan-test")
    assert isinstance(decoder, WanVaeDecoder)
    latents = torch.randn(3, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    full = decoder(latents.numpy(), "previews")
    assert full.dtype == np.uint8 and full.shape == (3, FRAMES, SIDE, SIDE, 3)
    np.testing.assert_array_equal(full, policy.decode(latents))
    # the VAE is causal: the first latent frame alone decodes to the first video frame of the full decode
    first = decoder(latents[:, :, :1].numpy(), "previews")
    assert first.shape == (3, 1, SIDE, SIDE, 3)
    np.testing.assert_array_equal(first, full[:, :1])
    np.testing.assert_array_equal(policy.decode(latents[:, :, :1]), first)
    assert np.abs(full[:, 1:].astype(int) - full[:, :1]).max() > 0  # later frames differ: a real check
    longer = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))  # any frame count
    assert decoder(longer.numpy(), "previews").shape == (1, 9, SIDE, SIDE, 3)
    with pytest.raises(InvalidArgument, match=r"previews.shape: expected video latents \[N, 16, F', h, w\]"):
        decoder(latents[:, :, 0].numpy(), "previews")
    with pytest.raises(InvalidArgument, match="previews: latents contain NaN"):
        decoder(np.full((1, *LATENT_SHAPE), np.nan, dtype=np.float32), "previews")


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


@pytest.fixture(scope="module")
def tiny_wan_a14b_dir(tmp_path_factory):
    """Wan 2.2 A14B-like: two experts, the second below boundary_ratio 0.8 (timesteps < 800: with 4
    steps at [999, 900, 750, 500], steps 0-1 run `transformer`, steps 2-3 `transformer_2`)."""
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan-a14b"), seed=2, boundary_ratio=0.8)


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


VIDEO_REWARD = "frames(jpeg_compressibility, k=all)"  # every frame: a changed pixel anywhere can show


@pytest.mark.slow
def test_a_launched_pruner_decodes_previews_like_the_adapter(tiny_wan_dir, tmp_path):
    """The pruner process launched with the model's VAE (what `epgrpo train` starts) decodes full and
    first-frame video previews as the adapter does: its proxy scores equal the reward service's scores
    of the adapter's own decode, to the last bit (a JPEG size or a frame difference moves with any
    changed pixel)."""
    from epgrpo.protos import codec
    from epgrpo.protos.v1 import pruner_pb2, tensor_pb2
    from epgrpo.trainer.clients import PrunerClient
    from epgrpo.trainer.launch import LocalStack
    from epgrpo.trainer.reward_client import RewardClient

    policy = make_policy(tiny_wan_dir)
    latents = torch.randn(4, *LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    rewards = {"all": [(VIDEO_REWARD, 1.0), ("temporal_consistency", 1.0)], "first": [(VIDEO_REWARD, 1.0)]}
    with LocalStack(["jpeg_compressibility", "temporal_consistency"], tmp_path / "services",
                    decoders={"vae": policy.preview_decoder_source(tmp_path)}) as stack:
        reward, pruner = RewardClient(stack.reward.address), PrunerClient(stack.pruner.address)
        try:
            for frames, previews in (("all", latents), ("first", latents[:, :, :1])):
                specs = rewards[frames]
                request = pruner_pb2.PruneRequest(
                    checkpoint=pruner_pb2.GroupCheckpoint(group_id=frames, step=1, trajectory_ids=range(4),
                                                          previews=codec.encode(previews.numpy()),
                                                          prompts=["a red cat"]),
                    keep=2, decoder="vae", proxy_rewards=[tensor_pb2.RewardSpec(name=n, weight=w) for n, w in specs])
                decision = pruner.stub.Prune(request, timeout=300)
                videos = policy.decode(previews)
                assert videos.shape == (4, FRAMES if frames == "all" else 1, SIDE, SIDE, 3)
                expected, _ = reward.score(videos, ["a red cat"] * 4, specs)
                np.testing.assert_array_equal(np.array(decision.proxy_scores, dtype=np.float32), expected)
                assert len(set(expected.tolist())) > 1  # the four videos score differently: a real comparison
        finally:
            reward.close()
            pruner.close()


def wan_args(model_dir, out, *extra):
    return ["model.name=wan", f"model.path={model_dir}", "model.lora_rank=4", f"model.max_sequence_length={TOKENS}",
            f"model.resolution={SIDE}", f"model.num_frames={FRAMES}", "model.device=cpu", "sampling.num_steps=4",
            f"sampling.guidance_scale={GUIDANCE}", "prune.group_size=4", "prune.steps=[2]", "prune.keeps=[2]",
            "train.iterations=2", "train.prompts_per_iteration=1", f"reward.rewards={VIDEO_REWARD}:1",
            "reward.judge=", "eval.samples_per_prompt=1", "eval.every=0", "eval.max_prompts=1", f"out_dir={out}",
            "progress=false", *extra]


@pytest.mark.slow
def test_cli_trains_wan_with_launched_services_on_first_frame_previews(tiny_wan_dir, tmp_path):
    from epgrpo.trainer.cli import main

    out = tmp_path / "run"
    assert main(["train", *wan_args(tiny_wan_dir, out, "train.lr=1e-2", "prune.preview_frames=first")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # per iteration and group: 4 trajectories make steps 0-2, the 2 survivors step 3 (vs 4 x 4); CFG: 2 NFE each
    assert summary["nfe_used"] == 2 * 2 * (4 * 3 + 2 * 1) and summary["nfe_full_group"] == 2 * 2 * 4 * 4
    assert summary["trained_weights"] == [str(out / "lora")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["survivors_per_step"] for m in metrics] == [[4, 4, 4, 2]] * 2
    # the launched pruner decoded the latent video previews with the Wan VAE (a pixel pruner rejects them)
    assert (out / "services" / "pruner.log").read_text().count("opened") == 2
    assert (out / "samples_last.gif").stat().st_size > 0

    # what the run exported is a trained LoRA the stock pipeline loads, and it changes the video
    from safetensors.torch import load_file

    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    pipe = load_pipeline(tiny_wan_dir)
    before = pipeline_sample(pipe, "np")
    pipe.load_lora_weights(out / "lora")
    assert np.abs(pipeline_sample(pipe, "np") - before).max() > 0


@pytest.mark.slow
def test_analyze_runs_on_wan_with_first_frame_fidelity(tiny_wan_dir, tmp_path):
    from epgrpo.trainer.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    out = tmp_path / "out"
    assert main(["analyze", "--groups", "2", "--group-size", "4", "--keep", "2", "model.name=wan",
                 f"model.path={tiny_wan_dir}", f"model.max_sequence_length={TOKENS}", f"model.resolution={SIDE}",
                 f"model.num_frames={FRAMES}", "model.device=cpu", "sampling.num_steps=3", "prune.mode=grpo",
                 f"reward.rewards={VIDEO_REWARD}:1", "reward.judge=", f"train.prompt_file={prompts}",
                 f"out_dir={out}", "progress=false"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert [g["prompt"] for g in result["clustering"]["groups"]] == ["a red cat", "a blue dog"]
    assert len(result["fidelity"]["per_step"]) == 3 and len(result["fidelity_first_frame"]["per_step"]) == 3


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

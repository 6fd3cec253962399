"""The Stable Diffusion 1.x adapter on tiny random pipelines loaded through the real loading path:
DDIM with eta = 0 equals the stock diffusers pipeline (epsilon and v-prediction), the first update's
ratio is exactly 1, the reference is the adapter disabled, an end-to-end run with launched services
prunes on VAE-decoded previews, its LoRA loads with ``load_lora_weights`` and gives our samples,
and the SD-v1.4 example config loads."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.optimize import policy_update, trained_steps
from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.rollout import rollout, sample_ode, sample_seeds
from epgrpo.trainer.samplers import DDIMSampler, SamplerOptions

PROMPTS = ["a red cat", "a blue dog"]
SEEDS = [11, 12]
STEPS, GUIDANCE = 4, 5.0


def make_policy(path, **options):
    return create_policy("sd", path=str(path), device="cpu", guidance_scale=GUIDANCE, **options)


def load_pipeline(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, local_files_only=True)


def pipeline_sample(pipe, latent_shape, output_type, prompts=PROMPTS, seeds=SEEDS):
    """The stock pipeline (DDIM, eta = 0) from the per-sample noise ``sample_ode`` draws."""
    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    out = pipe(prompts, latents=noise, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
               output_type=output_type)
    return out.images


def to_uint8(images01: np.ndarray) -> np.ndarray:
    return (images01 * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_sd_v_dir(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), seed=1, prediction_type="v_prediction")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_zero_equals_the_stock_pipeline(prediction_type, request):
    path = request.getfixturevalue("tiny_sd_dir" if prediction_type == "epsilon" else "tiny_sd_v_dir")
    policy = make_policy(path)  # full fine-tuning, fp32 on CPU
    assert policy.nfe_per_sample == 2 and policy.latent_shape == (4, 16, 16) and policy.resolution == 32
    frozen = [policy.vae, policy.pipe.text_encoder]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in policy.pipe.unet.parameters()}
    sampler = policy.make_sampler(STEPS, SamplerOptions(eta=1.0))  # sample_ode takes the eta = 0 steps
    assert isinstance(sampler, DDIMSampler) and sampler.prediction_type == prediction_type
    latents = sample_ode(policy, PROMPTS, SEEDS, sampler)
    pipe = load_pipeline(path)
    expected = pipeline_sample(pipe, policy.latent_shape, "latent")
    assert sampler.timesteps == pipe.scheduler.timesteps.tolist()  # the same grid (steps_offset 1)
    # the DDIM step's coefficients are float64 Python scalars here, float32 tensors in diffusers:
    # a few ulps per step on latents of magnitude ~10
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    images = policy.decode(latents)
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    stock = to_uint8(pipeline_sample(pipe, policy.latent_shape, "np"))
    assert np.abs(images.astype(int) - stock).max() <= 1  # at most one level from the latents' last bits


def test_guidance_one_and_a_pndm_pipeline(tiny_sd_dir):
    from diffusers import DDIMScheduler, PNDMScheduler

    policy = create_policy("sd", path=str(tiny_sd_dir), device="cpu", guidance_scale=1.0)
    assert policy.nfe_per_sample == 1 and set(policy.encode_prompts(PROMPTS)) == {"prompt_embeds"}
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    out = policy.predict(x, torch.tensor(501), policy.encode_prompts(PROMPTS))
    assert out.shape == x.shape and out.dtype == torch.float32
    # SD 1.4 ships PNDM: the sampler is the DDIM built from the same config, as the pipeline's would be
    ddim = policy.make_sampler(10, SamplerOptions(eta=1.0))
    policy.pipe.scheduler = PNDMScheduler.from_config(policy.pipe.scheduler.config)
    pndm = policy.make_sampler(10, SamplerOptions(eta=1.0))
    reference = DDIMScheduler.from_config(policy.pipe.scheduler.config)
    reference.set_timesteps(10)
    assert pndm.timesteps == ddim.timesteps == reference.timesteps.tolist()
    assert pndm._alpha == ddim._alpha and pndm._alpha_prev == ddim._alpha_prev


def test_ratio_is_one_and_the_reference_is_the_base_model(tiny_sd_dir):
    policy = make_policy(tiny_sd_dir, lora_rank=4)
    names = list(policy.state_dict())
    # DDPO's targets: q/k/v/out of self- and cross-attention; nothing outside the UNet's attention
    for suffix in ("to_q", "to_k", "to_v", "to_out.0"):
        for attn in ("attn1", "attn2"):
            assert any(f"{attn}.{suffix}.lora_A" in n for n in names), (attn, suffix)
    assert all("lora" in n for n in names) and {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    sampler = policy.make_sampler(STEPS, SamplerOptions(eta=1.0))
    batch = rollout(policy, PROMPTS[:1], 2, sampler, seeds=sample_seeds(0, 1, 2))
    assert trained_steps(batch) == [0, 1, 2] and batch.nfe == 2 * 2 * STEPS
    assert torch.isfinite(batch.log_probs[:, :-1]).all() and batch.log_probs.dtype == torch.float32
    advantages = group_advantages(torch.tensor([1.0, -1.0]), batch.group_index)
    frozen = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)  # parameters stay unchanged
    stats = policy_update(policy, frozen, batch, advantages, sampler, clip_range=1e-4, beta=0.0,
                          inner_epochs=2, max_grad_norm=1.0, train_batch_size=2)
    for s in stats:  # both epochs: the parameters never changed, so every ratio is exactly 1 (log-ratio 0);
        # ratio_mean sums ratio / 6 over 2 trajectories x 3 steps in float64, which is 1 - 1 ulp
        assert s.approx_kl == 0.0 and s.clip_fraction == 0.0 and s.ratio_mean == pytest.approx(1.0, rel=0, abs=1e-15)
    assert stats[0].logp_drift < 1e-3 and stats[0].grad_norm > 0

    x, t, cond = batch.latents[:, 1], sampler.timestep(1), policy.encode_prompts(batch.prompts)
    base = policy.predict(x, t, cond)
    with policy.reference():
        torch.testing.assert_close(policy.predict(x, t, cond), base)  # B = 0: the LoRA starts as the identity
    stats = policy_update(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=0.05), batch, advantages,
                          sampler, clip_range=0.2, beta=0.04, inner_epochs=2, max_grad_norm=1.0, train_batch_size=2)
    assert stats[0].kl == 0.0 and stats[1].kl > 0.0 and stats[1].ratio_mean != 1.0
    trained = policy.predict(x, t, cond)
    with policy.reference():  # the adapter disabled is still the base model
        torch.testing.assert_close(policy.predict(x, t, cond), base)
    assert (trained - base).abs().max() > 1e-3


def test_mixed_precision_keeps_lora_and_log_probs_in_fp32(tiny_sd_dir):
    full = make_policy(tiny_sd_dir, lora_rank=4)
    bf16 = make_policy(tiny_sd_dir, lora_rank=4, dtype="bf16", gradient_checkpointing=True)
    assert bf16.pipe.text_encoder.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.transformer.parameters() if not p.requires_grad} == {torch.bfloat16}
    sampler = bf16.make_sampler(STEPS, SamplerOptions(eta=1.0))
    batch = rollout(bf16, PROMPTS[:1], 2, sampler, seeds=sample_seeds(0, 2, 2))
    assert batch.log_probs.dtype == torch.float32 and torch.isfinite(batch.log_probs[:, :-1]).all()
    x = torch.randn(2, *full.latent_shape, generator=torch.Generator().manual_seed(3))
    out32 = full.predict(x, sampler.timestep(1), full.encode_prompts(PROMPTS))
    out16 = bf16.predict(x, sampler.timestep(1), bf16.encode_prompts(PROMPTS))
    assert out16.dtype == torch.float32
    assert (out16 - out32).abs().max() < 0.2 * out32.abs().max()  # bf16 is close, not equal
    images = bf16.decode(batch.final)
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)


def test_full_fine_tuning_exports_a_loadable_unet(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    policy = make_policy(tiny_sd_dir)
    with torch.no_grad():
        policy.transformer.conv_out.bias.add_(0.5)  # stands in for training
    (path,) = policy.export(tmp_path)
    assert path == tmp_path / "unet"
    loaded = UNet2DConditionModel.from_pretrained(path, local_files_only=True)
    for name, value in policy.transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with policy.reference():  # the frozen copy is untouched
        assert not torch.equal(policy._active.conv_out.bias, policy.transformer.conv_out.bias)


@pytest.mark.slow
def test_cli_run_with_launched_services_and_its_lora_in_the_stock_pipeline(tiny_sd_dir, tmp_path):
    from epgrpo.trainer.cli import main

    out = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")  # the tiny CLIP reads 12 tokens (characters)
    assert main(["train", "model.name=sd", f"model.path={tiny_sd_dir}", "model.lora_rank=4", "model.device=cpu",
                 "sampling.num_steps=4", f"sampling.guidance_scale={GUIDANCE}", "prune.group_size=4",
                 "prune.steps=[2]", "prune.keeps=[2]", "train.iterations=2", "train.prompts_per_iteration=1",
                 "train.lr=1e-2", f"train.prompt_file={prompts}", "reward.rewards=jpeg_compressibility:1",
                 "reward.judge=",
                 "eval.samples_per_prompt=1", "eval.every=0", "eval.max_prompts=1", f"out_dir={out}",
                 "progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # per group and iteration: 4 trajectories call the model at steps 0-2 (the pruner decides on the
    # previews of x_2), the 2 survivors at step 3; x2 with CFG, over 2 iterations
    assert summary["nfe_used"] == 2 * 2 * (4 * 3 + 2 * 1) and summary["nfe_full_group"] == 2 * 2 * 4 * 4
    assert summary["nfe_used"] < summary["nfe_full_group"]
    assert summary["trained_weights"] == [str(out / "lora")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["survivors_per_step"] for m in metrics] == [[4, 4, 4, 2]] * 2
    assert all(m["ratio_mean"] == 1.0 and m["kept"] == 2 for m in metrics)
    # the launched pruner decoded the latent previews with the model's VAE (one session per iteration)
    assert (out / "services" / "pruner.log").read_text().count("opened") == 2

    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") and "lora" in k for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained (B starts at zero)
    # our policy with the run's final weights (from its checkpoint) samples what the stock
    # pipeline samples with the exported LoRA: the saved alpha (8 = 2 x rank) scales it the same
    policy = make_policy(tiny_sd_dir, lora_rank=4)
    policy.load_state_dict(load_file(out / "checkpoints" / "iter_000002" / "weights.safetensors"))
    sampler = policy.make_sampler(STEPS, SamplerOptions(eta=1.0))
    ours = policy.decode(sample_ode(policy, PROMPTS[:1], SEEDS[:1], sampler))
    with policy.reference():
        base = policy.decode(sample_ode(policy, PROMPTS[:1], SEEDS[:1], sampler))
    pipe = load_pipeline(tiny_sd_dir)  # the stock pipeline without LoRA samples `base` (see the first test)
    pipe.load_lora_weights(out / "lora")
    loaded = to_uint8(pipeline_sample(pipe, policy.latent_shape, "np", PROMPTS[:1], SEEDS[:1]))
    assert np.abs(loaded.astype(int) - base).max() > 0, "the LoRA changed nothing"
    assert np.abs(loaded.astype(int) - ours).max() <= 1


def test_bad_model_path_and_resolution_are_config_errors(tiny_sd_dir, tmp_path):
    with pytest.raises(ValueError, match="model.path: the sd model needs"):
        create_policy("sd", path="")
    not_a_dir = tmp_path / "model.safetensors"
    not_a_dir.write_bytes(b"")
    with pytest.raises(ValueError, match="model.path: .* is not a pipeline directory"):
        create_policy("sd", path=str(not_a_dir))
    with pytest.raises(ValueError, match="model.resolution: expected a multiple of 2 .*got 33"):
        make_policy(tiny_sd_dir, resolution=33)
    assert make_policy(tiny_sd_dir, resolution=48).latent_shape == (4, 24, 24)


def test_missing_model_path_stops_the_cli_with_one_line(tmp_path, capsys):
    from epgrpo.trainer.cli import main

    assert main(["train", "model.name=sd", "model.device=cpu", f"out_dir={tmp_path / 'run'}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("epgrpo: error: model.path: the sd model needs") and "Traceback" not in err[-1]


def test_sd14_example_config():
    from epgrpo.trainer.config import load_config

    config = load_config(Path(__file__).parent.parent / "trainer" / "configs" / "sd14_ddpo.yaml", [])
    assert (config.model.name, config.model.path) == ("sd", "CompVis/stable-diffusion-v1-4")
    assert (config.sampling.num_steps, config.sampling.eta, config.sampling.guidance_scale) == (50, 1.0, 5.0)
    assert (config.prune.mode, config.prune.group_size, config.prune.steps, config.prune.keeps) == \
        ("expand_prune", 48, [30, 40], [32, 8])
    train = config.train
    assert (train.lr, train.clip_range, train.adv_clip, train.beta) == (3e-4, 1e-4, 5.0, 0.0)
    assert config.model.lora_rank > 0 and config.model.preview_decoder == "vae"
    assert config.reward.rewards == "pickscore:1.0"

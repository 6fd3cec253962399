"""The SD3 adapter on a tiny random pipeline loaded through its real loading path: sampling equals
the stock diffusers pipeline, the trained LoRA loads with ``load_lora_weights``, mixed precision,
and the pruner's VAE decoder agrees with the adapter's."""

import numpy as np
import pytest
import torch

from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.rollout import rollout, sample_ode, sample_seeds
from epgrpo.trainer.samplers import FlowSampler

PROMPTS = ["a red cat", "a blue dog"]
SEEDS = [11, 12]
STEPS, SHIFT, TOKENS, GUIDANCE = 4, 3.0, 8, 4.5


def make_policy(path, **options):
    return create_policy("sd3", path=str(path), device="cpu", guidance_scale=GUIDANCE, max_sequence_length=TOKENS,
                         **options)


def load_pipeline(path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, text_encoder_3=None, tokenizer_3=None)


def pipeline_sample(pipe, latent_shape, output_type):
    """The stock pipeline on our sigma grid: it re-applies its scheduler's shift to the t grid we
    give, and starts from our per-sample noise."""
    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    t_grid = torch.linspace(1, 0, STEPS + 1)[:-1].tolist()
    side = latent_shape[-1] * pipe.vae_scale_factor
    out = pipe(PROMPTS, sigmas=t_grid, latents=noise, guidance_scale=GUIDANCE, height=side, width=side,
               max_sequence_length=TOKENS, output_type=output_type)
    return out.images


def to_uint8(images01: np.ndarray) -> np.ndarray:
    return (images01 * 255).round().astype(np.uint8)


def test_sampling_equals_the_stock_pipeline(tiny_sd3_dir):
    policy = make_policy(tiny_sd3_dir)  # full fine-tuning, fp32 on CPU
    assert policy.nfe_per_sample == 2 and policy.latent_shape == (4, 16, 16) and policy.resolution == 32
    frozen = [policy.vae, policy.pipe.text_encoder, policy.pipe.text_encoder_2]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in policy.transformer.parameters()}
    sampler = FlowSampler.uniform(STEPS, SHIFT)
    latents = sample_ode(policy, PROMPTS, SEEDS, sampler)
    pipe = load_pipeline(tiny_sd3_dir)
    torch.testing.assert_close(latents, pipeline_sample(pipe, policy.latent_shape, "latent"), rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe.scheduler.sigmas, sampler.sigmas, rtol=0, atol=1e-7)  # the same grid
    images = policy.decode(latents)
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(images, to_uint8(pipeline_sample(pipe, policy.latent_shape, "np")))


def test_full_fine_tuning_exports_a_loadable_transformer(tiny_sd3_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    policy = make_policy(tiny_sd3_dir)
    with torch.no_grad():
        policy.transformer.proj_out.bias.add_(0.5)  # stands in for training
    (path,) = policy.export(tmp_path)
    loaded = SD3Transformer2DModel.from_pretrained(path, local_files_only=True)
    for name, value in policy.transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with policy.reference():  # the frozen copy is untouched
        assert not torch.equal(policy._active.proj_out.bias, policy.transformer.proj_out.bias)


def test_gradient_checkpointing_gives_the_same_update(tiny_sd3_dir):
    sampler = FlowSampler.uniform(STEPS, SHIFT)
    results = []
    for checkpointing in (False, True):
        policy = make_policy(tiny_sd3_dir, lora_rank=4, gradient_checkpointing=checkpointing)
        batch = rollout(policy, PROMPTS, 2, sampler, seeds=sample_seeds(0, 4, 4))
        advantages = group_advantages(torch.tensor([1.0, -1.0, 0.5, -0.5]), batch.group_index)
        policy_update(policy, torch.optim.SGD(policy.trainable_parameters(), lr=1.0), batch, advantages, sampler,
                      clip_range=0.2, beta=0.04, inner_epochs=1, max_grad_norm=1e9,
                      train_batch_size=4)
        results.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(v, make_policy(tiny_sd3_dir, lora_rank=4).state_dict()[k]) for k, v in results[0].items())


def test_guidance_one_means_one_transformer_call_per_sample(tiny_sd3_dir):
    policy = create_policy("sd3", path=str(tiny_sd3_dir), device="cpu", guidance_scale=1.0, max_sequence_length=TOKENS)
    assert policy.nfe_per_sample == 1 and "negative_prompt_embeds" not in policy.encode_prompts(PROMPTS)


def test_lora_round_trip_through_load_lora_weights(tiny_sd3_dir, tmp_path):
    policy = make_policy(tiny_sd3_dir, lora_rank=4, lora_alpha=8)
    sampler = FlowSampler.uniform(STEPS, SHIFT)
    trainable = policy.trainable_parameters()
    assert trainable and all("lora" in n for n in policy.state_dict()) and all(p.dtype == torch.float32 for p in trainable)
    base_images = policy.decode(sample_ode(policy, PROMPTS, SEEDS, sampler))
    batch = rollout(policy, PROMPTS, 3, sampler, seeds=sample_seeds(0, 1, 6))
    advantages = group_advantages(torch.randn(6, generator=torch.Generator().manual_seed(0)), batch.group_index)
    optimizer = torch.optim.AdamW(trainable, lr=0.05)
    policy_update(policy, optimizer, batch, advantages, sampler, clip_range=1e-4, beta=0.04,
                  inner_epochs=2, max_grad_norm=1.0, train_batch_size=4)
    trained = policy.decode(sample_ode(policy, PROMPTS, SEEDS, sampler))
    with policy.reference():  # the adapter disabled is the base model
        np.testing.assert_array_equal(policy.decode(sample_ode(policy, PROMPTS, SEEDS, sampler)), base_images)

    (path,) = policy.export(tmp_path)
    assert (path / "pytorch_lora_weights.safetensors").is_file()
    pipe = load_pipeline(tiny_sd3_dir)
    np.testing.assert_array_equal(to_uint8(pipeline_sample(pipe, policy.latent_shape, "np")), base_images)
    pipe.load_lora_weights(path)
    loaded = to_uint8(pipeline_sample(pipe, policy.latent_shape, "np"))
    assert np.abs(loaded.astype(int) - base_images).max() > 0, "the LoRA changed nothing"
    # identical: without the saved LoRA metadata (alpha) diffusers would scale it differently
    np.testing.assert_array_equal(loaded, trained)


def test_mixed_precision_keeps_lora_and_log_probs_in_fp32(tiny_sd3_dir):
    full = make_policy(tiny_sd3_dir, lora_rank=4)
    bf16 = make_policy(tiny_sd3_dir, lora_rank=4, dtype="bf16")
    assert bf16.pipe.text_encoder.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.trainable_parameters()} == {torch.float32}
    frozen = [p for p in bf16.transformer.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    sampler = FlowSampler.uniform(STEPS, SHIFT)
    batch = rollout(bf16, PROMPTS, 2, sampler, seeds=sample_seeds(0, 2, 4))
    assert batch.log_probs.dtype == torch.float32 and torch.isfinite(batch.log_probs[:, :-1]).all()
    x = torch.randn(2, *full.latent_shape, generator=torch.Generator().manual_seed(3))
    v32 = full.predict(x, sampler.timestep(1), full.encode_prompts(PROMPTS))
    v16 = bf16.predict(x, sampler.timestep(1), bf16.encode_prompts(PROMPTS))
    assert v16.dtype == torch.float32
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()  # bf16 is close, not equal
    images = bf16.decode(batch.final)
    assert images.dtype == np.uint8 and images.shape == (4, 32, 32, 3)


def test_pruner_vae_decoder_agrees_with_the_adapter(tiny_sd3_dir):
    from epgrpo.services.common.errors import InvalidArgument
    from epgrpo.services.pruner.decode import get_decoder, parse_vae_spec, register_vae_decoder

    policy = make_policy(tiny_sd3_dir)
    register_vae_decoder("tiny-sd3-test", tiny_sd3_dir)  # a pipeline directory: uses its vae/
    decoder = get_decoder("tiny-sd3-test")
    latents = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(decoder(latents.numpy(), "previews"), policy.decode(latents))
    with pytest.raises(InvalidArgument, match=r"previews.shape: expected latents \[N, 4, h, w\]"):
        decoder(np.zeros((2, 3, 16, 16), np.float32), "previews")
    with pytest.raises(InvalidArgument, match="NaN"):
        decoder(np.full((1, 4, 16, 16), np.nan, np.float32), "previews")
    with pytest.raises(ValueError, match="expected a diffusers VAE directory"):
        register_vae_decoder("nowhere", tiny_sd3_dir / "no-such-dir")
    assert parse_vae_spec("/models/sd35") == ("vae", "/models/sd35")
    assert parse_vae_spec("sd35=/models/sd35") == ("sd35", "/models/sd35")


def test_pruner_refuses_to_start_with_a_bad_vae_directory(tmp_path, capsys):
    from epgrpo.services.pruner import main as pruner_main

    assert pruner_main.main(["--port", "0", "--vae", f"sd35={tmp_path}"]) == 2
    assert "--vae sd35=" in capsys.readouterr().err


def test_unknown_model_and_missing_path_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model.name: unknown model 'sdxl'; available: flux, .*qwen_image, sd, sd3, "
                                         "toy_digits"):
        create_policy("sdxl")
    with pytest.raises(ValueError, match="model.path: the sd3 model needs"):
        create_policy("sd3", path="")
    with pytest.raises(ValueError, match="model.name: cannot import adapter module"):
        create_policy("no_such_package.adapters:flux")


def test_the_adapters_grid_is_the_stock_pipelines_with_default_arguments(tiny_sd3_dir):
    """model.name=sd3 samples on the pipeline's own scheduler grid (set_timesteps(n), shift from its config),
    as the stock pipeline called without sigmas does and Flow-GRPO trains; sampling.shift overrides it."""
    from epgrpo.trainer.config import load_config, sampler_options

    policy = make_policy(tiny_sd3_dir)
    sampler = policy.make_sampler(STEPS, sampler_options(load_config(None, ["model.name=sd3"])))
    assert policy.pipe.scheduler.config.shift == SHIFT
    pipe = load_pipeline(tiny_sd3_dir)
    noise = torch.stack([torch.randn(policy.latent_shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    side = policy.latent_shape[-1] * pipe.vae_scale_factor
    stock = pipe(PROMPTS, num_inference_steps=STEPS, latents=noise, guidance_scale=GUIDANCE, height=side, width=side,
                 max_sequence_length=TOKENS, output_type="latent").images
    torch.testing.assert_close(sampler.sigmas, pipe.scheduler.sigmas, rtol=0, atol=1e-7)
    assert float(sampler.sigmas[-2]) < 0.05  # ends near sigma_min, not on the uniform grid's 1/STEPS
    torch.testing.assert_close(sample_ode(policy, PROMPTS, SEEDS, sampler), stock, rtol=0, atol=1e-5)
    unshifted = policy.make_sampler(STEPS, sampler_options(load_config(None, ["model.name=sd3", "sampling.shift=1.0"])))
    pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "shift": 1.0})
    pipe.scheduler.set_timesteps(STEPS)
    torch.testing.assert_close(unshifted.sigmas, pipe.scheduler.sigmas, rtol=0, atol=1e-7)
    assert (unshifted.sigmas[1:-1] < sampler.sigmas[1:-1]).all()


def test_t5_tokens_default_to_the_stock_pipelines_and_travel_with_the_export(tiny_sd3_dir, tmp_path):
    """Without model.max_sequence_length the adapter conditions on the stock pipeline's 256 T5 tokens, so an
    exported LoRA meets the conditioning it was trained with; a set count is written next to the weights."""
    import json

    from epgrpo.trainer.config import ModelConfig

    assert ModelConfig().max_sequence_length == 0  # the config's default: the pipeline's own
    policy = create_policy("sd3", path=str(tiny_sd3_dir), device="cpu", guidance_scale=1.0, lora_rank=2)
    pipe = load_pipeline(tiny_sd3_dir)
    stock, *_ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
    ours = policy.encode_prompts(PROMPTS)["prompt_embeds"]
    assert ours.shape == stock.shape and stock.shape[1] == pipe.tokenizer_max_length + 256  # CLIP + T5 tokens
    torch.testing.assert_close(ours, stock)
    (target,) = policy.export(tmp_path)
    assert json.loads((target / "sampling.json").read_text()) == {"max_sequence_length": 256}
    trained_on_8 = make_policy(tiny_sd3_dir, lora_rank=2)
    (target,) = trained_on_8.export(tmp_path / "eight")
    assert json.loads((target / "sampling.json").read_text()) == {"max_sequence_length": TOKENS}

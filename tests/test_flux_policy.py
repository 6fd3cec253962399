"""The FLUX.1 adapter on a tiny random pipeline loaded through its real loading path: ODE sampling
on unpacked latents equals the stock ``FluxPipeline`` (guidance embedding, true CFG, no guidance
embedding), the first GRPO ratio is exactly 1, the trained LoRA loads with ``load_lora_weights``,
``epgrpo train`` runs end to end with launched services (the pruner decodes previews with the
model's VAE), config errors name their key, and the shipped FLUX.1-dev config validates."""

import json
from pathlib import Path

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
STEPS, TOKENS, GUIDANCE, SIDE = 4, 16, 3.5, 32  # TOKENS = tiny_flux.MAX_T5_TOKENS, SIDE = tiny_flux.IMAGE_SIZE
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models are tiny: intra-op threads cost more than they save (several times slower on 2 busy
    cores). Restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_policy(path, **options):
    options = {"guidance_scale": GUIDANCE, "max_sequence_length": TOKENS, "resolution": SIDE, **options}
    return create_policy("flux", path=str(path), device="cpu", **options)


def load_pipeline(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed_noise(latent_shape) -> torch.Tensor:
    """The rollout's per-trajectory noise (unpacked [B, C, h, w]), one generator per seed."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])


def pipeline_sample(pipe, policy, output_type, true_cfg_scale=1.0):
    """The stock pipeline on its own sigma grid, from our per-sample noise packed its way.

    FluxPipeline runs true CFG only when a negative prompt is given (``negative_prompt=None``, its
    default, silently skips it even with ``true_cfg_scale`` > 1), so the stock call passes the
    adapter's own negative prompt, the empty one."""
    from epgrpo.trainer.policy.flux import NEGATIVE_PROMPT

    cfg = {"true_cfg_scale": true_cfg_scale, "negative_prompt": NEGATIVE_PROMPT} if true_cfg_scale > 1 else {}
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIDE, width=SIDE,
                max_sequence_length=TOKENS, latents=policy.pack(seed_noise(policy.latent_shape)),
                output_type=output_type, **cfg).images


def to_uint8(images01: np.ndarray) -> np.ndarray:
    return (images01 * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_flux_no_guidance_dir(tmp_path_factory):
    """A FLUX.1-schnell-like tiny pipeline: no guidance embedding."""
    from tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-schnell"), seed=1, guidance_embeds=False)


@pytest.mark.parametrize("variant", ["guidance_embedding", "true_cfg", "no_guidance_embedding"])
def test_ode_sampling_equals_the_stock_pipeline(variant, tiny_flux_dir, request):
    path = request.getfixturevalue("tiny_flux_no_guidance_dir") if variant == "no_guidance_embedding" else tiny_flux_dir
    true_cfg = 2.0 if variant == "true_cfg" else 1.0
    policy = make_policy(path, true_cfg_scale=true_cfg)  # full fine-tuning, fp32 on CPU
    assert policy.latent_shape == (4, 16, 16) and policy.resolution == SIDE and policy.image_seq_len == 64
    assert policy.nfe_per_sample == (2 if variant == "true_cfg" else 1)
    assert policy.guidance_embeds == (variant != "no_guidance_embedding")
    frozen = [policy.vae, policy.pipe.text_encoder, policy.pipe.text_encoder_2]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in policy.transformer.parameters()}
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    assert sampler.sigmas[0] == 1.0 and sampler.sigmas[-1] == 0.0 and len(sampler.sigmas) == STEPS + 1
    latents = sample_ode(policy, PROMPTS, SEEDS, sampler)
    assert latents.shape == (2, 4, 16, 16)

    pipe = load_pipeline(path)
    stock = pipeline_sample(pipe, policy, "latent", true_cfg)  # packed [B, 64, 16]
    # guidance embedding / none: the very same operations, bit-identical; true CFG: our one batch
    # [neg, pos] against the pipeline's two calls moves the last bits (~5e-7)
    torch.testing.assert_close(policy.pack(latents), stock, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy.unpack(stock), latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(pipe.scheduler.sigmas, sampler.sigmas, rtol=0, atol=0)  # the same grid
    images = policy.decode(latents)
    assert images.dtype == np.uint8 and images.shape == (2, SIDE, SIDE, 3)
    stock_images = to_uint8(pipeline_sample(pipe, policy, "np", true_cfg))
    assert np.abs(stock_images.astype(int) - images).max() <= (1 if variant == "true_cfg" else 0)
    if variant == "true_cfg":  # the negative branch really ran (on both sides): CFG changes the sample
        plain = sample_ode(make_policy(path), PROMPTS, SEEDS, sampler)
        assert (plain - latents).abs().max() > 1e-3


def test_sampler_grid_is_the_pipelines_and_leaves_its_scheduler_alone(tiny_flux_dir):
    policy = make_policy(tiny_flux_dir, lora_rank=4)
    before = policy.pipe.scheduler.sigmas.clone()
    sampler = policy.make_sampler(10, SamplerOptions(noise_level=0.9))
    assert torch.equal(policy.pipe.scheduler.sigmas, before)  # a copy of the scheduler was used
    assert sampler.noise_level == 0.9 and sampler.num_steps == 10
    assert torch.all(sampler.sigmas[1:] < sampler.sigmas[:-1])
    # the pipeline's grid: linspace(1, 1/N, N) through the exponential time shift at the packed length's mu, then 0
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    t = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)
    expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / t - 1))
    torch.testing.assert_close(sampler.sigmas[:-1].double(), expected, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="sampling.shift=3.0 does not apply to flux"):
        policy.make_sampler(4, SamplerOptions(shift=3.0))


def test_first_ratio_is_one_and_the_lora_moves_away_from_the_reference(tiny_flux_dir):
    policy = make_policy(tiny_flux_dir, lora_rank=4)
    trainable = policy.trainable_parameters()
    names = list(policy.state_dict())
    assert trainable and all("lora" in n for n in names) and all(p.dtype == torch.float32 for p in trainable)
    # both block types are adapted (single-stream blocks: q/k/v only, they have no to_out)
    assert any(n.startswith("transformer_blocks.0.attn.to_out.0.lora_A") for n in names)
    assert any(n.startswith("single_transformer_blocks.0.attn.to_q.lora_A") for n in names)
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    batch = rollout(policy, PROMPTS, 2, sampler, seeds=sample_seeds(0, 1, 4))
    assert batch.latents.shape == (4, STEPS + 1, 4, 16, 16) and batch.nfe == 4 * STEPS
    assert torch.isfinite(batch.log_probs[:, :-1]).all() and torch.isnan(batch.log_probs[:, -1]).all()
    advantages = group_advantages(torch.tensor([1.0, -1.0, 0.5, -0.5]), batch.group_index)
    # unchanged parameters: old log-probs from the same micro-batches, the ratio is exactly 1
    # (2 optimizer steps per epoch: the old log-probs come from a no-grad pass over the same micro-batches first)
    (stats,) = policy_update(policy, torch.optim.SGD(trainable, lr=0.0), batch, advantages, sampler, clip_range=1e-4,
                             beta=0.04, inner_epochs=1, max_grad_norm=1.0, train_batch_size=2, gradient_accumulation=1)
    # ratio_mean is a weighted float sum of exact 1.0 ratios (6 terms of weight 1/6 add up to 1 - 1e-16)
    assert stats.ratio_mean == pytest.approx(1.0, rel=0, abs=1e-12) and stats.clip_fraction == 0.0
    assert stats.approx_kl == 0.0 and stats.kl == 0.0 and stats.policy_loss == 0.0
    assert stats.optimizer_steps == 2 and stats.logp_drift < 1e-4

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
    assert (v_policy - v_reference).abs().max() > 1e-4


def test_lora_round_trip_through_load_lora_weights(tiny_flux_dir, tmp_path):
    policy = make_policy(tiny_flux_dir, lora_rank=4, lora_alpha=8)
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    base = sample_ode(policy, PROMPTS, SEEDS, sampler)
    batch = rollout(policy, PROMPTS, 3, sampler, seeds=sample_seeds(0, 1, 6))
    advantages = group_advantages(torch.randn(6, generator=torch.Generator().manual_seed(0)), batch.group_index)
    policy_update(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=0.05), batch, advantages, sampler,
                  clip_range=1e-4, beta=0.0, inner_epochs=1, max_grad_norm=1.0, train_batch_size=6)
    trained = sample_ode(policy, PROMPTS, SEEDS, sampler)
    with policy.reference():  # the adapter disabled is the base model
        torch.testing.assert_close(sample_ode(policy, PROMPTS, SEEDS, sampler), base, rtol=0, atol=0)

    (path,) = policy.export(tmp_path)
    assert path == tmp_path / "lora" and (path / "pytorch_lora_weights.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(path / "pytorch_lora_weights.safetensors", "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])  # diffusers prefixes it per component
        lora_b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)

    pipe = load_pipeline(tiny_flux_dir)
    torch.testing.assert_close(policy.unpack(pipeline_sample(pipe, policy, "latent")), base, rtol=0, atol=1e-5)
    base_images = to_uint8(pipeline_sample(pipe, policy, "np"))
    pipe.load_lora_weights(path)
    loaded = pipeline_sample(pipe, policy, "latent")
    # equal to our trained policy: without the saved metadata (alpha) diffusers would scale it differently
    torch.testing.assert_close(policy.unpack(loaded), trained, rtol=0, atol=1e-5)
    images = to_uint8(pipeline_sample(pipe, policy, "np"))
    assert np.abs(images.astype(int) - base_images).max() > 0, "the LoRA changed nothing"
    assert np.abs(images.astype(int) - policy.decode(trained)).max() <= 1


def test_mixed_precision_keeps_lora_and_log_probs_in_fp32(tiny_flux_dir):
    full = make_policy(tiny_flux_dir, lora_rank=4)
    bf16 = make_policy(tiny_flux_dir, lora_rank=4, dtype="bf16")
    assert bf16.pipe.text_encoder_2.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.transformer.parameters() if not p.requires_grad} == {torch.bfloat16}
    sampler = bf16.make_sampler(STEPS, SamplerOptions())
    batch = rollout(bf16, PROMPTS, 2, sampler, seeds=sample_seeds(0, 2, 4))
    assert batch.log_probs.dtype == torch.float32 and torch.isfinite(batch.log_probs[:, :-1]).all()
    x = torch.randn(2, *full.latent_shape, generator=torch.Generator().manual_seed(3))
    v32 = full.predict(x, sampler.timestep(1), full.encode_prompts(PROMPTS))
    v16 = bf16.predict(x, sampler.timestep(1), bf16.encode_prompts(PROMPTS))
    assert v16.dtype == torch.float32 and v16.shape == x.shape
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()  # bf16 is close, not equal
    images = bf16.decode(batch.final)
    assert images.dtype == np.uint8 and images.shape == (4, SIDE, SIDE, 3)


def test_full_fine_tuning_exports_a_loadable_transformer(tiny_flux_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    policy = make_policy(tiny_flux_dir)
    with torch.no_grad():
        policy.transformer.proj_out.bias.add_(0.5)  # stands in for training
    (path,) = policy.export(tmp_path)
    assert path == tmp_path / "transformer"
    loaded = FluxTransformer2DModel.from_pretrained(path, local_files_only=True)
    for name, value in policy.transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with policy.reference():  # the frozen copy is untouched
        assert not torch.equal(policy._active.proj_out.bias, policy.transformer.proj_out.bias)


def test_pruner_vae_decoder_agrees_with_the_adapter(tiny_flux_dir, tmp_path):
    from epgrpo.services.pruner.decode import get_decoder, register_vae_decoder

    policy = make_policy(tiny_flux_dir)
    assert policy.preview_decoder == "vae"
    source = policy.preview_decoder_source(tmp_path)
    assert source == str(Path(tiny_flux_dir).resolve()) and not any(tmp_path.iterdir())  # the local directory
    register_vae_decoder("tiny-flux-test", source)
    latents = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(get_decoder("tiny-flux-test")(latents.numpy(), "previews"), policy.decode(latents))


def flux_args(model_dir, out, *extra):
    return ["model.name=flux", f"model.path={model_dir}", "model.lora_rank=4", "model.max_sequence_length=16",
            f"model.resolution={SIDE}", "model.device=cpu", "sampling.num_steps=4", "sampling.guidance_scale=3.5",
            "prune.group_size=4", "prune.steps=[2]", "prune.keeps=[2]", "train.iterations=2",
            "train.prompts_per_iteration=1", "reward.rewards=jpeg_compressibility:1", "reward.judge=",
            "eval.samples_per_prompt=1", "eval.every=0", "eval.max_prompts=1", f"out_dir={out}", "progress=false",
            *extra]


@pytest.mark.slow
def test_cli_trains_flux_with_launched_services(tiny_flux_dir, tmp_path, capsys):
    from epgrpo.trainer.cli import main

    out = tmp_path / "run"
    assert main(["train", *flux_args(tiny_flux_dir, out, "train.lr=1e-2")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # per iteration and group: 4 trajectories make steps 0-2, the 2 survivors step 3 (vs 4 x 4); 1 NFE each
    assert summary["nfe_used"] == 2 * (4 * 3 + 2 * 1) and summary["nfe_full_group"] == 2 * 4 * 4
    assert summary["nfe_used"] < summary["nfe_full_group"]
    assert summary["trained_weights"] == [str(out / "lora")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["survivors_per_step"] for m in metrics] == [[4, 4, 4, 2]] * 2
    # the launched pruner decoded the latent previews with the model's VAE (a pixel pruner rejects them)
    assert (out / "services" / "pruner.log").read_text().count("opened") == 2

    # what the run exported is a trained LoRA the stock pipeline loads, and it changes the image
    from safetensors.torch import load_file

    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    noise = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(5))  # packed latents
    pipe = load_pipeline(tiny_flux_dir)
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5, height=SIDE, width=SIDE, max_sequence_length=16,
                  latents=noise, output_type="np")
    before = pipe("a red cat", **kwargs).images
    pipe.load_lora_weights(out / "lora")
    after = pipe("a red cat", **kwargs).images
    assert np.abs(after - before).max() > 0


def test_config_errors_name_their_key(tiny_flux_dir, tmp_path, capsys):
    from epgrpo.trainer.cli import main

    with pytest.raises(ValueError, match="model.path: the flux model needs"):
        create_policy("flux")
    with pytest.raises(ValueError, match="model.path: .* is not a pipeline directory"):
        create_policy("flux", path=str(REPO / "README.md"))
    from unittest import mock

    with mock.patch("diffusers.FluxPipeline.from_pretrained", side_effect=AssertionError("loaded the model")):
        with pytest.raises(ValueError, match=r"model.resolution: expected a multiple of 4 .* got 30"):
            make_policy(tiny_flux_dir, resolution=30)  # a local directory: checked before loading
    default = make_policy(tiny_flux_dir, resolution=0)  # the pipeline's own default: 128 x vae_scale_factor
    assert default.resolution == 256 and default.latent_shape == (4, 128, 128) and default.image_seq_len == 4096
    with pytest.raises(ValueError, match="model.true_cfg_scale: expected a finite number >= 1"):
        make_policy(tiny_flux_dir, true_cfg_scale=0.5)
    with pytest.raises(ValueError, match="model.max_sequence_length: expected 1..512"):
        create_policy("flux", path=str(tiny_flux_dir), max_sequence_length=600)
    # through the CLI: one line (progress=false also silences the loading bars), exit code 2, no service started
    capsys.readouterr()
    for override, key in [("model.path=", "model.path"), ("model.resolution=30", "model.resolution")]:
        out = tmp_path / key
        assert main(["train", *flux_args(tiny_flux_dir, out, override)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"epgrpo: error: {key}:"), err
        assert not (out / "services").exists()


def test_flux_dev_pickscore_config_validates():
    from epgrpo.trainer.config import load_config, schedule

    config = load_config(REPO / "trainer" / "configs" / "flux_dev_pickscore.yaml", [])
    m, s, p = config.model, config.sampling, config.prune
    assert (m.name, m.lora_rank, m.lora_alpha, m.resolution, m.true_cfg_scale) == ("flux", 32, 64.0, 512, 1.0)
    assert m.dtype == "bf16" and m.preview_decoder == "vae" and m.lora_targets == ""
    assert (s.num_steps, s.guidance_scale, s.noise_level) == (10, 3.5, 0.9)
    assert p.mode == "expand_prune" and p.group_size == 48 and schedule(config) == [(5, 24), (7, 12)]
    # NFE per group as the comment says: 48 trajectories make steps 0-5, 24 steps 6-7, 12 steps 8-9
    survivors = [48 if i <= 5 else 24 if i <= 7 else 12 for i in range(s.num_steps)]
    assert sum(survivors) == 48 * 6 + 24 * 2 + 12 * 2 == 360 and 48 * s.num_steps == 480
    assert config.reward.rewards == "pickscore:1.0" and config.eval.num_steps == 28 and config.train.ema


def test_t5_tokens_default_to_the_stock_pipelines_512(tiny_flux_dir):
    """model.max_sequence_length 0 (the default): FLUX conditions on FluxPipeline's default 512 T5 tokens."""
    policy = create_policy("flux", path=str(tiny_flux_dir), device="cpu", resolution=SIDE, max_sequence_length=0)
    assert policy.max_sequence_length == 512
    pipe = load_pipeline(tiny_flux_dir)
    stock, _, _ = pipe.encode_prompt(prompt=["a red cat"], prompt_2=None, device="cpu")
    ours = policy.encode_prompts(["a red cat"])["prompt_embeds"]
    assert ours.shape == stock.shape and stock.shape[1] == 512
    torch.testing.assert_close(ours, stock)

"""The 2026 image families (qwen_image, flux2_klein, z_image) on tiny random pipelines loaded through their real
loading path, one parametrized suite: ODE sampling on unpacked latents equals the stock pipeline
(latents bit for bit, images), the LoRA (the family's reference targets) moves away from the
reference, exports in the format the stock ``load_lora_weights`` reads and reproduces the trained
sample there, full fine-tuning exports a loadable transformer, FSDP wraps the family's blocks, the
pruner's decoder for the family's VAE equals the adapter's decode, config errors name their key
and the example configs validate (end to end: tests/test_image_families_e2e.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from image_families import (FAMILIES, NAMES, PROMPTS, SEEDS, SIDE, STEPS, cli_args, load_stock, make_policy,
                            stock_sample, to_uint8)

from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.rollout import rollout, sample_ode, sample_seeds
from epgrpo.trainer.samplers import SamplerOptions


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models are tiny: intra-op threads cost more than they save on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("name", NAMES)
def test_ode_sampling_equals_the_stock_pipeline(name, guided, family_dirs):
    family, path = FAMILIES[name], family_dirs(name)
    guidance = family.guidance if guided else 1.0
    policy = make_policy(family, path, guidance_scale=guidance)  # full fine-tuning, fp32 on CPU
    assert policy.latent_shape == family.latent_shape and policy.nfe_per_sample == (2 if guided else 1)
    frozen = [m for k, m in policy.pipe.components.items() if isinstance(m, torch.nn.Module) and k != "transformer"]
    assert frozen and all(not p.requires_grad for m in frozen for p in m.parameters())
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in policy.transformer.parameters()}
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    latents = sample_ode(policy, PROMPTS, SEEDS, sampler)
    assert latents.shape == (2, *family.latent_shape)

    pipe = load_stock(family, path)
    stock = stock_sample(family, pipe, policy, "latent", guidance)
    # the same operations in the same order: the same bits
    torch.testing.assert_close(family.stock_latents(pipe, latents), stock, rtol=0, atol=0)
    torch.testing.assert_close(pipe.scheduler.sigmas, sampler.sigmas, rtol=0, atol=0)  # the pipeline's grid
    images = policy.decode(latents)
    assert images.dtype == np.uint8 and images.shape == (2, SIDE, SIDE, 3)
    assert np.abs(to_uint8(stock_sample(family, pipe, policy, "np", guidance)).astype(int) - images).max() == 0
    if guided:  # the guidance really ran on both sides: it changes the sample
        plain = sample_ode(make_policy(family, path), PROMPTS, SEEDS, sampler)
        assert (plain - latents).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_each_distinct_prompt_is_encoded_once_and_the_negative_once_per_run(name, family_dirs):
    family = FAMILIES[name]
    policy = make_policy(family, family_dirs(name), guidance_scale=family.guidance)
    rows = []
    policy.pipe.text_encoder.register_forward_hook(lambda module, args, kwargs, out: rows.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    prompts = ["a red cat", "a blue dog", "a red cat", "a red cat"]
    cond = policy.encode_prompts(prompts)
    assert sum(rows) == 2 + 1  # the two distinct prompts, then the negative one
    assert all(v.shape[0] == 4 for v in cond.values())
    assert torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    alone = policy.encode_prompts(["a blue dog"])["prompt_embeds"][0]
    width = min(alone.shape[0], cond["prompt_embeds"].shape[1])  # padded to the longest of its batch
    torch.testing.assert_close(cond["prompt_embeds"][1, :width], alone[:width], rtol=0, atol=1e-6)
    assert sum(rows) == 2 + 1 + 1  # the negative prompt's encoding is cached


@pytest.mark.parametrize("name", NAMES)
def test_sampler_grid_is_the_pipelines_and_leaves_its_scheduler_alone(name, family_dirs):
    family = FAMILIES[name]
    policy = make_policy(family, family_dirs(name), lora_rank=2)
    before = policy.pipe.scheduler.sigmas.clone() if policy.pipe.scheduler.sigmas is not None else None
    sampler = policy.make_sampler(10, SamplerOptions(noise_level=0.9))
    after = policy.pipe.scheduler.sigmas
    assert (before is None and after is None) or torch.equal(after, before)
    assert sampler.noise_level == 0.9 and sampler.num_steps == 10
    assert sampler.sigmas[0] == 1.0 and sampler.sigmas[-1] == 0.0 and torch.all(sampler.sigmas[1:] < sampler.sigmas[:-1])
    with pytest.warns(UserWarning, match=f"sampling.shift=3.0 does not apply to {name}"):
        policy.make_sampler(4, SamplerOptions(shift=3.0))


@pytest.mark.parametrize("name", NAMES)
def test_lora_trains_exports_and_the_stock_pipeline_reproduces_its_sample(name, family_dirs, tmp_path):
    family, path = FAMILIES[name], family_dirs(name)
    policy = make_policy(family, path, lora_rank=4, lora_alpha=8)
    names = list(policy.state_dict())
    assert names and all("lora" in n for n in names)
    for module in family.lora_modules:  # the reference trainers' targets
        assert f"{module}.lora_A.default.weight" in names, (module, names[:6])
    sampler = policy.make_sampler(STEPS, SamplerOptions())
    base = sample_ode(policy, PROMPTS, SEEDS, sampler)
    batch = rollout(policy, PROMPTS, 2, sampler, seeds=sample_seeds(0, 1, 4))
    assert batch.latents.shape == (4, STEPS + 1, *family.latent_shape) and batch.nfe == 4 * STEPS
    assert torch.isfinite(batch.log_probs[:, :-1]).all()
    advantages = group_advantages(torch.tensor([1.0, -1.0, 0.5, -0.5]), batch.group_index)
    (stats,) = policy_update(policy, torch.optim.SGD(policy.trainable_parameters(), lr=0.0), batch, advantages,
                             sampler, clip_range=1e-4, beta=0.04, inner_epochs=1, max_grad_norm=1.0,
                             train_batch_size=2, gradient_accumulation=1)
    # unchanged weights: the first ratio is exactly 1 and the LoRA (B = 0) is the reference
    assert stats.ratio_mean == pytest.approx(1.0, rel=0, abs=1e-12) and stats.kl == 0.0
    policy_update(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=0.05), batch, advantages, sampler,
                  clip_range=1e-4, beta=0.0, inner_epochs=1, max_grad_norm=1.0, train_batch_size=4)
    trained = sample_ode(policy, PROMPTS, SEEDS, sampler)
    assert (trained - base).abs().max() > 1e-4
    with policy.reference():  # the adapter disabled is the base model
        torch.testing.assert_close(sample_ode(policy, PROMPTS, SEEDS, sampler), base, rtol=0, atol=0)

    (exported,) = policy.export(tmp_path)
    assert exported == tmp_path / "lora" and (exported / "pytorch_lora_weights.safetensors").is_file()
    pipe = load_stock(family, path)
    pipe.load_lora_weights(exported)
    loaded = stock_sample(family, pipe, policy, "latent", 1.0)
    # the trained sample: without the saved alpha diffusers would scale the LoRA differently
    torch.testing.assert_close(loaded, family.stock_latents(pipe, trained), rtol=0, atol=1e-5)
    images = to_uint8(stock_sample(family, pipe, policy, "np", 1.0))
    assert np.abs(images.astype(int) - policy.decode(trained)).max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_full_fine_tuning_exports_a_loadable_transformer_and_fsdp_wraps_its_blocks(name, family_dirs, tmp_path):
    import diffusers

    from epgrpo.trainer.fsdp import blocks

    family = FAMILIES[name]
    policy = make_policy(family, family_dirs(name))
    moved, _ = list(policy.transformer.named_parameters())[-1]  # the output projection
    with torch.no_grad():
        policy.transformer.get_parameter(moved).add_(0.5)  # stands in for training
    (exported,) = policy.export(tmp_path)
    assert exported == tmp_path / "transformer"
    loaded = getattr(diffusers, family.transformer).from_pretrained(exported, local_files_only=True)
    for key, value in policy.transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with policy.reference():  # the frozen copy is untouched
        assert not torch.equal(policy._active.get_parameter(moved), policy.transformer.get_parameter(moved))
    # FSDP's units: every block the model declares unsplittable, each on its own, and nothing else
    units = blocks(policy.transformer)
    declared = tuple(policy.transformer._no_split_modules)
    expected = [m for m in policy.transformer.modules() if type(m).__name__ in declared]
    assert expected and [id(m) for m in units] == [id(m) for m in expected]


@pytest.mark.parametrize("name", NAMES)
def test_pruner_decoder_for_the_family_vae_equals_the_adapters_decode(name, family_dirs, tmp_path):
    from epgrpo.services.pruner.decode import get_decoder, register_vae_decoder

    family, path = FAMILIES[name], family_dirs(name)
    policy = make_policy(family, path)
    source = policy.preview_decoder_source(tmp_path)
    assert source == str(Path(path).resolve())
    register_vae_decoder(f"tiny-{name}-test", source)
    latents = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    decoded = get_decoder(f"tiny-{name}-test")(latents.numpy(), "previews")
    np.testing.assert_array_equal(decoded, policy.decode(latents))
    assert decoded.std() > 0


def test_a_vae_class_without_a_decoder_is_refused_naming_it(tmp_path):
    from epgrpo.services.pruner.decode import register_vae_decoder

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLSomethingNew"}))
    with pytest.raises(ValueError, match=r"--vae x=.*: no preview decoder for a AutoencoderKLSomethingNew; known: "
                                         r"AutoencoderKL, .*AutoencoderKLQwenImage"):
        register_vae_decoder("x", tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_config_errors_name_their_key(name, family_dirs, tmp_path, capsys):
    from unittest import mock

    import diffusers

    from epgrpo.trainer.cli import main

    family, path = FAMILIES[name], family_dirs(name)
    with pytest.raises(ValueError, match=f"model.path: the {name} model needs"):
        create_policy(name)
    with mock.patch.object(getattr(diffusers, family.pipeline), "from_pretrained",
                           side_effect=AssertionError("loaded the model")):
        with pytest.raises(ValueError, match=r"model.resolution: expected a multiple of 4 .* got 30"):
            make_policy(family, path, resolution=30)  # a local directory: checked before loading
        with pytest.raises(ValueError, match="sampling.guidance_scale: expected a finite number >= 1"):
            make_policy(family, path, guidance_scale=0.5)
        with pytest.raises(ValueError, match="model.max_sequence_length: expected 1.."):
            make_policy(family, path, max_sequence_length=5000)
    capsys.readouterr()
    out = tmp_path / "run"  # through the CLI: one line, exit code 2, no service started
    assert main(["train", *cli_args(family, path, out, "prune.steps=[2]", "prune.keeps=[2]", "prune.group_size=4",
                                    "model.resolution=30")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("epgrpo: error: model.resolution:"), err
    assert not (out / "services").exists()


def test_step_distilled_flux2_klein_samples_without_guidance_and_refuses_it(tmp_path):
    """klein's distilled checkpoints (is_distilled) run one call per step; a guidance scale would be
    silently ignored by the pipeline, so the adapter refuses it."""
    from tiny_flux2_klein import build_tiny_flux2_klein

    family = FAMILIES["flux2_klein"]
    path = build_tiny_flux2_klein(tmp_path / "distilled", is_distilled=True)
    with pytest.raises(ValueError, match="sampling.guidance_scale: .* is step-distilled"):
        make_policy(family, path, guidance_scale=3.0)
    policy = make_policy(family, path)
    assert policy.nfe_per_sample == 1
    latents = sample_ode(policy, PROMPTS, SEEDS, policy.make_sampler(STEPS, SamplerOptions()))
    pipe = load_stock(family, path)
    stock = stock_sample(family, pipe, policy, "latent", 4.0)  # the pipeline's default guidance, ignored
    torch.testing.assert_close(family.stock_latents(pipe, latents), stock, rtol=0, atol=0)


@pytest.mark.parametrize("config_name, name, schedule_, nfe", [
    ("qwen_image_pickscore", "qwen_image", [(5, 24), (7, 12)], 2 * (48 * 6 + 24 * 2 + 12 * 2)),
    ("flux2_klein_pickscore", "flux2_klein", [(5, 24), (7, 12)], 2 * (48 * 6 + 24 * 2 + 12 * 2)),
    ("z_image_turbo_pickscore", "z_image", [(2, 16), (4, 8)], 32 * 3 + 16 * 2 + 8 * 3)])
def test_example_configs_validate_with_the_nfe_their_comments_state(config_name, name, schedule_, nfe):
    from epgrpo.trainer.config import ModelConfig, load_config, schedule
    from epgrpo.trainer.policy.base import check_policy_options

    config = load_config(Path(__file__).resolve().parents[1] / "trainer" / "configs" / f"{config_name}.yaml", [])
    assert config.model.name == name and schedule(config) == schedule_ and config.model.resolution == 1024
    options = {k: v for k, v in vars(config.model).items()
               if k not in ("name", "preview_vae") and v != getattr(ModelConfig(), k)}
    check_policy_options(name, {**options, "guidance_scale": config.sampling.guidance_scale})  # loads no model
    steps, cfg = config.sampling.num_steps, 2 if config.sampling.guidance_scale > 1 else 1
    (s1, k1), (s2, k2) = schedule(config)
    survivors = [config.prune.group_size if i <= s1 else k1 if i <= s2 else k2 for i in range(steps)]
    assert cfg * sum(survivors) == nfe

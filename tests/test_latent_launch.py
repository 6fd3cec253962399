"""Latent models on one box: ``epgrpo train`` launches the pruner with the model's VAE, and a
remote pruner without the decoder stops the run with one clear line before any sampling."""

import json

import pytest

from epgrpo.trainer.cli import main
from epgrpo.trainer.launch import LocalStack

pytestmark = pytest.mark.slow


def latent_args(model_dir, out, *extra):
    return ["model.name=sd3", f"model.path={model_dir}", "model.lora_rank=4", "model.max_sequence_length=8",
            "model.device=cpu", "sampling.num_steps=4", "sampling.shift=3.0", "sampling.guidance_scale=1.0",
            "prune.group_size=4", "prune.steps=[2]", "prune.keeps=[2]", "train.iterations=2",
            "train.prompts_per_iteration=1", "reward.rewards=jpeg_compressibility:1", "reward.judge=",
            "eval.samples_per_prompt=1", "eval.every=0", "eval.max_prompts=1", f"out_dir={out}", "progress=false",
            *extra]


def test_sd3_with_launched_services_decodes_previews_with_its_vae(tiny_sd3_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *latent_args(tiny_sd3_dir, out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nfe_used"] == 2 * (4 * 3 + 2 * 1) and summary["nfe_full_group"] == 2 * 4 * 4
    assert summary["trained_weights"] == [str(out / "lora")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["survivors_per_step"] for m in metrics] == [[4, 4, 4, 2]] * 2
    # the launched pruner decoded the latent previews itself (a pixel-only pruner rejects them)
    assert (out / "services" / "pruner.log").read_text().count("opened") == 2


def test_remote_pruner_without_the_decoder_fails_fast_with_one_line(tiny_sd3_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with LocalStack(["jpeg_compressibility"], tmp_path / "services") as stack:  # a pruner without --vae
        code = main(["train", *latent_args(tiny_sd3_dir, out, "launch_services=false",
                                           f"reward.address={stack.reward.address}",
                                           f"pruner.address={stack.pruner.address}")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("epgrpo: error:")]
    assert len(errors) == 1
    line = errors[0]
    assert "model.preview_decoder" in line and "'vae'" in line and "pixel" in line and "--vae vae=DIR" in line
    assert not (out / "samples_first.png").exists() and not (out / "metrics.jsonl").exists()  # nothing was sampled

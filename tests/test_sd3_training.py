"""Expand-and-Prune GRPO on a tiny random SD3 pipeline through the real reward and pruner services:
x0-previews travel as latents and the pruner decodes them with its VAE decoder."""

import json

import numpy as np
from safetensors.torch import load_file

from epgrpo.trainer.clients import PrunerClient

from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.loop import Trainer
from epgrpo.trainer.policy.base import create_policy


def test_expand_and_prune_on_sd3_through_grpc(sd3_services, tiny_sd3_dir, tmp_path):
    reward, pruner = sd3_services
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n\na green tree\n")
    out = tmp_path / "run"
    config = load_config(None, [
        "model.name=sd3", f"model.path={tiny_sd3_dir}", "model.lora_rank=4", "model.max_sequence_length=8",
        "model.preview_decoder=tiny-sd3-vae", "model.device=cpu", "sampling.guidance_scale=4.5",
        "sampling.num_steps=4", "sampling.shift=3.0", "prune.group_size=6", "prune.steps=[1,2]", "prune.keeps=[4,2]",
        "train.iterations=2", "train.prompts_per_iteration=2", f"train.prompt_file={prompts}", "train.lr=1e-2",
        "reward.rewards=jpeg_compressibility:1", "reward.judge=", "eval.samples_per_prompt=1", "eval.every=0",
        f"out_dir={out}", "launch_services=false", "progress=false",
    ])
    options = {k: v for k, v in vars(config.model).items() if k not in ("name", "device")}
    policy = create_policy("sd3", **options, device="cpu", guidance_scale=4.5)
    reward_client, pruner_client = RewardClient(reward.address), PrunerClient(pruner.address)
    try:
        summary = json.loads(Trainer(config, policy, reward_client, pruner_client).run().read_text())
    finally:
        reward_client.close()
        pruner_client.close()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_group = (6 * 2 + 4 * 1 + 2 * 1) * 2  # survivors per step, x2 transformer calls with CFG
    assert [m["survivors_per_step"] for m in metrics] == [[12, 12, 8, 4]] * 2
    assert [m["nfe"] for m in metrics] == [2 * per_group] * 2 and summary["nfe_full_group"] == 2 * 2 * 6 * 4 * 2
    for m in metrics:
        assert m["kept"] == 4 and m["ratio_mean"] == 1.0 and "skipped" not in m and m["grad_norm"] > 0
    assert summary["trained_weights"] == [str(out / "lora")]
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") and "lora" in k for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained (B starts at zero)
    assert np.isfinite(summary["reward_last"])
    assert (out / "checkpoints" / "iter_000002" / "state.json").is_file()

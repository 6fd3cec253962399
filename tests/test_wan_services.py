"""Wan 2.x through the services: the pruner's Wan VAE decoder equals the adapter's decode for any
number of latent frames (first-frame previews included), a launched pruner decodes previews like the
adapter, ``epgrpo train`` runs Expand-and-Prune on first-frame previews through launched services,
and ``epgrpo analyze`` reports first-frame fidelity."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_fixtures import (  # noqa: F401 - fixtures, used by name
    FRAMES, GUIDANCE, LATENT_SHAPE, SIDE, TOKENS, _one_torch_thread, load_pipeline, make_policy, pipeline_sample,
    tiny_wan_dir
)


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

"""Every algorithm end to end under Expand-and-Prune: a tiny SD3 pipeline through the launched reward and
pruner services, exact resume, and 2 data-parallel ranks agreeing with 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epgrpo.trainer.cli import main
from conftest import free_port

WORKER = Path(__file__).with_name("algorithms_worker.py")

pytestmark = pytest.mark.slow

ALGORITHMS = ["grpo_guard", "mixgrpo", "nft", "awm"]
# each algorithm with options that make its own machinery visible in two iterations
OWN_OPTIONS = {"grpo_guard": [], "mixgrpo": ["algo.mixgrpo_shift_interval=1"], "nft": ["algo.nft_beta=0.5"],
               "awm": ["algo.awm_weighting=t", "algo.awm_timesteps=2"]}


@pytest.fixture(scope="module")
def launched_sd3_services(tiny_sd3_dir, tmp_path_factory):
    """The reward service and the pruner as local processes (as ``epgrpo train`` launches them), the
    pruner decoding the tiny SD3 pipeline's previews with its VAE; started once for every algorithm."""
    from epgrpo.trainer.launch import LocalStack

    with LocalStack(["jpeg_compressibility"], tmp_path_factory.mktemp("services"),
                    decoders={"tiny-sd3-vae": str(tiny_sd3_dir / "vae")}) as stack:
        yield stack


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_iterations_on_sd3_through_both_launched_services(algorithm, launched_sd3_services, tiny_sd3_dir,
                                                              tmp_path):
    """2 iterations of Expand-and-Prune 4 -> 2 on a tiny SD3 pipeline under the algorithm, through the
    launched reward service and pruner (which decodes the latent previews with the VAE)."""
    out = tmp_path / "run"
    stack = launched_sd3_services
    assert main(["train", f"reward.address={stack.reward.address}", f"pruner.address={stack.pruner.address}",
                 "launch_services=false", "model.preview_decoder=tiny-sd3-vae", "model.name=sd3",
                 f"model.path={tiny_sd3_dir}", "model.lora_rank=4",
                 "model.max_sequence_length=8", "model.device=cpu", "sampling.num_steps=4", "sampling.shift=3.0",
                 "sampling.guidance_scale=1.0", "sampling.sde_window_size=2", "prune.group_size=4", "prune.steps=[2]",
                 "prune.keeps=[2]", "train.iterations=2", "train.prompts_per_iteration=2", "train.lr=1e-2",
                 "reward.rewards=jpeg_compressibility:1", "reward.judge=", "eval.samples_per_prompt=1", "eval.every=0",
                 "eval.max_prompts=1", f"out_dir={out}", "progress=false", f"train.algorithm={algorithm}",
                 *OWN_OPTIONS[algorithm]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["survivors_per_step"] for m in metrics] == [[8, 8, 8, 4]] * 2  # pruned at step 2 under every algorithm
    assert summary["nfe_used"] == 2 * (8 * 3 + 4) and summary["nfe_full_group"] == 2 * 8 * 4
    steps = [m["trained_steps"] for m in metrics]
    if algorithm == "grpo_guard":  # Flow-GRPO-Fast's window of 2 at a random start in [0, 2)
        assert all(len(s) == 2 and s[1] == s[0] + 1 and s[0] in (0, 1) for s in steps)
    else:  # MixGRPO's window moves one step per iteration; DiffusionNFT and AWM sample by the ODE
        assert steps == {"mixgrpo": [[0, 1], [1, 2]], "nft": [[], []], "awm": [[], []]}[algorithm]
    for m in metrics:
        assert m["kept"] == 4 and "skipped" not in m and m["grad_norm"] > 0 and 0 <= m["zero_std_ratio"] <= 1
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained (B starts at zero)


def _toy_train(services, policy, out, *overrides):
    from test_checkpoint import train

    return train(services, policy, out, *overrides)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_reproduces_the_uninterrupted_run_exactly(algorithm, services, tiny_policy_factory, tmp_path):
    from test_checkpoint import metrics

    own = [f"train.algorithm={algorithm}", *OWN_OPTIONS[algorithm]]
    straight = _toy_train(services, tiny_policy_factory(lora_rank=4), tmp_path / "a", "train.iterations=2", *own)
    _toy_train(services, tiny_policy_factory(lora_rank=4), tmp_path / "b", "train.iterations=1", *own)
    resumed = _toy_train(services, tiny_policy_factory(lora_rank=4), tmp_path / "b", "train.iterations=2",
                         "train.resume_from=latest", *own)
    for name, value in straight.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[name], value), name
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b") and len(metrics(tmp_path / "a")) == 2
    assert resumed.completed_iteration == 2


def test_two_ranks_agree_with_one_under_every_algorithm(services, tiny_policy_factory, tmp_path):
    """One ``accelerate launch`` of 2 gloo ranks trains each algorithm in turn; each run's ranks end
    identical and equal the same run on 1 rank, up to float summation order (which AdamW turns into
    differences of up to 1e-5 on weights whose gradient is near 0: 1e-3 of one step at lr 1e-2)."""
    reward, pruner = services
    toy_dir = tiny_policy_factory().model_dir
    common = [f"model.path={toy_dir}", "model.device=cpu", "prune.group_size=4",
              "prune.steps=[1]", "prune.keeps=[2]", "sampling.num_steps=4", "sampling.sde_window_size=2",
              "train.iterations=2", "train.prompts_per_iteration=4", "train.lr=1e-2",
              "reward.rewards=jpeg_compressibility:1", "reward.judge=", "eval.samples_per_prompt=1", "eval.every=0",
              "eval.max_prompts=2", f"reward.address={reward.address}", f"pruner.address={pruner.address}",
              "launch_services=false", "progress=false"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(WORKER), str(tmp_path / "two"),
               json.dumps(OWN_OPTIONS), *common]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for algorithm in ALGORITHMS:
        one = tmp_path / "one" / algorithm
        assert main(["train", *common, f"train.algorithm={algorithm}", *OWN_OPTIONS[algorithm], f"out_dir={one}"]) == 0
        ranks = [load_file(tmp_path / "two" / algorithm / f"rank{r}.safetensors") for r in range(2)]
        single = load_file(one / "policy.safetensors")
        initial = load_file(Path(toy_dir) / "transformer" / "diffusion_pytorch_model.safetensors")
        assert ranks[0].keys() == single.keys()
        moved = 0.0
        for name, value in ranks[0].items():
            assert torch.equal(value, ranks[1][name]), (algorithm, name)  # the ranks stay identical
            torch.testing.assert_close(value, single[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{algorithm}: {m}")
            base = initial.get(name.removeprefix("transformer."))
            if base is not None:
                moved = max(moved, float((value - base).abs().max()))
        assert moved > 1e-3, algorithm  # trained well beyond the tolerance
        two = [json.loads(line) for line in (tmp_path / "two" / algorithm / "metrics.jsonl").read_text().splitlines()]
        solo = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
        assert [m["reward_mean"] for m in two] == pytest.approx([m["reward_mean"] for m in solo], rel=1e-5)
        assert [m["trained_steps"] for m in two] == [m["trained_steps"] for m in solo]

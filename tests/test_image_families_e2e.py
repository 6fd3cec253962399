"""The 2026 image families end to end on their tiny pipelines: ``epgrpo train`` runs 2
Expand-and-Prune iterations with launched services (the pruner decoding the previews with the
family's VAE) and ``epgrpo analyze`` runs; FSDP over 2 gloo ranks equals the unsharded model."""

import json
from pathlib import Path

import pytest
import torch
from image_families import FAMILIES, NAMES, cli_args


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models are tiny: intra-op threads cost more than they save on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_cli_expand_prune_with_launched_services_and_analyze(name, family_dirs, tmp_path):
    from epgrpo.trainer.cli import main

    family, path = FAMILIES[name], family_dirs(name)
    out = tmp_path / "run"
    assert main(["train", *cli_args(family, path, out, "prune.group_size=4", "prune.steps=[2]", "prune.keeps=[2]",
                                    "train.iterations=2", "train.prompts_per_iteration=1", "train.lr=1e-2",
                                    "eval.samples_per_prompt=1", "eval.every=0", "eval.max_prompts=1")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    nfe = 2  # guidance on: both branches
    # per iteration: 4 trajectories make steps 0-2, the 2 survivors step 3
    assert summary["nfe_used"] == nfe * 2 * (4 * 3 + 2 * 1) and summary["nfe_full_group"] == nfe * 2 * 4 * 4
    assert summary["trained_weights"] == [str(out / "lora")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["survivors_per_step"] for m in metrics] == [[4, 4, 4, 2]] * 2
    # the launched pruner decoded the latent previews with the family's VAE (a pixel pruner rejects them)
    assert (out / "services" / "pruner.log").read_text().count("opened") == 2

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    analysis = tmp_path / "analysis"
    assert main(["analyze", "--groups", "2", "--group-size", "4", "--keep", "2",
                 *cli_args(family, path, analysis, "sampling.num_steps=3", "prune.mode=grpo",
                           f"train.prompt_file={prompts}", "model.lora_rank=0")]) == 0
    result = json.loads((analysis / "analysis.json").read_text())
    assert [g["prompt"] for g in result["clustering"]["groups"]] == ["a red cat", "a blue dog"]
    assert len(result["fidelity"]["per_step"]) == 3


@pytest.mark.slow
def test_fsdp_on_two_ranks_shards_every_family_and_matches_the_unsharded_model(family_dirs, tmp_path):
    import os
    import subprocess
    import sys

    worker = Path(__file__).with_name("fsdp_family_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
         str(worker), str(tmp_path / "record"), *(f"{n}={family_dirs(n)}" for n in NAMES)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    ranks = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text()) for r in range(2)]
    for name in NAMES:
        facts = [r[name] for r in ranks]
        full = facts[0]["full"]
        assert facts[0]["local"] + facts[1]["local"] == full  # every weight on exactly one rank
        assert all(abs(f["local"] - full / 2) <= 0.05 * full for f in facts), (name, facts)  # about half each
        for f in facts:  # the sharded policy and reference compute the unsharded velocity
            assert f["predict_diff"] < 1e-5 and f["reference_diff"] < 1e-5, (name, f)
        assert facts[0]["step_diff"] < 1e-5, (name, facts[0])  # and take the same SGD step

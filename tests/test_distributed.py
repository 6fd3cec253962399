"""Data-parallel training: ``accelerate launch`` with 2 CPU processes (gloo) through the real
``epgrpo train`` entry point and the real services."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")


def two_ranks(services, toy_dir, record, out, *extra, env=None, check=True, timeout=300):
    """``epgrpo train`` (with recording hooks) as 2 CPU ranks under ``accelerate launch``."""
    reward, pruner = services
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(WORKER), str(record),
        f"model.path={toy_dir}", "model.device=cpu", "prune.group_size=4", "prune.steps=[1]", "prune.keeps=[2]",
        "sampling.num_steps=4", "train.iterations=2", "train.prompts_per_iteration=4",
        "reward.rewards=jpeg_compressibility:1", "reward.judge=", "eval.samples_per_prompt=1", "eval.every=0",
        "eval.max_prompts=2", f"reward.address={reward.address}", f"pruner.address={pruner.address}",
        "launch_services=false", "progress=false", f"out_dir={out}", *extra,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,  # a hang fails the test
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_ranks_average_gradients_and_keep_groups_whole(services, tiny_policy_factory, tmp_path):
    record, out = tmp_path / "record", tmp_path / "run"
    two_ranks(services, tiny_policy_factory().model_dir, record, out, "train.train_batch_size=3", "train.lr=1e-2")
    ranks = [load_file(record / f"rank{r}.safetensors") for r in range(2)]
    facts = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    assert [f["world_size"] for f in facts] == [2, 2]

    # gradients: each rank's own differ; after the all-reduce both hold exactly their mean
    count = sum(1 for k in ranks[0] if k.startswith("local."))
    assert count > 0
    assert any(not torch.equal(ranks[0][f"local.{k}"], ranks[1][f"local.{k}"]) for k in range(count))
    for k in range(count):
        assert torch.equal(ranks[0][f"synced.{k}"], ranks[1][f"synced.{k}"])
        mean = (ranks[0][f"local.{k}"] + ranks[1][f"local.{k}"]) / 2
        torch.testing.assert_close(ranks[0][f"synced.{k}"], mean, rtol=1e-5, atol=1e-8)
    finals = [k for k in ranks[0] if k.startswith("final.")]
    assert finals and all(torch.equal(ranks[0][k], ranks[1][k]) for k in finals)  # the ranks stay identical

    # groups: whole on one rank, disjoint, all of the iteration's prompts; advantages per group
    for it in range(2):
        mine = [f["groups"][it] for f in facts]
        assert [m["first_group"] for m in mine] == [0, 2]
        assert not set(mine[0]["prompts"]) & set(mine[1]["prompts"])
        update = [f["updates"][it] for f in facts]
        for u in update:
            kept = Counter(u["prompts"])
            assert set(kept.values()) == {2}  # keep 2 per group, every survivor on its group's rank
            for prompt in kept:
                adv = [a for p, a in zip(u["prompts"], u["advantages"]) if p == prompt]
                assert abs(sum(adv)) < 1e-5  # centred on its own group's survivors
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["nfe_used"] == 2 * 4 * (4 * 2 + 2 * 2)


@pytest.mark.slow
def test_one_rank_without_its_pruner_goes_on_unpruned_and_the_ranks_stay_consistent(services, tiny_policy_factory,
                                                                                      tmp_path):
    record, out = tmp_path / "record", tmp_path / "run"
    # one optimizer step per micro-batch of 2: rank 0 holds 2 micro-batches, rank 1 holds 4; rank 0 pads with
    # zero-weight ones, so both take 4 steps and their gradient all-reduces line up (else: a hang or a crash)
    two_ranks(services, tiny_policy_factory().model_dir, record, out, "pruner.on_unavailable=no_prune",
              "train.train_batch_size=2", "train.gradient_accumulation=1", env={"EPGRPO_TEST_PRUNER_DOWN_ON_RANK": "1"})
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:  # rank 0 pruned its 2 groups 4 -> 2; rank 1 kept all 4 of its 2 groups
        assert m["kept"] == 2 * 2 + 2 * 4 and m["pruner_fallback_groups"] == 2
        assert m["nfe"] == 2 * (4 * 2 + 2 * 2) + 2 * 4 * 4
        assert m["optimizer_steps"] == 4  # rank 0's count: its 2 micro-batches plus 2 of padding
    facts = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(f["updates"][0]["prompts"]) for f in facts] == [4, 8]  # each rank trains on its own survivors
    finals = [load_file(record / f"rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0] if k.startswith("final."))


@pytest.mark.slow
def test_under_fsdp_a_rank_without_its_pruner_stops_the_run_at_once_naming_the_way_back(services, tiny_policy_factory,
                                                                                        tmp_path):
    """A rank cannot re-run a sharded iteration alone (the others' collectives would pair with the
    wrong calls): no retry, no checkpoint at the failure, one clear line, the launcher stops the rest."""
    record, out = tmp_path / "record", tmp_path / "run"
    proc = two_ranks(services, tiny_policy_factory().model_dir, record, out, "train.fsdp=true",
                     "pruner.retry_budget_s=60", env={"EPGRPO_TEST_PRUNER_DOWN_ON_RANK": "1"}, check=False)
    assert proc.returncode != 0
    assert "epgrpo: error: a service stayed unreachable, stopping" in proc.stderr
    assert "with train.fsdp an iteration is not re-run on one rank" in proc.stderr
    assert "gave up after 1 attempts over the 0 s retry budget" in proc.stderr  # not the 60 s given
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_a_rank_whose_pruner_fails_once_retries_together_with_the_others(services, tiny_policy_factory, tmp_path):
    """Rank 1's first pruning call fails: every rank re-runs that iteration (rank 0 would otherwise wait
    in the reward gather for a rank that is sampling again), and the run ends as if nothing happened."""
    record, out = tmp_path / "record", tmp_path / "run"
    two_ranks(services, tiny_policy_factory().model_dir, record, out, "pruner.retry_budget_s=30",
              env={"EPGRPO_TEST_PRUNER_FAILS_ON_RANK": "1:1"})
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2] and metrics[0]["service_retries"] == 1
    assert "service_retries" not in metrics[1]
    facts = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 0 sampled iteration 1 twice (same prompts: the sampler was rewound); rank 1's first attempt
    # raised inside its rollout, so only its retry is recorded
    assert [[g["iteration"] for g in f["groups"]] for f in facts] == [[1, 1, 2], [1, 2]]
    assert facts[0]["groups"][0]["prompts"] == facts[0]["groups"][1]["prompts"]
    finals = [load_file(record / f"rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0] if k.startswith("final."))


@pytest.mark.slow
def test_when_one_rank_gives_up_on_its_pruner_every_rank_stops_and_saves_the_same_checkpoint(
        services, tiny_policy_factory, tmp_path):
    record, out = tmp_path / "record", tmp_path / "run"
    proc = two_ranks(services, tiny_policy_factory().model_dir, record, out, "pruner.retry_budget_s=1",
                     "train.iterations=3", env={"EPGRPO_TEST_PRUNER_FAILS_ON_RANK": "1:1000"}, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("epgrpo: error: a service stayed unreachable, stopping") == 2, proc.stderr[-3000:]
    assert "last error: another rank's service call failed" in proc.stderr  # rank 0 says whose outage it was
    assert proc.stderr.count("saved a checkpoint of the completed iterations") == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000000"]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_when_rank_0s_evaluation_cannot_be_scored_every_rank_stops_with_the_same_checkpoint(
        services, tiny_policy_factory, tmp_path):
    """Evaluation is scored on rank 0 alone: its failure after iteration 1 stops both ranks there (rank 1
    does not start iteration 2 while rank 0 waits in the checkpoint's barrier), and the resumed run
    evaluates iteration 1 before going on."""
    record, out, toy = tmp_path / "record", tmp_path / "run", tiny_policy_factory().model_dir
    proc = two_ranks(services, toy, record, out, "reward.retry_budget_s=1", "train.iterations=3", "eval.every=1",
                     env={"EPGRPO_TEST_EVAL_FAILS_ON_RANK": "0:1"}, check=False, timeout=200)
    assert proc.returncode != 0
    assert proc.stderr.count("epgrpo: error: a service stayed unreachable, stopping") == 2, proc.stderr[-3000:]
    assert "Score eval-1: gave up" in proc.stderr and "another rank's service stayed unreachable" in proc.stderr
    assert proc.stderr.count("saved a checkpoint of the completed iterations") == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000001"]
    saved = out / "checkpoints" / "iter_000001"
    assert [m["iteration"] for m in lines(saved / "metrics.jsonl")] == [1]  # the iteration's record is kept
    assert [e["iteration"] for e in lines(saved / "eval.jsonl")] == [0]

    two_ranks(services, toy, record, out, "train.iterations=3", "eval.every=1", "train.resume_from=latest",
              timeout=200)
    assert [m["iteration"] for m in lines(out / "metrics.jsonl")] == [1, 2, 3]
    assert [e["iteration"] for e in lines(out / "eval.jsonl")] == [0, 1, 2, 3]  # iteration 1's evaluation redone


@pytest.mark.slow
def test_when_full_ovf_prune_fails_on_one_rank_every_rank_stops_with_the_same_checkpoint(
        services, tiny_policy_factory, tmp_path):
    """prune.mode=full_ovf calls Prune after sampling: that call is inside the ranks' agreement too."""
    record, out = tmp_path / "record", tmp_path / "run"
    proc = two_ranks(services, tiny_policy_factory().model_dir, record, out, "prune.mode=full_ovf",
                     "pruner.retry_budget_s=1", env={"EPGRPO_TEST_PRUNE_FAILS_ON_RANK": "1:1000"}, check=False,
                     timeout=200)
    assert proc.returncode != 0
    assert proc.stderr.count("epgrpo: error: a service stayed unreachable, stopping") == 2, proc.stderr[-3000:]
    assert "Prune it1-g" in proc.stderr and "another rank's service stayed unreachable" in proc.stderr
    assert proc.stderr.count("saved a checkpoint of the completed iterations") == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000000"]

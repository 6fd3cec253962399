"""Two torchrun node agents on one host (``--nnodes 2``, c10d rendezvous), each in its own working
directory so that ``out_dir`` is node-local: the run checkpoints on both nodes, each node can
resume from its own disk, and the weights equal one node with two processes' and one process's."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file


def train_args(toy_dir, reward, pruner, *extra):
    # lr 1e-3: two ranks average their gradients in another order than one process sums them; AdamW
    # turns that last-bit difference into steps of order lr where second moments are near zero
    # (at lr 1e-2 one weight in 4096 differed by 1.5e-6 after 2 iterations)
    return [f"model.path={toy_dir}", "model.device=cpu", "prune.group_size=4", "prune.steps=[1]", "prune.keeps=[2]",
            "sampling.num_steps=4", "train.prompts_per_iteration=4", "train.lr=1e-3", "train.checkpoint_every=1",
            "reward.rewards=jpeg_compressibility:1", "reward.judge=", "eval.samples_per_prompt=1", "eval.every=0",
            "eval.max_prompts=2", f"reward.address={reward.address}", f"pruner.address={pruner.address}",
            "launch_services=false", "progress=false", "out_dir=run", *extra]


def two_nodes(tmp_path, args, timeout=300):
    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    agents = []
    for node in range(2):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "epgrpo-test",
             "-m", "epgrpo.trainer.cli", "train", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [a.communicate(timeout=timeout)[0] for a in agents]
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-4000:]
    return [tmp_path / f"node{n}" / "run" for n in range(2)]


@pytest.mark.slow
def test_two_node_agents_with_node_local_out_dirs_checkpoint_resume_and_match_one_process(
        services, tiny_policy_factory, tmp_path):
    reward, pruner = services
    toy_dir = tiny_policy_factory().model_dir
    runs = two_nodes(tmp_path, train_args(toy_dir, reward, pruner, "train.iterations=2"))
    for run in runs:  # each node holds a complete checkpoint of its own
        checkpoint = run / "checkpoints" / "iter_000002"
        assert (checkpoint / "state.json").is_file() and (checkpoint / "weights.safetensors").is_file()
        assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    node_weights = [load_file(run / "checkpoints" / "iter_000002" / "weights.safetensors") for run in runs]
    assert (runs[1] / "checkpoints" / "iter_000002" / "rng_rank1.json").is_file()
    assert all(torch.equal(node_weights[0][k], node_weights[1][k]) for k in node_weights[0])

    # one process, same config: the same weights (groups are sampled by global index on any number of ranks)
    single = tmp_path / "single"
    single.mkdir()
    proc = subprocess.run([sys.executable, "-m", "epgrpo.trainer.cli", "train",
                           *train_args(toy_dir, reward, pruner, "train.iterations=2")], cwd=single,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = load_file(single / "run" / "policy.safetensors")
    for name, value in alone.items():
        torch.testing.assert_close(node_weights[0][name], value, rtol=1e-6, atol=1e-6)

    # one node with two processes: the same weights again
    local = tmp_path / "one-node"
    local.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", "2", "-m", "epgrpo.trainer.cli", "train",
                           *train_args(toy_dir, reward, pruner, "train.iterations=2")], cwd=local,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pair = load_file(local / "run" / "policy.safetensors")
    for name, value in pair.items():
        assert torch.equal(node_weights[0][name], value), name  # same ranks, same reduction: bit-equal

    # each node resumes from its own disk
    runs = two_nodes(tmp_path, train_args(toy_dir, reward, pruner, "train.iterations=3", "train.resume_from=latest"))
    assert all((run / "checkpoints" / "iter_000003" / "state.json").is_file() for run in runs)

"""Run by tests/test_distributed.py under ``accelerate launch``: the real ``epgrpo train`` entry point,
with recording hooks around the gradient all-reduce, the rollout and the policy update.

    python distributed_worker.py RECORD_DIR key=value ...

Each rank writes RECORD_DIR/rank<r>.safetensors (its first optimizer step's local and averaged
gradients, its final trainable weights) and RECORD_DIR/rank<r>.json (its groups and advantages).
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from epgrpo.trainer import cli, loop
from epgrpo.trainer.distributed import Distributed

record_dir = Path(sys.argv[1])
record_dir.mkdir(parents=True, exist_ok=True)
tensors, facts = {}, {"groups": [], "updates": []}
all_reduce, sample, update_policy, run = (Distributed.all_reduce_mean_, loop.Trainer.sample_and_score,
                                          loop.Trainer.update_policy, loop.Trainer.run)


def recording_all_reduce(self, params):
    first = "synced.0" not in tensors
    if first:
        tensors.update({f"local.{k}": p.grad.detach().clone() for k, p in enumerate(params)})
    all_reduce(self, params)
    if first:
        tensors.update({f"synced.{k}": p.grad.detach().clone() for k, p in enumerate(params)})


def recording_sample(self, iteration, prompts, first_group=0):
    result = sample(self, iteration, prompts, first_group)
    facts["groups"].append({"iteration": iteration, "prompts": prompts, "first_group": first_group})
    return result


def recording_update(self, batch, advantages, *args, **kwargs):
    facts["updates"].append({"prompts": batch.prompts, "advantages": advantages.tolist()})
    return update_policy(self, batch, advantages, *args, **kwargs)


def run_and_record(self):
    path = run(self)
    tensors.update({f"final.{name}": p.detach().clone() for name, p in self.policy.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, record_dir / f"rank{self.dist.rank}.safetensors")
    (record_dir / f"rank{self.dist.rank}.json").write_text(json.dumps({**facts, "world_size": self.dist.world_size}))
    return path


if os.environ.get("EPGRPO_TEST_PRUNER_DOWN_ON_RANK") == os.environ.get("RANK"):  # this rank's pruner is away
    from epgrpo.trainer import clients

    def unavailable(self, step, sigma, groups):
        raise clients.ServiceCallError("pruner", "PruneRollout", clients._Ended())

    clients.PrunerStream.decide = unavailable

failing = os.environ.get("EPGRPO_TEST_PRUNER_FAILS_ON_RANK", "")  # "RANK:N": that rank's first N decisions fail
if failing and failing.split(":")[0] == os.environ.get("RANK"):
    from epgrpo.trainer import clients

    decide, left = clients.PrunerStream.decide, [int(failing.split(":")[1])]

    def fails_first(self, step, sigma, groups):
        if left[0] > 0:
            left[0] -= 1
            raise clients.ServiceCallError("pruner", "PruneRollout", clients._Ended())
        return decide(self, step, sigma, groups)

    clients.PrunerStream.decide = fails_first

failing = os.environ.get("EPGRPO_TEST_PRUNE_FAILS_ON_RANK", "")  # "RANK:N": that rank's first N Prune attempts fail
if failing and failing.split(":")[0] == os.environ.get("RANK"):  # (prune.mode=full_ovf's calls after sampling)
    from epgrpo.trainer import clients

    select, left = clients.PrunerClient.select_by_scores, [int(failing.split(":")[1])]

    def prune_fails_first(self, group_id, trajectory_ids, scores, keep, strategy="ovf", seed=0, use_budget=True):
        def attempt(_limit):
            if left[0] > 0:
                left[0] -= 1
                raise clients.ServiceCallError("pruner", "Prune", clients._Ended())
            return select(self, group_id, trajectory_ids, scores, keep, strategy, seed, use_budget=False)

        return self.retry.call(attempt, f"Prune {group_id}") if use_budget else attempt(None)

    clients.PrunerClient.select_by_scores = prune_fails_first

failing = os.environ.get("EPGRPO_TEST_EVAL_FAILS_ON_RANK", "")  # "RANK:N": scoring the evaluation after iteration N
if failing and failing.split(":")[0] == os.environ.get("RANK"):  # fails on that rank for the whole retry budget
    from epgrpo.trainer import clients, reward_client

    score, failing_id = reward_client.RewardClient.score, f"eval-{failing.split(':')[1]}"

    def eval_fails(self, images, prompts, rewards, request_id="", groups=None):
        if request_id == failing_id:
            def attempt(_limit):
                raise clients.ServiceCallError("reward", "Score", clients._Ended())

            self.retry.call(attempt, f"reward service Score {request_id}")
        return score(self, images, prompts, rewards, request_id, groups)

    reward_client.RewardClient.score = eval_fails

Distributed.all_reduce_mean_ = recording_all_reduce
loop.Trainer.sample_and_score, loop.Trainer.update_policy, loop.Trainer.run = recording_sample, recording_update, run_and_record
sys.exit(cli.main(["train", *sys.argv[2:]]))

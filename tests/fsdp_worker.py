"""Run by tests/test_fsdp.py under torchrun (2 CPU ranks, gloo): FSDP-sharded policy updates on a
tiny SD3 transformer against unsharded references on the same data.

    python -m torch.distributed.run --nproc-per-node 2 fsdp_worker.py TINY_SD3_DIR RECORD_DIR

Writes RECORD_DIR/rank<r>.json: parameter counts (full, this rank's shards of the policy, the
reference and the AdamW states) and, per scenario, the largest differences to the reference.

- ``equal``: both ranks keep 4 trajectories; two optimizer steps (gradient accumulation 1 over
  micro-batches of 2), KL to the sharded reference, clipping active, EMA. Reference: ONE unsharded
  process trained on both ranks' data, interleaved so that each of its steps (micro-batch 4) sees
  the same rows as the two ranks' step together.
- ``padded``: rank 1 keeps 2 trajectories, rank 0 4 (micro-batches of 1, one optimizer step):
  rank 1 runs 2 zero-weight micro-batches so that both make 4 forward/backward calls. Reference:
  unsharded replicas averaging gradients with the trainer's own all-reduce (no padding needed).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from epgrpo.trainer.distributed import Distributed
from epgrpo.trainer.ema import EMA
from epgrpo.trainer.fsdp import FSDP, local_numel
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.rollout import RolloutResult, rollout, sample_seeds
from epgrpo.trainer.samplers import FlowSampler

path, record = sys.argv[1], Path(sys.argv[2])
dist = Distributed("cpu")
rank, world = dist.rank, dist.world_size
assert world == 2, world
sampler = FlowSampler.uniform(3, 3.0)
UPDATE = dict(clip_range=0.2, beta=0.04, inner_epochs=1, max_grad_norm=0.02)  # norms are ~0.03: clipping acts
facts: dict = {}


def make():
    return create_policy("sd3", path=path, device="cpu", guidance_scale=4.5, max_sequence_length=8)


def full_weights(fsdp: FSDP) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in fsdp.full_state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:3]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def interleave(batches: list[RolloutResult], rows: int) -> RolloutResult:
    """The ranks' batches as one, ``rows`` of each rank in turn (rank 0 rows 0-1, rank 1 rows 0-1, ...)."""
    order = [(r, i) for s in range(0, len(batches[0].prompts), rows) for r in range(len(batches))
             for i in range(s, s + rows)]
    pick = lambda name: torch.stack([getattr(batches[r], name)[i] for r, i in order])  # noqa: E731
    return RolloutResult([batches[r].prompts[i] for r, i in order], pick("group_index"), pick("trajectory_ids"),
                         pick("latents"), pick("log_probs"), 0, 0)


# -- sharding: each rank holds half of the policy, of the reference and of the optimizer states ---------
sharded = make()
full_numel = sum(p.numel() for p in sharded.transformer.parameters())
fsdp = FSDP(sharded, world, dist.device)
optimizer = torch.optim.AdamW(sharded.trainable_parameters(), lr=1e-3)
ema = EMA(sharded.trainable_parameters(), decay=0.5)
facts.update(full=full_numel, policy=local_numel(sharded.transformer),
             reference=local_numel(sharded._reference_transformer),
             dtensor=all(type(p).__name__ == "DTensor" for p in sharded.transformer.parameters()))

# -- rollouts through the sharded transformer (no_grad forwards, 2 calls per step) equal the plain ones --
plain = make()
prompts = [["a red cat", "a blue dog"][rank]]
seeds = sample_seeds(0, 1, 4, rank)
batch = rollout(sharded, prompts, 4, sampler, seeds=seeds, batch_size=3)
check = rollout(plain, prompts, 4, sampler, seeds=seeds, batch_size=3)
facts["rollout_diff"] = max((batch.latents - check.latents).abs().max().item(),
                            (batch.log_probs - check.log_probs).nan_to_num().abs().max().item())
advantages = torch.tensor([1.0, -1.0, 0.5, -0.5]) * (1 + rank)

# -- equal: sharded update vs one unsharded process on both ranks' data ----------------------------------
stats = policy_update(sharded, optimizer, batch, advantages, sampler, **UPDATE, train_batch_size=2,
                      gradient_accumulation=1, after_step=ema.step)
facts["steps"] = stats[0].optimizer_steps
facts["optimizer_local"] = sum(s["exp_avg"].to_local().numel() for s in optimizer.state.values())
trained = full_weights(fsdp)
ema_full = {n: s.full_tensor() for (n, _), s in zip(sharded.transformer.named_parameters(), ema.shadow)}
kl = dist.mean([stats[0].kl])[0]  # the loop's metric: each rank's mean, averaged (equal counts: the overall mean)
gathered = [None] * world
tdist.all_gather_object(gathered, (batch, advantages))
if rank == 0:
    reference = make()
    ref_optimizer = torch.optim.AdamW(reference.trainable_parameters(), lr=1e-3)
    ref_ema = EMA(reference.trainable_parameters(), decay=0.5)
    both = interleave([b for b, _ in gathered], 2)
    both_adv = torch.cat([gathered[r][1][s:s + 2] for s in (0, 2) for r in range(2)])
    ref_stats = policy_update(reference, ref_optimizer, both, both_adv, sampler, **UPDATE, train_batch_size=4,
                              gradient_accumulation=1, after_step=ref_ema.step)
    initial = make().transformer.state_dict()
    facts["equal"] = {
        "weights_diff": max_diff(trained, reference.transformer.state_dict()),
        "moved": max_diff(trained, initial),
        "ema_diff": max_diff(ema_full, {n: s for (n, _), s in zip(reference.transformer.named_parameters(),
                                                                   ref_ema.shadow)}),
        "grad_norm": [stats[0].grad_norm, ref_stats[0].grad_norm],
        "kl": [kl, ref_stats[0].kl],
    }

# -- padded: rank 1 keeps half as many; zero-weight micro-batches keep the forward/backward calls equal ---
mine = batch if rank == 0 else batch.keep(torch.tensor([0, 3]))
mine_adv = advantages if rank == 0 else advantages[[0, 3]]
before = full_weights(fsdp)
moments = [{k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in optimizer.state[p].items()}
           for p in sharded.trainable_parameters()]  # AdamW's state before this update, gathered
micro_batches = max(dist.counts(len(mine.prompts)))  # what the loop passes (train_batch_size 1)
stats = policy_update(sharded, optimizer, mine, mine_adv, sampler, **UPDATE, train_batch_size=1,
                      micro_batches=micro_batches)
padded = full_weights(fsdp)
replica = make()
if rank == 0:
    replica.transformer.load_state_dict(before)  # the sharded run's weights before this update
for p in replica.transformer.parameters():
    tdist.broadcast(p.data, 0)
ref_optimizer = torch.optim.AdamW(replica.trainable_parameters(), lr=1e-3)
for rp, state in zip(replica.trainable_parameters(), moments):  # the replicas start where the shards were
    ref_optimizer.state[rp] = state
ref_stats = policy_update(replica, ref_optimizer, mine, mine_adv, sampler, **UPDATE, train_batch_size=1,
                          sync_gradients=dist.all_reduce_mean_)
if rank == 0:
    facts["padded"] = {"weights_diff": max_diff(padded, replica.transformer.state_dict()),
                       "moved": max_diff(padded, before), "grad_norm": [stats[0].grad_norm, ref_stats[0].grad_norm]}
facts["padded_calls"] = micro_batches
record.mkdir(parents=True, exist_ok=True)
(record / f"rank{rank}.json").write_text(json.dumps(facts))
tdist.barrier()

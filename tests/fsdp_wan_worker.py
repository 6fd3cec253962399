"""Run by tests/test_wan_training.py under torchrun (2 CPU ranks, gloo): ``train.fsdp`` on a tiny
random Wan transformer (full fine-tuning, ``FSDP`` shards each of its ``blocks``, then the root).

    python -m torch.distributed.run --nproc-per-node 2 fsdp_wan_worker.py TINY_WAN_DIR RECORD_DIR

Writes RECORD_DIR/rank<r>.json: the sharded units, parameter counts (full, this rank's shards of the
policy and of the reference), the largest difference between ODE samples of the sharded policy and
of an unsharded copy (CFG on, so both branches go through the sharded blocks), the largest
difference between the sharded and the unsharded velocity after one identical SGD step (and how far
the step moved it), and whether
FSDP's export (gathered to rank 0) is the unsharded model's weights.
"""

import json
import sys
from pathlib import Path

import torch

from epgrpo.trainer.distributed import Distributed
from epgrpo.trainer.fsdp import FSDP, blocks, local_numel
from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.rollout import sample_ode
from epgrpo.trainer.samplers import SamplerOptions

path, record = sys.argv[1], Path(sys.argv[2])
dist = Distributed("cpu")
rank, world = dist.rank, dist.world_size
assert world == 2, world
OPTIONS = dict(path=path, device="cpu", guidance_scale=5.0, resolution=32, num_frames=5, max_sequence_length=16,
               progress=False)
PROMPTS, SEEDS = ["a red cat", "a blue dog"], [11, 12]

sharded, unsharded = create_policy("wan", **OPTIONS), create_policy("wan", **OPTIONS)
units = [type(b).__name__ for b in blocks(sharded.transformer)]
fsdp = FSDP(sharded, world, torch.device("cpu"))
sampler = sharded.make_sampler(3, SamplerOptions())
facts = {
    "units": units, "full": fsdp.full_numel, "policy": local_numel(sharded.transformer),
    "reference": local_numel(sharded._reference_transformer),
    "sample_diff": float((sample_ode(sharded, PROMPTS, SEEDS, sampler)
                          - sample_ode(unsharded, PROMPTS, SEEDS, sampler)).abs().max()),
}

# one identical SGD step on both: the loss is the velocity's mean at x (the same on every rank)
x = torch.randn(2, *sharded.latent_shape, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    before = unsharded.predict(x, sampler.timestep(1), unsharded.encode_prompts(PROMPTS))
for policy in (sharded, unsharded):
    cond = policy.encode_prompts(PROMPTS)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    policy.predict(x, sampler.timestep(1), cond).square().mean().backward()
    optimizer.step()
with torch.no_grad():
    velocities = [p.predict(x, sampler.timestep(1), p.encode_prompts(PROMPTS)) for p in (sharded, unsharded)]
facts["update_diff"] = float((velocities[0] - velocities[1]).abs().max())
facts["moved"] = float((velocities[1] - before).abs().max())

(exported,) = fsdp.export(record / "export", dist.is_main)
if dist.is_main:
    from diffusers import WanTransformer3DModel

    loaded = WanTransformer3DModel.from_pretrained(exported, local_files_only=True).state_dict()
    own = unsharded.transformer.state_dict()
    facts["export_diff"] = max(float((loaded[k] - v).abs().max()) for k, v in own.items())
record.mkdir(parents=True, exist_ok=True)
(record / f"rank{rank}.json").write_text(json.dumps(facts))
dist.barrier()

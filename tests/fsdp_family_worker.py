"""Run by tests/test_image_families.py under torchrun (2 CPU ranks, gloo): each 2026 family's
transformer sharded by ``FSDP`` block by block gives the unsharded velocity and policy update.

    python -m torch.distributed.run --nproc-per-node 2 fsdp_family_worker.py RECORD_DIR NAME=DIR ...

Writes RECORD_DIR/rank<r>.json: per family, the parameters this rank holds and the full count, the
largest difference of the sharded policy's and reference's velocities to an unsharded copy's, and
of one SGD step's weights to the same step on the unsharded copy (both ranks feed the same data).
"""

import json
import sys
from pathlib import Path

import torch

from epgrpo.trainer.distributed import Distributed
from epgrpo.trainer.fsdp import FSDP, local_numel
from epgrpo.trainer.policy.base import create_policy

OPTIONS = {"qwen_image": {"max_sequence_length": 512}, "flux2_klein": {"max_sequence_length": 64},
           "z_image": {"max_sequence_length": 64}}
record = Path(sys.argv[1])
dist = Distributed("cpu")
facts = {}
for spec in sys.argv[2:]:
    name, path = spec.split("=", 1)

    def make():
        return create_policy(name, path=path, device="cpu", resolution=32, guidance_scale=3.0, **OPTIONS[name])

    plain, sharded = make(), make()
    fsdp = FSDP(sharded, dist.world_size, dist.device)
    x = torch.randn(2, *plain.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(0.6)
    cond = plain.encode_prompts(["a red cat", "a blue dog"])
    with torch.no_grad():
        diff = (sharded.predict(x, sigma, cond) - plain.predict(x, sigma, cond)).abs().max().item()
        with sharded.reference(), plain.reference():
            ref_diff = (sharded.predict(x, sigma, cond) - plain.predict(x, sigma, cond)).abs().max().item()
    for policy in (plain, sharded):  # one SGD step on the same loss
        optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
        policy.predict(x, sigma, cond).square().mean().backward()
        optimizer.step()
    full = fsdp.full_state_dict()
    if dist.is_main:
        step_diff = max((full[k] - v).abs().max().item() for k, v in plain.transformer.state_dict().items())
    else:
        step_diff = None
    facts[name] = {"local": local_numel(sharded.transformer), "full": fsdp.full_numel, "predict_diff": diff,
                   "reference_diff": ref_diff, "step_diff": step_diff}
record.mkdir(parents=True, exist_ok=True)
(record / f"rank{dist.rank}.json").write_text(json.dumps(facts))

"""Run by tests/test_algorithms_e2e.py under ``accelerate launch``: ``epgrpo train`` once per algorithm
in one process group (one launch for all of them), each rank saving its final trainable weights.

    python algorithms_worker.py OUT_DIR ALGORITHMS_JSON key=value ...

ALGORITHMS_JSON maps an algorithm name to its extra overrides; run a writes OUT_DIR/a (the run)
and OUT_DIR/a/rank<r>.safetensors.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from epgrpo.trainer import cli, loop

out_dir, algorithms, common = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
run = loop.Trainer.run


def run_and_save(self):
    path = run(self)
    weights = {name: p.detach().clone().contiguous() for name, p in self.policy.state_dict().items()}
    save_file(weights, Path(self.c.out_dir) / f"rank{self.dist.rank}.safetensors")
    return path


loop.Trainer.run = run_and_save
for name, extra in algorithms.items():
    code = cli.main(["train", *common, f"train.algorithm={name}", *extra, f"out_dir={out_dir / name}"])
    if code:
        sys.exit(code)

"""Remote-service benchmark: the trainer's rollout + scoring wall per iteration when every call to
the reward and pruner services takes extra time, for ``sampling.waves`` 1, 2 and 4, side by side.

The services run as real local processes (the same CLIs users run). What a remote deployment adds
is injected *here*, around the trainer's clients, never in the product: a network delay per call
(0, 20, 50 ms) plus a fixed compute delay standing for a GPU VAE decode of the previews and a
reward model (``--compute-ms``). With one wave every delay stalls denoising; with several, one
wave's call is in flight while the others denoise. Configurations are interleaved over repeats and
the median is reported (this machine is shared and noisy).

    python bench/bench_remote.py            # ~3 min on 2 CPU cores
    python bench/bench_remote.py --quick    # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from epgrpo.trainer.clients import PrunerClient

from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.launch import LocalStack
from epgrpo.trainer.loop import Trainer
from epgrpo.trainer.prompts import DIGIT_PROMPTS
from epgrpo.trainer.policy.toy import ToyDigitPolicy, ToyRecipe


class Delayed:
    """Sleeps ``seconds`` before each forwarded call (the GIL is released while it waits, as in a
    real network wait)."""

    def __init__(self, target, seconds: float):
        self.target, self.seconds = target, seconds

    def __getattr__(self, name):
        return getattr(self.target, name)


class DelayedReward(Delayed):
    def score(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.target.score(*args, **kwargs)


class DelayedStream(Delayed):
    def decide(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.target.decide(*args, **kwargs)

    def __enter__(self):
        self.target.__enter__()
        return self

    def __exit__(self, *exc):
        return self.target.__exit__(*exc)


class DelayedPruner(Delayed):
    def open(self, *args, **kwargs):
        return DelayedStream(self.target.open(*args, **kwargs), self.seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works (numbers meaningless)")
    parser.add_argument("--delays-ms", default="0,20,50", help="network delay per service call (default %(default)s)")
    parser.add_argument("--compute-ms", type=float, default=30.0,
                        help="service compute per call: a GPU VAE decode / reward model (default %(default)s)")
    parser.add_argument("--waves", default="1,2,4", help="sampling.waves values (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="iterations per configuration (default %(default)s)")
    parser.add_argument("--prompts", type=int, default=8, help="groups per iteration (default %(default)s)")
    args = parser.parse_args(argv)
    delays = [float(d) for d in args.delays_ms.split(",")]
    waves = [int(w) for w in args.waves.split(",")]
    recipe, repeats, prompts = ToyRecipe(), args.repeats, args.prompts
    if args.quick:
        recipe, repeats, prompts, delays, waves = ToyRecipe(pretrain_steps=3, batch_size=16), 1, 2, delays[:2], waves[:2]
    torch.set_num_threads(1)
    policy = ToyDigitPolicy(None, recipe, progress=False)
    walls: dict[tuple[float, int], list[float]] = {(d, w): [] for d in delays for w in waves}
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp, \
            LocalStack(["digit"], Path(tmp) / "services") as stack:
        reward, pruner = RewardClient(stack.reward.address), PrunerClient(stack.pruner.address)
        try:
            for repeat in range(repeats + 1):  # the first round warms up and is not counted
                for delay in delays:
                    for wave_count in waves:
                        seconds = (delay + args.compute_ms) / 1000
                        config = load_config(None, [f"sampling.waves={wave_count}", f"out_dir={tmp}/run",
                                                    f"train.prompts_per_iteration={prompts}", "launch_services=false"])
                        trainer = Trainer(config, policy, DelayedReward(reward, seconds), DelayedPruner(pruner, seconds))
                        start = time.perf_counter()
                        trainer.sample_and_score(repeat + 1, DIGIT_PROMPTS[:prompts], 0)
                        if repeat:
                            walls[delay, wave_count].append(time.perf_counter() - start)
        finally:
            reward.close()
            pruner.close()
    median = {k: statistics.median(v) if v else float("nan") for k, v in walls.items()}
    base = median[delays[0], waves[0]]
    print(f"# rollout + scoring per iteration: toy model, {prompts} groups of 16 -> 8 -> 4 at steps {{5, 7}} of 10, "
          f"compute {args.compute_ms:g} ms per service call, median of {repeats}")
    header = f"{'delay ms':>8} {'waves':>5} {'wall s':>8} {'/ zero-delay same waves':>24} {'/ zero-delay waves=1':>21}"
    print(header)
    print("-" * len(header))
    for delay in delays:
        for wave_count in waves:
            wall = median[delay, wave_count]
            print(f"{delay:>8g} {wave_count:>5} {wall:>8.3f} {wall / median[delays[0], wave_count]:>24.2f} "
                  f"{wall / base:>21.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

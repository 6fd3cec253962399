"""Weights & Biases mirror of a run (``log.wandb``), written by rank 0 only.

W&B gets what TensorBoard gets (every scalar ``MetricsWriter`` mirrors, under the same
``<stream>/<key>`` names), each evaluation's sample grid and reward curve as images, and the
config. The x-axis is the iteration: every row carries ``iteration`` and all metrics are plotted
against it (``define_metric``) rather than against W&B's own ``_step``, because W&B drops rows
whose ``_step`` is below the last one it has, which would silently lose the iterations a resumed
run repeats after its checkpoint.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from epgrpo.trainer import config as cfg
from epgrpo.trainer.report import grid_image, plot_curves

log = logging.getLogger("epgrpo.trainer")

INSTALL_HINT = "log.wandb=true needs the wandb package: pip install epgrpo[wandb]"
RUN_ID_FILE = "wandb_run_id"  # in out_dir: the W&B run a resumed run continues


def import_wandb():
    """The ``wandb`` module; ``ImportError`` naming the extra to install when it is missing."""
    try:
        import wandb
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return wandb


class WandbLogger:
    """One W&B run per training run: ``start`` opens it, leaving the ``with`` block finishes it
    (marked failed, exit code 1, when the block raised)."""

    def __init__(self, config: cfg.Config, out_dir: Path):
        self.config = config
        self.out_dir = out_dir
        self.run = None

    def start(self, resumed: bool) -> None:
        """``resumed``: continue the W&B run whose id out_dir keeps."""
        self.wandb = wandb = import_wandb()
        c = self.config.log
        id_file = self.out_dir / RUN_ID_FILE
        # a fresh run (also one restarted before its first checkpoint) is a new W&B run, as its
        # metrics.jsonl starts anew; a resumed one appends to the run it continues
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
        if resumed and not run_id:
            log.warning("log.wandb: %s has no %s; the resumed run starts a new W&B run", self.out_dir, RUN_ID_FILE)
        self.run = wandb.init(
            project=c.wandb_project or None, entity=c.wandb_entity or None, mode=c.wandb_mode or None,
            name=c.wandb_run_name or Path(self.config.out_dir).resolve().name, id=run_id or None,
            resume="allow" if run_id else None, config=cfg.to_dict(self.config),
            dir=os.environ.get("WANDB_DIR") or str(self.out_dir),  # beside the run's other outputs by default
        )
        id_file.write_text(self.run.id)  # wandb's own id for a new run
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({"iteration": step, **scalars})

    def log_evaluation(self, step: int, images: np.ndarray, evals: list[dict], iterations: list[dict]) -> None:
        """The evaluation's sample grid (as in ``samples_*.png``) and the reward curve so far (as
        ``reward_curve.png``, which is otherwise drawn only at the end)."""
        from PIL import Image

        c = self.config
        curve = io.BytesIO()
        plot_curves(evals, iterations, curve, f"{c.prune.mode}, {c.model.name}")
        curve.seek(0)
        self.run.log({
            "iteration": step,
            "eval/samples": self.wandb.Image(grid_image(images, c.eval.samples_per_prompt), caption=f"iteration {step}"),
            "eval/reward_curve": self.wandb.Image(Image.open(curve)),
        })

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is None:
            return
        failed = exc_type is not None
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception:
            if not failed:
                raise
            # training already failed: report that error, not this one
            log.exception("log.wandb: could not finish the W&B run")

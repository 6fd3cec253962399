"""What users look at after a run: reward curve PNG, sample grids, JSONL metrics, TensorBoard (and W&B)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class MetricsWriter:
    """Appends one JSON object per line and mirrors scalars to TensorBoard (and W&B with log.wandb)."""

    def __init__(self, out_dir: Path, purge_step: int | None = None, wandb=None):
        """``purge_step``: on resume, TensorBoard hides events of this step and later from the
        interrupted run (the JSONL files are restored from the checkpoint instead). ``wandb``: a
        ``WandbLogger`` that gets the same scalars under the same names (log.wandb)."""
        self.out_dir = out_dir
        self.wandb = wandb
        out_dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, object] = {}
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self.tb = None

    def write(self, stream: str, record: dict, step: int) -> None:
        record = {**record, **pruning_metrics(record)}
        if stream not in self._files:
            self._files[stream] = open(self.out_dir / f"{stream}.jsonl", "a")
        f = self._files[stream]
        f.write(json.dumps(record) + "\n")
        f.flush()
        scalars = mirrored_scalars(stream, record)
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log_scalars(scalars, step)

    def add_samples(self, tag: str, images: np.ndarray, step: int, columns: int) -> None:
        """Videos [N, T, H, W, C]: the animated sample grid as a TensorBoard video (``add_video``'s
        summary: a GIF in an image summary, which TensorBoard plays). torch's ``add_video`` encodes
        the GIF with moviepy 1.x (``moviepy.editor``, gone in moviepy 2); PIL encodes it here, so no
        moviepy is needed. Images are not logged (the PNG grids in out_dir have them)."""
        if self.tb is None or images.ndim != 5:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        gif = grid_gif(images, columns)
        from PIL import Image
        import io

        width, height = Image.open(io.BytesIO(gif)).size
        image = Summary.Image(height=height, width=width, colorspace=images.shape[-1], encoded_image_string=gif)
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self.tb is not None:
            self.tb.close()


def mirrored_scalars(stream: str, record: dict) -> dict[str, float]:
    """The numbers of a record as TensorBoard and W&B show them: ``<stream>/<key>`` (lists, strings
    and flags stay in the JSONL files only)."""
    return {f"{stream}/{key}": value for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def pruning_metrics(record: dict) -> dict:
    """Scalars of an iteration's pruning (for TensorBoard, which skips the survivors list):
    ``nfe_ratio`` = transformer calls used / calls of the full expanded groups; ``pruning_ratio``
    = fraction of the sampled trajectories stopped before the last step."""
    out = {}
    if record.get("nfe_full"):
        out["nfe_ratio"] = record["nfe"] / record["nfe_full"]
    survivors = record.get("survivors_per_step") or []
    if survivors and survivors[0]:
        out["pruning_ratio"] = 1 - survivors[-1] / survivors[0]
    return out


def save_grid(images: np.ndarray, path: Path, columns: int, scale: int = 4) -> list[Path]:
    """uint8 [N, H, W, C] -> one PNG grid (rows = prompts when N = prompts x columns). Videos
    [N, T, H, W, C]: the PNG shows each sample as a strip of its frames, and an animated GIF of the
    grid (frame t of every sample at time t) goes beside it. Returns the paths written."""
    path = Path(path)
    grid_image(images, columns, scale).save(path)
    if images.ndim != 5:
        return [path]
    gif = path.with_suffix(".gif")
    gif.write_bytes(grid_gif(images, columns, scale))
    return [path, gif]


def frame_strips(videos: np.ndarray) -> np.ndarray:
    """uint8 [N, T, H, W, C] -> [N, H, T * (W + 1) - 1, C]: each video's frames side by side, in
    time order, one gray column apart."""
    n, t, h, w, c = videos.shape
    strips = np.full((n, h, t * (w + 1) - 1, c), 128, dtype=np.uint8)
    for k in range(t):
        strips[:, :, k * (w + 1): k * (w + 1) + w] = videos[:, k]
    return strips


def grid_gif(videos: np.ndarray, columns: int, scale: int = 4, frame_ms: int = 250) -> bytes:
    """An animated GIF (looping) of the sample grid over the videos' frames: frame t shows frame t of
    every sample."""
    import io

    frames = [grid_image(np.ascontiguousarray(videos[:, t]), columns, scale) for t in range(videos.shape[1])]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return buffer.getvalue()


def grid_image(images: np.ndarray, columns: int, scale: int = 4):
    """The PIL image ``save_grid`` writes (videos: frame strips)."""
    from PIL import Image

    if images.ndim == 5:
        images = frame_strips(images)
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 64, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = images[k]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def plot_curves(evals: list[dict], iterations: list[dict], path, title: str) -> None:
    """Eval rewards over iterations and rollout rewards over NFE -> PNG (``path``: a file name or a
    binary file object)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    it = [e["iteration"] for e in evals]
    axes[0].plot(it, [e["reward"] for e in evals], "o-", label="training reward (eval, ODE)")
    if evals and "judge" in evals[0]:
        axes[0].plot(it, [e["judge"] for e in evals], "s--", label="held-out judge (eval, ODE)")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("mean reward")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].plot([m["nfe_cumulative"] for m in iterations], [m["reward_mean"] for m in iterations], ".-",
                 label="rollout reward (kept)")
    axes[1].set_xlabel("cumulative transformer calls (NFE)")
    axes[1].set_ylabel("mean reward")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

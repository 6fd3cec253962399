"""Digit rewards for the embedded toy task (scikit-learn's 8x8 handwritten digits).

``digit``: P(image shows the prompted digit) from a small CNN on 16x16 grayscale, trained on
first use and cached as safetensors. An RL policy games a weak classifier with images no one
would call a digit (saturated blobs, checkerboards at the transformer's patch size), so the CNN
has an 11th "not a digit" class trained on generated junk, and real digits are augmented.

``digit_judge``: an independent RBF SVC on 8x8 area-averaged images, for evaluation only
(never trained against).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import time
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from epgrpo.services.common.errors import InvalidArgument, show
from epgrpo.services.reward.backends import digit_data
from epgrpo.services.reward.backends.base import RewardBackend, register_backend

log = logging.getLogger("epgrpo.reward.digits")

SIZE = 16
NOT_A_DIGIT = 10
# Bump on any change to data, augmentation, architecture or training: it names the cache file.
# The file name also carries a hash of the recipe's source (see recipe_hash), so
# an edit without a bump cannot silently reuse stale weights.
CLASSIFIER_VERSION = "digit-cnn-v2"
_SEED = 0
_EPOCHS = 20
_BATCH = 128
_JUNK_FRACTION = 0.35  # share of each batch drawn from the junk generators

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NUMERAL = re.compile(r"\b([0-9])\b")
_WORD = re.compile(r"\b(" + "|".join(_WORDS) + r")\b", re.IGNORECASE)


def parse_target_digits(prompts: Sequence[str], metadata: Sequence[dict[str, str]]) -> np.ndarray:
    """The digit each sample asks for: metadata 'digit' when given, else the one digit in the prompt."""
    targets = np.empty(len(prompts), dtype=np.int64)
    for i, prompt in enumerate(prompts):
        fields = metadata[i] if metadata else {}
        if "digit" in fields:
            value = str(fields["digit"]).strip()
            if len(value) != 1 or value not in "0123456789":
                raise InvalidArgument(f"metadata[{i}].digit: expected a digit 0-9, got {show(fields['digit'])}")
            targets[i] = int(value)
            continue
        # Numerals win over words, so "one handwritten digit 7" means 7.
        found = {int(m) for m in _NUMERAL.findall(prompt)} or {_WORDS.index(m.lower()) for m in _WORD.findall(prompt)}
        if len(found) != 1:
            raise InvalidArgument(f"prompts[{i}]: expected a prompt naming a digit 0-9, got {show(prompt, 100)}")
        targets[i] = found.pop()
    return targets


def to_gray(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, 1, size, size] in [0, 1]: gray by channel mean, resized."""
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)  # a copy: wire arrays are read-only
    x = x.mean(dim=3, keepdim=True).permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        # Bilinear matches how the toy generator's 16x16 data is made from 8x8; antialias only
        # matters when shrinking (then it averages instead of skipping pixels).
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0)


@lru_cache(maxsize=1)
def real_digits() -> tuple[torch.Tensor, np.ndarray]:
    """All sklearn digits as the toy generator sees them: [1797, 1, 16, 16] in [0, 1] on uint8 levels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return digit_data.quantize(x), data.target.astype(np.int64)


@lru_cache(maxsize=1)
def digit_split() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into ``real_digits()``: a fixed stratified 80/20 split."""
    from sklearn.model_selection import train_test_split

    labels = real_digits()[1]
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=_SEED)
    return np.sort(train), np.sort(test)


class DigitCNN(nn.Module):
    """~48k parameters: three 3x3 convs (16 px, then 8 px, pooled to 4 px), a 2-layer head, 11 logits."""

    def __init__(self):
        super().__init__()
        # The first conv sees full resolution (so period-2 checkerboards are visible to it);
        # pooling right after keeps training fast (the data is 8x8 detail upsampled anyway).
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 11))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@contextmanager
def _deterministic_torch():
    # One thread: bit-identical weights whatever the core count, and no OpenMP spin-wait
    # collapse when other processes share the cores (measured 10x slower with 2 threads then).
    # A forked, seeded global RNG: init and dropout draw from it; the caller's RNG is untouched.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            yield
    finally:
        torch.set_num_threads(previous)


def train_classifier(epochs: int = _EPOCHS) -> tuple[DigitCNN, dict[str, str]]:
    """Trains the CNN deterministically; returns it and metadata (held-out accuracy, seconds)."""
    with _deterministic_torch():
        return _train_classifier(epochs)


def _train_classifier(epochs: int) -> tuple[DigitCNN, dict[str, str]]:
    start = time.perf_counter()
    images, labels = real_digits()
    train_idx, test_idx = digit_split()
    x_train, y_train = images[train_idx], torch.from_numpy(labels[train_idx])
    gen = torch.Generator().manual_seed(_SEED)  # data order, augmentation and junk
    model = DigitCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    n_real = int(_BATCH * (1 - _JUNK_FRACTION))
    steps_per_epoch = len(x_train) // n_real
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * n_real:(step + 1) * n_real]
            real = digit_data.augment_digits(x_train[idx], gen)
            fake = digit_data.junk_images(_BATCH - n_real, x_train, y_train, gen)
            x = torch.cat([real, fake])
            y = torch.cat([y_train[idx], torch.full((len(fake),), NOT_A_DIGIT, dtype=torch.int64)])
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        predicted = model(images[test_idx]).argmax(1).numpy()
    accuracy = float((predicted == labels[test_idx]).mean())
    seconds = time.perf_counter() - start
    log.info("trained %s in %.1fs: held-out accuracy %.4f on %d real digits", CLASSIFIER_VERSION, seconds,
             accuracy, len(test_idx))
    return model, {"version": CLASSIFIER_VERSION, "heldout_accuracy": f"{accuracy:.6f}", "train_seconds": f"{seconds:.2f}"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("EPGRPO_CACHE_DIR", "~/.cache/epgrpo")).expanduser() / "rewards"


@lru_cache(maxsize=1)
def recipe_hash() -> str:
    """Hash of everything that determines the weights (not of descriptions or the judge)."""
    parts = [inspect.getsource(digit_data), repr((SIZE, NOT_A_DIGIT, _SEED, _EPOCHS, _BATCH, _JUNK_FRACTION))]
    parts += [inspect.getsource(obj) for obj in (DigitCNN, _deterministic_torch, _train_classifier, real_digits, digit_split)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def weights_path(directory: Path) -> Path:
    return directory / f"{CLASSIFIER_VERSION}-{recipe_hash()}.safetensors"


def load_or_train(directory: Path) -> tuple[DigitCNN, dict[str, str]]:
    """Loads the cached weights, or trains and caches them (atomically: tmp file + rename)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = weights_path(directory)
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            if meta.get("version") != CLASSIFIER_VERSION:
                raise ValueError(f"its metadata says version {meta.get('version')!r}")
            model = DigitCNN()
            model.load_state_dict(load_file(str(path)))
            log.info("loaded %s from %s (held-out accuracy %s)", CLASSIFIER_VERSION, path, meta.get("heldout_accuracy"))
            return model.eval(), meta
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
            log.warning("retraining: cannot use cached weights %s: %s", path, exc)
    model, meta = train_classifier()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # a shared cache: readable by other users, like any cache file
    os.replace(tmp, path)  # atomic: concurrent readers see the old file or the whole new one
    return model, meta


@register_backend("digit")
class DigitReward(RewardBackend):
    description = (
        "Probability that the image shows the digit named in the prompt, from a CNN on 16x16 grayscale "
        "(11 classes: digits 0-9 and 'not a digit', trained against junk such as blobs and checkerboards)."
    )
    inputs = "prompt naming a digit: 'a handwritten digit 7' (or metadata 'digit': '7'); images resized to 16x16, RGB averaged to gray"
    range = "[0, 1]"

    def __init__(self, device: str = "cpu", cache_dir: str | os.PathLike | None = None, max_chunk: int = 1024):
        super().__init__(device)
        model, self.training_info = load_or_train(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        self.model = model.to(device).eval()
        self.max_chunk = max_chunk

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, 11]: softmax over digits 0-9 and 'not a digit'."""
        x = to_gray(images, SIZE)
        out = [F.softmax(self.model(chunk.to(self.device)).float(), dim=1).cpu() for chunk in x.split(self.max_chunk)]
        return torch.cat(out).numpy()

    def _score(self, images, prompts, metadata):
        targets = parse_target_digits(prompts, metadata)
        return self.probabilities(images)[np.arange(len(targets)), targets]


@register_backend("digit_judge")
class DigitJudge(RewardBackend):
    description = (
        "Independent held-out judge for evaluation (never train against it): probability of the prompted "
        "digit from an RBF SVC on images area-averaged to 8x8."
    )
    inputs = "prompt naming a digit: 'a handwritten digit 7' (or metadata 'digit': '7'); images area-averaged to 8x8"
    range = "[0, 1]"

    def __init__(self, device: str = "cpu"):
        super().__init__(device)  # sklearn runs on the CPU whatever the device
        from sklearn.svm import SVC

        images, labels = real_digits()
        train_idx, test_idx = digit_split()
        # Train on what it will see: 16x16 uint8 images brought back to 8x8 (scaled 0..16).
        features = self.features(digit_data.to_uint8(images))
        self.svc = SVC(kernel="rbf", probability=True, random_state=_SEED)
        with warnings.catch_warnings():
            # scikit-learn 1.9 deprecates `probability` (removal planned for 1.11) in favour of
            # CalibratedClassifierCV, which measured far worse here: mean max-probability 0.78 on
            # uniform noise against 0.21 for libsvm's Platt scaling.
            warnings.filterwarnings("ignore", message=".*`probability` parameter was deprecated", category=FutureWarning)
            self.svc.fit(features[train_idx], labels[train_idx])
        self.heldout_accuracy = float((self.svc.predict(features[test_idx]) == labels[test_idx]).mean())
        log.info("digit_judge: held-out accuracy %.4f", self.heldout_accuracy)

    @staticmethod
    def features(images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> [N, 64] in load_digits' scale (0..16)."""
        x = torch.from_numpy(images.astype(np.float32)).mean(dim=3)[:, None]
        x = F.adaptive_avg_pool2d(x, 8) / 255.0  # area average from the native size
        return (x.reshape(len(x), 64) * 16.0).numpy().astype(np.float64)

    def _score(self, images, prompts, metadata):
        targets = parse_target_digits(prompts, metadata)
        proba = self.svc.predict_proba(self.features(images))
        column = {int(c): j for j, c in enumerate(self.svc.classes_)}
        return proba[np.arange(len(targets)), [column[int(t)] for t in targets]]

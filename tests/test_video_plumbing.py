"""Video previews through the pruner and video samples in reports: the pixel decoder's 5-D layout,
``prune.preview_frames=first`` sending only the first latent frame through a real pruner and reward
service, frame strips / GIFs in out_dir and the TensorBoard video summary."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from epgrpo.services.pruner.decode import pixel_decode
from epgrpo.services.reward.backends.base import RewardBackend, register_backend
from epgrpo.trainer.report import MetricsWriter, frame_strips, grid_image, save_grid
from epgrpo.trainer.rollout import GroupState


@register_backend("test_mean_brightness")
class MeanBrightness(RewardBackend):
    """Test reward: mean pixel / 255."""

    def _score(self, images, prompts, metadata):
        return images.reshape(len(images), -1).mean(1) / 255.0


def test_pixel_decoder_turns_video_previews_channels_last_frame_by_frame():
    previews = np.random.default_rng(0).uniform(-1.2, 1.2, (3, 3, 4, 5, 6)).astype(np.float32)  # [N, C, T, H, W]
    videos = pixel_decode(previews)
    assert videos.shape == (3, 4, 5, 6, 3) and videos.dtype == np.uint8
    for t in range(4):  # each frame decodes as the image decoder decodes it
        np.testing.assert_array_equal(videos[:, t], pixel_decode(np.ascontiguousarray(previews[:, :, t])))
    expected = np.rint(np.clip((previews.astype(np.float64) + 1) / 2, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(videos, expected.transpose(0, 2, 3, 4, 1))


@pytest.mark.parametrize("preview_frames, survivors", [("first", [2, 3]), ("all", [0, 1])])
def test_first_frame_previews_are_what_the_pruner_scores(background_server, preview_frames, survivors):
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.services.reward.main import build_registrar as reward_registrar
    from epgrpo.trainer.clients import PrunerClient

    reward = background_server(reward_registrar(["test_mean_brightness"]))
    pruner = background_server(pruner_registrar(reward.address))
    # 4 trajectories, 4 frames; keep 2 (max variance: the lowest and the highest proxy score).
    # First frames' brightness 0.5, 0.45, 0.9, 0.0 -> {2, 3}; means over 4 frames (later frames
    # 1, 0, 0.5, 0.5) 0.875, 0.1125, 0.6, 0.375 -> {0, 1}.
    first, later = np.array([0.5, 0.45, 0.9, 0.0]), np.array([1.0, 0.0, 0.5, 0.5])
    levels = np.stack([first, later, later, later], axis=1)  # [4, T]
    previews = torch.from_numpy(np.broadcast_to(levels[:, None, :, None, None], (4, 1, 4, 2, 2)) * 2 - 1).float()
    client = PrunerClient(pruner.address, deadline_s=30)
    try:
        with client.open([(3, 2)], 10, [("frames(test_mean_brightness, k=all)", 1.0)], decoder="pixel",
                         preview_frames=preview_frames) as stream:
            decisions = stream.decide(3, 0.5, [GroupState("g0", [0, 1, 2, 3], previews, "a digit 3 moving right")])
    finally:
        client.close()
    assert sorted(decisions["g0"]) == survivors


def test_video_samples_are_frame_strips_and_a_gif(tmp_path):
    videos = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 6, 1), dtype=np.uint8)
    strips = frame_strips(videos)
    assert strips.shape == (4, 5, 3 * 7 - 1, 1)
    for t in range(3):
        np.testing.assert_array_equal(strips[:, :, t * 7: t * 7 + 6], videos[:, t])
    paths = save_grid(videos, tmp_path / "samples_last.png", columns=2, scale=1)
    assert [p.name for p in paths] == ["samples_last.png", "samples_last.gif"]
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(grid_image(videos, 2, 1)))
    gif = Image.open(paths[1])
    assert gif.n_frames == 3
    for t in range(3):
        gif.seek(t)
        np.testing.assert_array_equal(np.asarray(gif.convert("L")),
                                      np.asarray(grid_image(np.ascontiguousarray(videos[:, t]), 2, 1)))
    assert save_grid(videos[:, 0], tmp_path / "images.png", columns=2) == [tmp_path / "images.png"]  # images: PNG only


def test_tensorboard_gets_the_samples_as_a_video(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    videos = np.random.default_rng(2).integers(0, 256, (2, 4, 8, 8, 1), dtype=np.uint8)
    writer = MetricsWriter(tmp_path)
    writer.add_samples("eval/samples", videos, 3, columns=2)
    writer.add_samples("eval/samples", videos[:, 0], 4, columns=2)  # images: not logged as video
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (logged,) = events.Images("eval/samples")
    assert logged.step == 3
    gif = Image.open(io.BytesIO(logged.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 4 and (gif.width, gif.height) == (logged.width, logged.height)

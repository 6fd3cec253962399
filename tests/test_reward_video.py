"""Videos on the reward wire (uint8 [N, T, H, W, C] in the same Tensor): the frame wrappers of image
rewards, temporal consistency and the VLM video judge, through a real server and checked against
transcriptions written here; modality errors name the reward; ListRewards and OIP say the modality;
videos take their own working-set size in the memory budget."""

from __future__ import annotations

import base64
import io
import json
from http.server import BaseHTTPRequestHandler

import grpc
import numpy as np
import pytest
import torch
from conftest import http_server, send_chat_answer
from PIL import Image

from epgrpo.protos import codec
from epgrpo.protos.reward_names import parse_wrapper, served_name, split_top_level
from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.budget import MiB
from epgrpo.services.common.server import ServerConfig
from epgrpo.services.reward.backends.base import RewardBackend, create_backend, register_backend
from epgrpo.services.reward.main import build_registrar
from epgrpo.trainer.config import parse_rewards

DEADLINE_S = 30


@register_backend("test_brightness_rank")
class BrightnessRank(RewardBackend):
    """Group-aware test reward: an image's rank by mean brightness within its group, / (n - 1)."""

    group_aware = True

    def _score(self, images, prompts, metadata):
        means = images.reshape(len(images), -1).mean(1)
        ranks = means.argsort().argsort().astype(np.float64)
        return ranks / max(1, len(images) - 1)


@pytest.fixture(scope="module")
def registrar():
    return build_registrar(["jpeg_compressibility", "temporal_consistency", "test_brightness_rank"])


@pytest.fixture
def stub(background_server, registrar):
    server = background_server(registrar)
    with grpc.insecure_channel(server.address) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel), channel


def videos(n=3, t=5, side=16, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, t, side, side, channels), dtype=np.uint8)


def score(stub, images, rewards, prompts=None, metadata=None):
    request = reward_pb2.ScoreRequest(
        images=codec.encode(images), prompts=prompts or [""] * len(images),
        rewards=[tensor_pb2.RewardSpec(name=n, weight=w) for n, w in rewards],
        metadata=[tensor_pb2.Metadata(fields=m) for m in (metadata or [])])
    return stub.Score(request, timeout=DEADLINE_S)


def test_frame_wrappers_average_the_image_reward_over_the_chosen_frames(stub):
    stub, _ = stub
    clip = videos(n=3, t=5)
    jpeg = create_backend("jpeg_compressibility")
    per_frame = np.stack([jpeg.score(np.ascontiguousarray(clip[:, j]), [""] * 3) for j in range(5)], axis=1)
    expected = {  # the frames each name scores, written out by hand for T = 5
        "frames(jpeg_compressibility)": [0, 1, 3, 4],  # k=4 uniform: round(linspace(0, 4, 4)) = 0, 1.33, 2.67, 4
        "frames(jpeg_compressibility, k=2)": [0, 4],
        "frames(jpeg_compressibility, k=3, at=uniform)": [0, 2, 4],
        "frames(jpeg_compressibility, k=2, at=start)": [0, 1],
        "frames(jpeg_compressibility,k=2,at=end)": [3, 4],
        "frames(jpeg_compressibility, k=all)": [0, 1, 2, 3, 4],
        "frames(jpeg_compressibility, k=9)": [0, 1, 2, 3, 4],  # more than T: every frame once
        "first_frame(jpeg_compressibility)": [0],
    }
    response = score(stub, clip, [(name, 1.0) for name in expected])
    for raw, (name, frames) in zip(response.per_reward, expected.items()):
        assert raw.name == name
        np.testing.assert_allclose(raw.scores, per_frame[:, frames].mean(1), rtol=1e-6, err_msg=name)
    # a one-frame video: every wrapper scores that frame
    single = score(stub, clip[:, :1], [("frames(jpeg_compressibility)", 1.0)])
    np.testing.assert_allclose(single.scores, per_frame[:, 0], rtol=1e-6)


def test_a_group_aware_reward_compares_a_groups_videos_frame_by_frame(stub):
    stub, _ = stub
    # two groups of 3 videos, 2 frames: frame 0 ranks videos one way, frame 1 the other way round
    levels = np.array([[10, 200], [20, 100], [30, 0], [5, 5], [6, 6], [7, 7]], dtype=np.uint8)
    clip = np.broadcast_to(levels[:, :, None, None, None], (6, 2, 4, 4, 1)).copy()
    metadata = [{"group": g} for g in "aaabbb"]
    response = score(stub, clip, [("frames(test_brightness_rank, k=all)", 1.0)], metadata=metadata)
    # group a: frame 0 ranks 0, 0.5, 1, frame 1 ranks 1, 0.5, 0 -> 0.5 each; group b: 0, 0.5, 1 both frames
    np.testing.assert_allclose(response.scores, [0.5, 0.5, 0.5, 0.0, 0.5, 1.0], atol=1e-6)
    assert {r.name: r.group_aware for r in stub.ListRewards(reward_pb2.ListRewardsRequest(), timeout=5).rewards}[
        "test_brightness_rank"]


def test_temporal_consistency_without_clip_is_one_minus_the_mean_frame_difference(stub):
    stub, _ = stub
    clip = videos(n=4, t=3, side=8, channels=1, seed=1)
    clip[0] = clip[0, :1]  # a static video
    response = score(stub, clip, [("temporal_consistency", 1.0)])
    x = clip.astype(np.float64) / 255.0
    expected = [1.0 - np.mean([np.abs(v[t + 1] - v[t]).mean() for t in range(len(v) - 1)]) for v in x]
    np.testing.assert_allclose(response.scores, expected, rtol=1e-5)
    assert response.scores[0] == pytest.approx(1.0)


def test_temporal_consistency_with_clip_is_the_mean_cosine_of_consecutive_frame_embeddings(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from epgrpo.services.reward.backends.tiny_clip import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path / "clip")
    backend = create_backend("temporal_consistency", path=str(clip_dir))
    rng = np.random.default_rng(2)
    coarse = torch.from_numpy(rng.integers(0, 256, (6, 3, 4, 4)).astype(np.float32))
    frames = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")  # smooth, at the model's size
    clip = frames.permute(0, 2, 3, 1).round().clamp(0, 255).numpy().astype(np.uint8).reshape(2, 3, 32, 32, 3)
    got = backend.score(clip, ["", ""])
    # transformers' own path: processor + get_image_features, float64 cosines
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    with torch.no_grad():
        out = model.get_image_features(**processor(images=list(clip.reshape(6, 32, 32, 3)), return_tensors="pt"))
    embeds = getattr(out, "pooler_output", out).double().numpy()
    embeds = (embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).reshape(2, 3, -1)
    expected = [(np.sum(v[1:] * v[:-1], axis=1)).mean() for v in embeds]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_reward_of_the_wrong_modality_is_invalid_argument_naming_it(stub):
    stub, _ = stub
    cases = [
        (videos(), "jpeg_compressibility", "reward 'jpeg_compressibility' scores images"),
        (videos()[:, 0], "temporal_consistency", "reward 'temporal_consistency' scores videos"),
        (videos()[:, 0], "first_frame(jpeg_compressibility)", "reward 'first_frame(jpeg_compressibility)' scores videos"),
        (videos(), "frames(temporal_consistency)", "wraps an image reward; 'temporal_consistency' scores videos"),
        (videos(), "frames(nope)", "unknown reward 'nope'"),
        (videos(), "frames(jpeg_compressibility, k=0)", "k: expected an integer >= 1 or 'all'"),
        (videos(), "frames(jpeg_compressibility, every=2)", "unknown option(s) every"),
        (videos(), "frames(jpeg_compressibility, at=middle)", "at: expected one of uniform, start, end"),
        (videos(), "slowmo(jpeg_compressibility)", "unknown wrapper 'slowmo'"),
        (videos(), "frames(jpeg_compressibility", "expected wrapper(reward[, key=value]...)"),
        (videos()[:, :1], "temporal_consistency", "at least 2 frames"),
    ]
    for images, name, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            score(stub, images, [(name, 1.0)])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert message in info.value.details(), (name, info.value.details())
        assert "rewards[0].name" in info.value.details() or "images.shape" in info.value.details()
    assert len(score(stub, videos(), [("frames(jpeg_compressibility)", 1.0)]).scores) == 3  # still serving


def test_list_rewards_says_what_each_reward_scores(stub):
    stub, _ = stub
    response = stub.ListRewards(reward_pb2.ListRewardsRequest(), timeout=5)
    infos = {r.name: r for r in response.rewards}
    assert sorted(infos) == ["jpeg_compressibility", "temporal_consistency", "test_brightness_rank"]
    assert infos["jpeg_compressibility"].modality == reward_pb2.MODALITY_IMAGE
    assert infos["temporal_consistency"].modality == reward_pb2.MODALITY_VIDEO
    assert sorted(w.name.partition("(")[0] for w in response.wrappers) == ["first_frame", "frames"]
    assert all(w.modality == reward_pb2.MODALITY_VIDEO and "<image reward>" in w.name for w in response.wrappers)


def test_oip_scores_videos_with_a_wrapper_model(background_server, registrar):
    server = background_server(registrar)
    clip = videos(n=2, t=4)
    with grpc.insecure_channel(server.address) as channel:
        oip = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        name = "frames(jpeg_compressibility, k=2)"
        meta = oip.ModelMetadata(oip_pb2.ModelMetadataRequest(name=name), timeout=5)
        assert list(meta.inputs[0].shape) == [-1] * 5
        assert list(oip.ModelMetadata(oip_pb2.ModelMetadataRequest(name="jpeg_compressibility"), timeout=5)
                    .inputs[0].shape) == [-1] * 4
        assert oip.ModelReady(oip_pb2.ModelReadyRequest(name=name), timeout=5).ready
        assert not oip.ModelReady(oip_pb2.ModelReadyRequest(name="frames(nope)"), timeout=5).ready
        tensor = oip_pb2.ModelInferRequest.InferInputTensor(name="IMAGES", datatype="UINT8", shape=list(clip.shape))
        response = oip.ModelInfer(oip_pb2.ModelInferRequest(model_name=name, inputs=[tensor],
                                                            raw_input_contents=[clip.tobytes()]), timeout=DEADLINE_S)
        got = np.frombuffer(response.raw_output_contents[0], "<f4")
        jpeg = create_backend("jpeg_compressibility")
        expected = (jpeg.score(np.ascontiguousarray(clip[:, 0]), ["", ""]) +
                    jpeg.score(np.ascontiguousarray(clip[:, 3]), ["", ""])) / 2
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_videos_take_their_own_working_set_in_the_memory_budget(background_server, registrar):
    # 40 MiB budget: an image request of 12 MiB holds 2 x 12 = 24 MiB while served and fits; the same
    # bytes as videos hold 3 x 12 = 36 MiB (under 40, fits); 14 MiB: 28 MiB of images fit, 42 MiB of
    # videos can never fit and are refused without the retry mark.
    server = background_server(registrar, ServerConfig(max_inflight_bytes=40 * MiB, max_message_bytes=16 * MiB))
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * MiB)]) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        frames = np.zeros((14, 1024, 1024, 1), np.uint8)  # 14 MiB
        assert len(score(stub, frames, [("jpeg_compressibility", 1.0)]).scores) == 14
        with pytest.raises(grpc.RpcError) as info:
            score(stub, frames.reshape(7, 2, 1024, 1024, 1), [("frames(jpeg_compressibility)", 1.0)])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than this server's whole budget of 40 MiB" in info.value.details()
        assert len(score(stub, frames[:12].reshape(6, 2, 1024, 1024, 1),
                         [("frames(jpeg_compressibility)", 1.0)]).scores) == 6
    assert server.running.budget.peak >= 36 * MiB


class FakeVideoJudge(BaseHTTPRequestHandler):
    """Answers 'Score: <mean of the first image / 25.5>' and records how many images each question had."""

    seen: list[list[float]] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = body["messages"][-1]["content"]
        means = [float(np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])))).mean())
                 for p in parts if p["type"] == "image_url"]
        assert parts[-1]["type"] == "text" and "frames of one video" in parts[-1]["text"]
        FakeVideoJudge.seen.append(means)
        send_chat_answer(self, f"Score: {means[0] / 25.5:.2f}")


def test_vlm_video_judge_sends_k_evenly_spaced_frames_in_order(background_server):
    with http_server(FakeVideoJudge) as url:
        server = background_server(build_registrar([f"vlm_video_judge:url={url};frames=3"]))
        clip = np.broadcast_to(np.array([[0, 50, 100, 150, 200], [255, 0, 0, 0, 255]], np.uint8)[:, :, None, None, None],
                               (2, 5, 4, 4, 3)).copy()
        with grpc.insecure_channel(server.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            response = score(stub, clip, [("vlm_video_judge", 1.0)], prompts=["a", "b"])
    assert sorted(FakeVideoJudge.seen) == sorted([[0.0, 100.0, 200.0], [255.0, 0.0, 255.0]])  # frames 0, 2, 4
    np.testing.assert_allclose(response.scores, [0.0, 1.0], atol=1e-6)


def test_reward_lists_split_outside_wrapper_parentheses():
    assert parse_rewards("frames(digit, k=4):0.5, digit_motion,first_frame(jpeg_compressibility):2", "r") == [
        ("frames(digit, k=4)", 0.5), ("digit_motion", 1.0), ("first_frame(jpeg_compressibility)", 2.0)]
    with pytest.raises(ValueError, match="weight of 'frames\\(digit\\)' must be a number"):
        parse_rewards("frames(digit):x", "r")
    assert split_top_level("a(b, c), d") == ["a(b, c)", " d"]
    assert parse_wrapper("frames(digit, k=all, at=end)") == ("frames", "digit", {"k": "all", "at": "end"})
    assert parse_wrapper("digit") is None
    assert served_name("frames(digit, k=2)") == "digit" and served_name("digit") == "digit"
    with pytest.raises(ValueError, match="expected key=value"):
        parse_wrapper("frames(digit, 4)")

"""Group-aware rewards: ``pickscore_pairwise`` on a tiny random CLIP against a brute-force reference
(transformers' own CLIPModel forward, then softmax([s_i, s_j]) pair by pair in float64), and the
rule that a group is always scored whole: by the backend, the service (with dynamic batching on) and
RewardClient's chunks."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc
from epgrpo.services.reward.backends.base import create_backend, group_indices
from epgrpo.services.reward.backends.clip import PickScorePairwise
from epgrpo.services.reward.backends.tiny_clip import save_tiny_clip
from epgrpo.services.reward.config import BatchingConfig, RewardEntry
from epgrpo.trainer.reward_client import RewardClient, group_chunks


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def pairwise(clip_dir):
    return create_backend("pickscore_pairwise", path=str(clip_dir))


@pytest.fixture(scope="module")
def reference(clip_dir):
    """Win rates from transformers' standard path (CLIPProcessor + CLIPModel.forward, float64), pair by pair."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)

    def win_rates(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
        with torch.no_grad():
            s = model(**inputs).logits_per_image.double().diagonal()  # logit_scale.exp() * cos(image_i, prompt_i)
        n = len(images)
        return np.array([np.mean([float(torch.softmax(torch.stack([s[i], s[j]]), 0)[0]) for j in range(n) if j != i])
                         for i in range(n)])

    return win_rates


def images(n: int, seed: int) -> np.ndarray:
    """Smooth random 32x32 images (the tiny model's size: no resampling between the two paths)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    return up.permute(0, 2, 3, 1).round().clamp(0, 255).numpy().astype(np.uint8)


def test_group_indices_keep_first_appearance_and_pool_images_without_a_group():
    groups = group_indices([{"group": "b"}, {}, {"group": "a"}, {"group": "b"}, {"group": ""}, {"other": "x"}])
    assert [g.tolist() for g in groups] == [[0, 3], [1, 4, 5], [2]]
    assert [g.tolist() for g in group_indices([{}, {}, {}])] == [[0, 1, 2]]  # no metadata: one group


def test_win_rates_match_the_pairwise_softmax_and_sum_to_half_the_group(pairwise, reference):
    batch, prompts = images(6, seed=1), ["a red cat"] * 6
    scores = pairwise.score(batch, prompts)
    np.testing.assert_allclose(scores, reference(batch, prompts), atol=1e-5)
    assert scores.sum() == pytest.approx(6 / 2, abs=1e-5)  # P(i > j) + P(j > i) = 1 for every pair
    assert scores.std() > 0.02, "the fixture should give the images different win rates"
    assert ((scores > 0) & (scores < 1)).all()


def test_permuting_a_group_permutes_its_scores(pairwise):
    batch, prompts = images(5, seed=2), ["a photo of 7 dogs"] * 5
    order = np.array([3, 0, 4, 2, 1])
    np.testing.assert_allclose(pairwise.score(batch[order], prompts), pairwise.score(batch, prompts)[order], atol=1e-6)


def test_two_groups_in_one_request_are_scored_independently(pairwise, reference):
    a, b = images(4, seed=3), images(3, seed=4)
    batch = np.concatenate([a, b])[[0, 4, 1, 5, 2, 6, 3]]  # interleaved: a0 b0 a1 b1 a2 b2 a3
    labels = ["A", "B", "A", "B", "A", "B", "A"]
    prompts = ["a red cat" if g == "A" else "hello world" for g in labels]
    scores = pairwise.score(batch, prompts, [{"group": g} for g in labels])
    np.testing.assert_allclose(scores[0::2], reference(a, ["a red cat"] * 4), atol=1e-5)
    np.testing.assert_allclose(scores[1::2], reference(b, ["hello world"] * 3), atol=1e-5)
    assert scores[0::2].sum() == pytest.approx(2.0, abs=1e-5) and scores[1::2].sum() == pytest.approx(1.5, abs=1e-5)
    assert pairwise.score(batch[:1], prompts[:1]).tolist() == [0.5]  # a group of one: no one to beat


def test_group_chunks_hold_whole_groups():
    groups = ["a", "b", "a", "c", "b", "a", "c", "d"]  # a: 3 images, b: 2, c: 2, d: 1
    chunks = group_chunks(groups, bytes_per_item=10, max_bytes=45, max_items=100)  # 4 images per chunk
    assert [c.tolist() for c in chunks] == [[0, 2, 5], [1, 4, 3, 6], [7]]
    big = group_chunks(groups, bytes_per_item=10, max_bytes=15, max_items=100)  # 1 per chunk: a group is never cut
    assert [sorted(groups[i] for i in c) for c in big] == [["a"] * 3, ["b"] * 2, ["c"] * 2, ["d"]]
    with pytest.raises(ValueError, match="groups: group 'a' has 3 images of 10 bytes, over the 20 byte message limit"):
        group_chunks(groups, bytes_per_item=10, max_bytes=15, max_items=100, max_message_bytes=20)


@pytest.fixture
def group_calls(monkeypatch):
    """(group label, size) of every PickScorePairwise._score call, in any thread."""
    calls, lock = [], threading.Lock()
    original = PickScorePairwise._score

    def spy(self, images, prompts, metadata):
        with lock:
            calls.append(((metadata[0].get("group") if metadata else None), len(images)))
        return original(self, images, prompts, metadata)

    monkeypatch.setattr(PickScorePairwise, "_score", spy)
    return calls


@pytest.fixture(scope="module")
def reward_server(clip_dir):
    """pickscore_pairwise and jpeg_compressibility behind a real server with dynamic batching on."""
    from conftest import BackgroundServer

    from epgrpo.services.reward.main import build_registrar

    entries = [RewardEntry("pickscore_pairwise", "pickscore_pairwise", {"path": str(clip_dir)}),
               RewardEntry("jpeg_compressibility", "jpeg_compressibility")]
    server = BackgroundServer(build_registrar(entries, batching=BatchingConfig(max_size=64, max_delay_ms=50)))
    yield server
    server.stop()


def test_list_rewards_says_which_rewards_are_group_aware(reward_server):
    client = RewardClient(reward_server.address)
    try:
        client.list_rewards()
        assert client.group_aware(["jpeg_compressibility", "pickscore_pairwise"])
        assert not client.group_aware(["jpeg_compressibility"])
    finally:
        client.close()


def test_batching_never_merges_two_requests_groups(reward_server, pairwise, group_calls):
    """Concurrent requests whose groups share names ('0', '1'): each gets its own groups' win rates."""
    import grpc

    from epgrpo.protos import codec
    from epgrpo.protos.v1 import tensor_pb2

    requests = [images(6, seed=10 + k) for k in range(4)]
    labels = ["0", "0", "0", "1", "1", "1"]
    results: dict[int, np.ndarray] = {}

    def send(k: int) -> None:
        with grpc.insecure_channel(reward_server.address) as channel:
            response = reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(
                images=codec.encode(requests[k]), prompts=["a red cat"] * 6,
                metadata=[tensor_pb2.Metadata(fields={"group": g}) for g in labels],
                rewards=[tensor_pb2.RewardSpec(name="pickscore_pairwise", weight=1.0),
                         tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=0.0)]), timeout=60)
            results[k] = np.asarray(response.scores)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k, batch in enumerate(requests):
        expected = pairwise.score(batch, ["a red cat"] * 6, [{"group": g} for g in labels])
        np.testing.assert_allclose(results[k], expected, atol=1e-5)
    served = group_calls[:8]  # (the in-process reference calls come after)
    assert sorted(served) == [("0", 3)] * 4 + [("1", 3)] * 4


def test_reward_client_chunks_hold_whole_groups(reward_server, pairwise, group_calls):
    batch = images(12, seed=20)
    groups = [k % 3 for k in range(12)]  # interleaved groups of 4: chunks cannot be contiguous slices
    prompts = ["a red cat"] * 12
    client = RewardClient(reward_server.address, max_request_bytes=5 * batch[:1].nbytes)  # 5 images a chunk
    try:
        combined, raw = client.score(batch, prompts, [("pickscore_pairwise", 2.0)], groups=groups)
        jpeg, _ = client.score(batch, prompts, [("jpeg_compressibility", 1.0)], groups=groups)  # not group-aware
    finally:
        client.close()
    assert sorted(group_calls) == [("0", 4), ("1", 4), ("2", 4)]  # three chunks, one group each
    expected = pairwise.score(batch, prompts, [{"group": str(g)} for g in groups])
    np.testing.assert_allclose(raw["pickscore_pairwise"], expected, atol=1e-5)
    np.testing.assert_allclose(combined, 2 * expected, atol=1e-5)
    single = create_backend("jpeg_compressibility").score(batch, prompts)
    np.testing.assert_allclose(jpeg, single, rtol=1e-6)  # plain chunks, reassembled in order


def test_pruner_scores_a_group_split_in_parts_once_whole(reward_server, pairwise, group_calls):
    """Three parts of a group of 6 previews: one Score call with all 6, the proxy scores of the whole
    group (the pixel decoder written out independently: [-1, 1] -> uint8 HWC)."""
    import grpc

    from conftest import BackgroundServer

    from epgrpo.protos import codec
    from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, tensor_pb2
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar

    previews = images(6, seed=30).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1  # exact in float32
    pruner = BackgroundServer(pruner_registrar(reward_server.address))
    open_message = pruner_pb2.OpenRollout(rollout_id="r", schedule=[pruner_pb2.Checkpoint(step=2, keep=2)],
                                          num_steps=4, proxy_rewards=[tensor_pb2.RewardSpec(name="pickscore_pairwise",
                                                                                            weight=1.0)])
    messages = [pruner_pb2.PruneStreamRequest(open=open_message)] + [
        pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
            group_id="g", step=2, trajectory_ids=list(range(lo, lo + 2)), group_size=6,
            previews=codec.encode(previews[lo:lo + 2]), prompts=["a red cat"])) for lo in (0, 2, 4)]
    try:
        with grpc.insecure_channel(pruner.address) as channel:
            (decision,) = list(pruner_pb2_grpc.PrunerServiceStub(channel).PruneRollout(iter(messages), timeout=60))
    finally:
        pruner.stop()
    assert group_calls == [("g", 6)]
    decoded = np.rint((previews.transpose(0, 2, 3, 1) + 1) / 2 * 255).astype(np.uint8)
    expected = pairwise.score(decoded, ["a red cat"] * 6)
    np.testing.assert_allclose(decision.proxy_scores, expected, atol=1e-5)
    # the selection runs on the group's scores unchanged
    from epgrpo.services.pruner.session import select_survivors

    assert list(decision.survivor_ids) == select_survivors(list(range(6)), np.asarray(decision.proxy_scores), 2,
                                                           open_message.strategy, 0, "g", 2)


def test_the_oip_front_announces_the_group_input_and_the_oip_client_sends_whole_groups(reward_server, pairwise,
                                                                                         group_calls):
    """OIP has no per-image metadata: a group-aware model declares a GROUP input (ModelMetadata), the
    trainer's OIP client finds it and sends each image's group there, in requests of whole groups."""
    import grpc

    from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc
    from epgrpo.trainer.oip_reward import OipRewardClient

    with grpc.insecure_channel(reward_server.address) as channel:
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        inputs = {name: [t.name for t in stub.ModelMetadata(oip_pb2.ModelMetadataRequest(name=name), timeout=10).inputs]
                  for name in ("pickscore_pairwise", "jpeg_compressibility")}
    assert inputs == {"pickscore_pairwise": ["IMAGES", "PROMPTS", "GROUP"], "jpeg_compressibility": ["IMAGES", "PROMPTS"]}
    batch, groups, prompts = images(12, seed=30), [k % 3 for k in range(12)], ["a red cat"] * 12
    client = OipRewardClient(f"oip://{reward_server.address}", max_batch=5)  # at most 5 images a request
    try:
        combined, raw = client.score(batch, prompts, [("pickscore_pairwise", 1.0), ("jpeg_compressibility", 0.0)],
                                     groups=groups)
        assert client.group_input("jpeg_compressibility") is None
    finally:
        client.close()
    assert sorted(group_calls) == [("0", 4), ("1", 4), ("2", 4)]  # one request per group, never split
    expected = pairwise.score(batch, prompts, [{"group": str(g)} for g in groups])
    np.testing.assert_allclose(raw["pickscore_pairwise"], expected, atol=1e-5)
    np.testing.assert_allclose(combined, expected, atol=1e-5)
    with grpc.insecure_channel(reward_server.address) as channel:  # GROUP must have one id per image
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = oip_pb2.ModelInferRequest.InferInputTensor
        from epgrpo.protos.oip_codec import encode_bytes

        request = oip_pb2.ModelInferRequest(
            model_name="pickscore_pairwise",
            inputs=[tensor(name="IMAGES", datatype="UINT8", shape=list(batch[:2].shape)),
                    tensor(name="GROUP", datatype="BYTES", shape=[1])],
            raw_input_contents=[batch[:2].tobytes(), encode_bytes(["a"])])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("GROUP: expected 2 elements (one per image), got 1")

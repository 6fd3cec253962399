"""ImageReward on a tiny random checkpoint in ImageReward.pt's layout, checked against an independent
float64 forward written here from the original modules (BLIP's vit.py ViT with fused qkv, med.py's BERT
with cross-attention and -10000 padding masks, the MLP head, the release's mean/std), in-process and
through a real reward server."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.backends.imagereward import REWARD_MEAN, REWARD_STD

WORDS = ["a", "red", "cat", "hello", "world", "photo", "of", "7", "dogs", "x", "very", "long", "prompt"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]  # + [DEC], [ENC] added as BLIP does
VISION = dict(width=32, layers=2, heads=2, patch=8, image=32)
TEXT = dict(width=32, layers=2, heads=2, positions=40, vocab=len(VOCAB) + 2)
PROMPTS = ["a red cat", "hello world", "a photo of 7 dogs", "x"]
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def checkpoint_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward.pt's names, with BLIP's unused projections and BERT's
    position_ids buffer as the real file has them."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    def linear(prefix, fan_in, fan_out):
        return {prefix + "weight": rand(fan_out, fan_in), prefix + "bias": rand(fan_out, scale=0.1)}

    def norm(prefix, width):
        return {prefix + "weight": 1 + rand(width, scale=0.1), prefix + "bias": rand(width, scale=0.1)}

    w, v = VISION["width"], "blip.visual_encoder."
    tokens = (VISION["image"] // VISION["patch"]) ** 2 + 1
    state = {v + "cls_token": rand(1, 1, w, scale=1.0), v + "pos_embed": rand(1, tokens, w, scale=0.5),
             v + "patch_embed.proj.weight": rand(w, 3, VISION["patch"], VISION["patch"], scale=0.05),
             v + "patch_embed.proj.bias": rand(w, scale=0.1)} | norm(v + "norm.", w)
    for i in range(VISION["layers"]):
        b = f"{v}blocks.{i}."
        state |= norm(b + "norm1.", w) | norm(b + "norm2.", w) | linear(b + "attn.qkv.", w, 3 * w)
        state |= linear(b + "attn.proj.", w, w) | linear(b + "mlp.fc1.", w, 4 * w) | linear(b + "mlp.fc2.", 4 * w, w)
    h, t = TEXT["width"], "blip.text_encoder."
    state |= {t + "embeddings.word_embeddings.weight": rand(TEXT["vocab"], h, scale=1.0),
              t + "embeddings.position_embeddings.weight": rand(TEXT["positions"], h, scale=0.5),
              t + "embeddings.position_ids": torch.arange(TEXT["positions"]).expand(1, -1)}
    state |= norm(t + "embeddings.LayerNorm.", h)
    for i in range(TEXT["layers"]):
        b = f"{t}encoder.layer.{i}."
        for kind, kv_width in (("attention", h), ("crossattention", w)):
            state |= linear(f"{b}{kind}.self.query.", h, h) | linear(f"{b}{kind}.self.key.", kv_width, h)
            state |= linear(f"{b}{kind}.self.value.", kv_width, h) | linear(f"{b}{kind}.output.dense.", h, h)
            state |= norm(f"{b}{kind}.output.LayerNorm.", h)
        state |= linear(b + "intermediate.dense.", h, 4 * h) | linear(b + "output.dense.", 4 * h, h)
        state |= norm(b + "output.LayerNorm.", h)
    widths = [h, 64, 16, 8, 4, 1]  # ImageReward's 768-1024-128-64-16-1 chain, shrunk
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state |= linear(f"mlp.layers.{index}.", a, b)
    return state | linear("blip.vision_proj.", w, 16) | linear("blip.text_proj.", h, 16)


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("imagereward")
    torch.save(checkpoint_state(), directory / "ImageReward.pt")
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")  # a bert-base-uncased-style tokenizer
    return directory


def backend(ir_dir, **options):
    return create_backend("imagereward", **{"path": str(ir_dir / "ImageReward.pt"), "head_dim": 16, **options})


# ---- the independent reference (float64), following BLIP's vit.py / med.py and ImageReward.py ----

def ref_tokens(prompt: str) -> tuple[list[int], list[int]]:
    """BERT tokenisation of whole-word prompts: [CLS] words [SEP], truncated to 35, zero-padded."""
    ids = [VOCAB.index("[CLS]")] + [VOCAB.index(word) for word in prompt.lower().split()][:33] + [VOCAB.index("[SEP]")]
    return ids + [0] * (35 - len(ids)), [1] * len(ids) + [0] * (35 - len(ids))


def ref_pixels(image: np.ndarray) -> np.ndarray:  # images at the model's size: ToTensor + Normalize
    return ((image.astype(np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def attention(q, k, v, heads, mask=0.0):
    n, length, width = q.shape
    q, k, v = (z.reshape(n, -1, heads, width // heads).transpose(1, 2) for z in (q, k, v))
    probs = (q @ k.transpose(-1, -2) / math.sqrt(width // heads) + mask).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(n, length, width)


def reference_scores(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    s = {k: v.double() for k, v in checkpoint_state().items()}
    ln, lin = torch.nn.functional.layer_norm, lambda x, p: x @ s[p + "weight"].T + s[p + "bias"]
    v = "blip.visual_encoder."
    x = torch.from_numpy(np.stack([ref_pixels(im) for im in images]))
    x = torch.nn.functional.conv2d(x, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"],
                                   stride=VISION["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x], dim=1) + s[v + "pos_embed"]
    for i in range(VISION["layers"]):
        b, eps = f"{v}blocks.{i}.", 1e-6
        h = ln(x, (VISION["width"],), s[b + "norm1.weight"], s[b + "norm1.bias"], eps)
        q, k, val = lin(h, b + "attn.qkv.").reshape(len(x), -1, 3, VISION["width"]).unbind(2)  # (B, N, 3, C)
        x = x + lin(attention(q, k, val, VISION["heads"]), b + "attn.proj.")
        h = ln(x, (VISION["width"],), s[b + "norm2.weight"], s[b + "norm2.bias"], eps)
        x = x + lin(torch.nn.functional.gelu(lin(h, b + "mlp.fc1.")), b + "mlp.fc2.")
    image = ln(x, (VISION["width"],), s[v + "norm.weight"], s[v + "norm.bias"], 1e-6)
    t = "blip.text_encoder."
    ids, mask = (torch.tensor(z) for z in zip(*(ref_tokens(p) for p in prompts)))
    pad = ((1.0 - mask.double()) * -10000.0)[:, None, None, :]  # med.py's extended attention mask
    y = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][:35]
    y = ln(y, (TEXT["width"],), s[t + "embeddings.LayerNorm.weight"], s[t + "embeddings.LayerNorm.bias"], 1e-12)
    for i in range(TEXT["layers"]):
        b = f"{t}encoder.layer.{i}."
        for kind, source, m in (("attention", None, pad), ("crossattention", image, 0.0)):
            kv = y if source is None else source
            a = attention(lin(y, f"{b}{kind}.self.query."), lin(kv, f"{b}{kind}.self.key."),
                          lin(kv, f"{b}{kind}.self.value."), TEXT["heads"], m)
            y = ln(lin(a, f"{b}{kind}.output.dense.") + y, (TEXT["width"],), s[f"{b}{kind}.output.LayerNorm.weight"],
                   s[f"{b}{kind}.output.LayerNorm.bias"], 1e-12)
        h = torch.nn.functional.gelu(lin(y, b + "intermediate.dense."))
        y = ln(lin(h, b + "output.dense.") + y, (TEXT["width"],), s[b + "output.LayerNorm.weight"],
               s[b + "output.LayerNorm.bias"], 1e-12)
    r = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{index}.")
    return ((r[:, 0] - REWARD_MEAN) / REWARD_STD).numpy()


def images_at(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_scores_equal_the_reference_forward(ir_dir):
    images = images_at(32)
    ref = reference_scores(images, PROMPTS)
    np.testing.assert_allclose(backend(ir_dir).score(images, PROMPTS), ref, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(ref, 3))) == len(PROMPTS) and np.ptp(ref) > 0.05  # not a degenerate fixture
    # Chunks, a prompt longer than 35 tokens (truncated, [SEP] kept last), padding that differs per prompt.
    prompts = ["very long prompt " * 14, "x", "a red cat", "very long prompt " * 14]
    np.testing.assert_allclose(backend(ir_dir, batch_size=3).score(images, prompts), reference_scores(images, prompts),
                               rtol=1e-5, atol=1e-5)


def test_the_image_and_the_prompt_both_matter(ir_dir):
    """The text [CLS] feature sees the image only through cross-attention: a wrong wiring there
    (say, image tokens not reaching the text encoder) would make the score prompt-only."""
    ir = backend(ir_dir)
    images = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)])  # black, white
    same_prompt = ir.score(images, ["a red cat"] * 2)
    assert abs(same_prompt[0] - same_prompt[1]) > 1e-4  # float32 noise is ~1e-7
    same_image = ir.score(np.repeat(images[:1], 2, axis=0), ["a red cat", "hello world"])
    assert abs(same_image[0] - same_image[1]) > 1e-4


def test_scores_through_a_real_reward_server(ir_dir, background_server):
    from epgrpo.services.reward.main import build_registrar
    from epgrpo.trainer.reward_client import RewardClient

    spec = f"imagereward:path={ir_dir / 'ImageReward.pt'};head_dim=16;dtype=float32"
    server = background_server(build_registrar([spec]))
    client = RewardClient(server.address)
    try:
        images = images_at(32, n=4, seed=9)
        _, raw = client.score(images, PROMPTS, [("imagereward", 1.0)])
    finally:
        client.close()
    np.testing.assert_allclose(raw["imagereward"], reference_scores(images, PROMPTS), rtol=1e-5, atol=1e-5)


def test_bad_configuration_fails_at_load_naming_the_option(ir_dir, tmp_path):
    with pytest.raises(InvalidArgument, match="'imagereward': option 'path' is required"):
        create_backend("imagereward")
    with pytest.raises(InvalidArgument, match=r"path=.*missing.pt: no such file"):
        create_backend("imagereward", path=str(tmp_path / "missing.pt"))
    with pytest.raises(InvalidArgument, match=r"tokenizer=.*expected a bert-base-uncased tokenizer directory"):
        backend(ir_dir, tokenizer=str(tmp_path))
    with pytest.raises(InvalidArgument, match="head_dim=64 does not divide"):
        create_backend("imagereward", path=str(ir_dir / "ImageReward.pt"))
    state = checkpoint_state()
    cases = [({k: v for k, v in state.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"},
              r"lacks 1 weights of the model, e.g. \['text.encoder.layer.1.crossattention.self.key.bias'\]"),
             (state | {"blip.itm_head.weight": torch.zeros(2, 32)},
              r"checkpoint key 'blip.itm_head.weight' has no place"),
             (state | {"mlp.layers.1.weight": torch.zeros(2, 2)}, r"checkpoint key 'mlp.layers.1.weight' has no place")]
    for i, (broken, message) in enumerate(cases):
        torch.save(broken, tmp_path / f"broken{i}.pt")
        with pytest.raises(InvalidArgument, match=message):
            backend(ir_dir, path=str(tmp_path / f"broken{i}.pt"), tokenizer=str(ir_dir))

"""HPSv2 on a tiny random open_clip-layout checkpoint, checked against an independent float64 reference
written here from open_clip's code (PIL eval transform, open_clip tokenisation with zero padding and
argmax pooling, fused in_proj attention, ``x @ proj``), in-process and through a real reward server."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import available_backends, create_backend
from epgrpo.services.reward.backends.tiny_clip import tiny_vocab

# A tiny open_clip model config, in the schema of open_clip's model_configs/*.json.
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 16, "vocab_size": len(tiny_vocab()), "width": 32, "heads": 2, "layers": 2}}
PROMPTS = ["a red cat", "hello world", "a photo of 7 dogs", "x"]
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def open_clip_state(seed: int = 0, config: dict = CONFIG, meta: bool = False) -> dict[str, torch.Tensor]:
    """Random weights under open_clip's CLIP state-dict names (visual.*, transformer.*, ...); shapes
    only (meta tensors) with ``meta``."""
    g = torch.Generator().manual_seed(seed)
    v, t, d = config["vision_cfg"], config["text_cfg"], config["embed_dim"]

    def rand(*shape, scale=None):
        if meta:
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    def blocks(prefix, width, layers):
        out = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {p + "ln_1.weight": 1 + rand(width, scale=0.1), p + "ln_1.bias": rand(width, scale=0.1),
                    p + "attn.in_proj_weight": rand(3 * width, width),
                    p + "attn.in_proj_bias": rand(3 * width, scale=0.1),
                    p + "attn.out_proj.weight": rand(width, width), p + "attn.out_proj.bias": rand(width, scale=0.1),
                    p + "ln_2.weight": 1 + rand(width, scale=0.1), p + "ln_2.bias": rand(width, scale=0.1),
                    p + "mlp.c_fc.weight": rand(4 * width, width), p + "mlp.c_fc.bias": rand(4 * width, scale=0.1),
                    p + "mlp.c_proj.weight": rand(width, 4 * width), p + "mlp.c_proj.bias": rand(width, scale=0.1)}
        return out

    grid = (v["image_size"] // v["patch_size"]) ** 2
    state = {"visual.class_embedding": rand(v["width"], scale=1.0),
             "visual.positional_embedding": rand(grid + 1, v["width"], scale=0.5),
             "visual.conv1.weight": rand(v["width"], 3, v["patch_size"], v["patch_size"], scale=0.05),
             "visual.ln_pre.weight": 1 + rand(v["width"], scale=0.1), "visual.ln_pre.bias": rand(v["width"], scale=0.1),
             "visual.ln_post.weight": 1 + rand(v["width"], scale=0.1),
             "visual.ln_post.bias": rand(v["width"], scale=0.1),
             "visual.proj": rand(v["width"], d),
             "token_embedding.weight": rand(t["vocab_size"], t["width"], scale=1.0),
             "positional_embedding": rand(t["context_length"], t["width"], scale=0.5),
             "ln_final.weight": 1 + rand(t["width"], scale=0.1), "ln_final.bias": rand(t["width"], scale=0.1),
             "text_projection": rand(t["width"], d), "logit_scale": torch.tensor(math.log(1 / 0.07))}
    if meta:
        state["logit_scale"] = state["logit_scale"].to("meta")
    return state | blocks("visual.", v["width"], v["layers"]) | blocks("", t["width"], t["layers"])


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    """HPS_v2.1_compressed.pt-style checkpoint ({'state_dict': ...}), the model config and a CLIP
    tokenizer in one directory."""
    from transformers import CLIPTokenizer

    directory = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": open_clip_state()}, directory / "HPS_v2.1_compressed.pt")
    (directory / "tiny.json").write_text(json.dumps(CONFIG))
    CLIPTokenizer(vocab=tiny_vocab(), merges=[], model_max_length=16).save_pretrained(directory)
    return directory


def backend(hps_dir, **options):
    options = {"path": str(hps_dir / "HPS_v2.1_compressed.pt"), "model": str(hps_dir / "tiny.json"), **options}
    return create_backend("hpsv2", **options)


# ---- the independent reference (float64), following open_clip's modules ----

def ref_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """open_clip eval transform on PIL: Resize(size, BICUBIC), CenterCrop(size), ToTensor, Normalize."""
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).convert("RGB")
    w, h = pil.size
    if (w, h) != ((size, int(size * h / w)) if w <= h else (int(size * w / h), size)):
        pil = pil.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BICUBIC)
    w, h = pil.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def ref_tokens(prompt: str, context: int) -> list[int]:
    """open_clip's tokenize for the tiny single-character vocabulary: [sot] + BPE + [eot], truncated
    with eot kept last, zero-padded to the context length."""
    vocab = tiny_vocab()
    ids = [vocab["<|startoftext|>"]]
    for word in prompt.lower().split():
        ids += [vocab[c] for c in word[:-1]] + [vocab[word[-1] + "</w>"]]
    ids = (ids + [vocab["<|endoftext|>"]])[:context]
    ids[-1] = vocab["<|endoftext|>"]
    return ids + [0] * (context - len(ids))


def ref_blocks(x, s, prefix, layers, heads, mask=None):
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], s[p + "ln_1.weight"], s[p + "ln_1.bias"], eps=1e-5)
        q, k, val = (h @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        n, length, width = q.shape
        q, k, val = (z.reshape(n, length, heads, width // heads).transpose(1, 2) for z in (q, k, val))
        logits = q @ k.transpose(-1, -2) / math.sqrt(width // heads) + (0 if mask is None else mask)
        attn = (logits.softmax(-1) @ val).transpose(1, 2).reshape(n, length, width)
        x = x + attn @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], s[p + "ln_2.weight"], s[p + "ln_2.bias"], eps=1e-5)
        h = torch.nn.functional.gelu(h @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"])
        x = x + h @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]
    return x


def reference_scores(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    s = {k: v.double() for k, v in open_clip_state().items()}
    v, t = CONFIG["vision_cfg"], CONFIG["text_cfg"]
    ln = torch.nn.functional.layer_norm
    pixels = torch.from_numpy(np.stack([ref_pixels(im, v["image_size"]) for im in images]))
    x = torch.nn.functional.conv2d(pixels, s["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + s["visual.positional_embedding"]
    x = ln(x, x.shape[-1:], s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], eps=1e-5)
    x = ref_blocks(x, s, "visual.", v["layers"], v["width"] // v["head_width"])
    image = ln(x[:, 0], x.shape[-1:], s["visual.ln_post.weight"], s["visual.ln_post.bias"], eps=1e-5) @ s["visual.proj"]
    ids = torch.tensor([ref_tokens(p, t["context_length"]) for p in prompts])
    x = s["token_embedding.weight"][ids] + s["positional_embedding"]
    causal = torch.full((t["context_length"],) * 2, float("-inf"), dtype=torch.float64).triu(1)
    x = ref_blocks(x, s, "", t["layers"], t["heads"], causal)
    x = ln(x, (t["width"],), s["ln_final.weight"], s["ln_final.bias"], eps=1e-5)
    text = x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ s["text_projection"]
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1).numpy()  # diag(image_features @ text_features.T)


def images_at(h: int, w: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """Smooth random images (noise would exaggerate resampling differences)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(h, w), mode="bilinear")
    return up.permute(0, 2, 3, 1).round().clamp(0, 255).numpy().astype(np.uint8)


# ---- tests ----

def test_scores_equal_the_open_clip_reference(hps_dir):
    images = images_at(32, 32)
    scores = backend(hps_dir).score(images, PROMPTS)
    ref = reference_scores(images, PROMPTS)
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(ref, 4))) == len(PROMPTS) and np.abs(ref).max() > 0.1  # not a degenerate fixture
    # A long prompt is truncated keeping the end-of-text token last, as open_clip does; repeats share work.
    long = "a very long prompt about cats " * 4
    prompts = [long, "x", long, "x"]
    np.testing.assert_allclose(backend(hps_dir, batch_size=3).score(images, prompts), reference_scores(images, prompts),
                               rtol=1e-5, atol=1e-5)


def test_preprocessing_follows_open_clips_eval_transform(hps_dir):
    hps = backend(hps_dir)
    # No resize (shorter side already 32): the crop alone, with torchvision's offsets round(d / 2)
    # (d = 3 -> 2, where floor would give 1), exact even on noise.
    noise = np.random.default_rng(3).integers(0, 256, (2, 35, 32, 3), dtype=np.uint8)
    for images in (noise, noise.transpose(0, 2, 1, 3)):
        np.testing.assert_allclose(hps.pixel_values(images).double().numpy(),
                                   np.stack([ref_pixels(im, 32) for im in images]), atol=1e-5)
    for shape in [(48, 80), (100, 45), (20, 20)]:  # wide, tall, upscaled: torch vs PIL bicubic rounding
        images = images_at(*shape, n=3)
        ours = hps.pixel_values(images).double().numpy()
        assert np.abs(ours - np.stack([ref_pixels(im, 32) for im in images])).mean() < 0.02, shape
    images = images_at(64, 64)
    np.testing.assert_allclose(hps.score(images, PROMPTS), reference_scores(images, PROMPTS), atol=0.01)
    gray = images.mean(axis=3, keepdims=True).astype(np.uint8)
    np.testing.assert_allclose(hps.score(gray, PROMPTS), hps.score(np.repeat(gray, 3, axis=3), PROMPTS), atol=1e-6)


def test_bare_safetensors_and_module_prefixed_checkpoints_load_alike(hps_dir, tmp_path):
    images = images_at(32, 32, seed=5)
    expected = backend(hps_dir).score(images, PROMPTS)
    state = open_clip_state()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    save_file(state, str(tmp_path / "hps.safetensors"))
    for name in ("bare.pt", "hps.safetensors"):
        got = backend(hps_dir, path=str(tmp_path / name), tokenizer=str(hps_dir)).score(images, PROMPTS)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    half = backend(hps_dir, path=str(tmp_path / "ddp.pt"), tokenizer=str(hps_dir)).score(images, PROMPTS)
    np.testing.assert_allclose(half, expected, atol=5e-3)  # float16 weights, computed in float32


def test_scores_through_a_real_reward_server(hps_dir, background_server):
    from epgrpo.services.reward.main import build_registrar
    from epgrpo.trainer.reward_client import RewardClient

    spec = f"hps=hpsv2:path={hps_dir / 'HPS_v2.1_compressed.pt'};model={hps_dir / 'tiny.json'};dtype=float32"
    server = background_server(build_registrar([spec, "jpeg_compressibility"]))
    client = RewardClient(server.address)
    try:
        images = images_at(32, 32, n=6, seed=7)
        prompts = ["a red cat"] * 3 + ["hello world"] * 3
        combined, raw = client.score(images, prompts, [("hps", 2.0)])
    finally:
        client.close()
    ref = reference_scores(images, prompts)
    np.testing.assert_allclose(raw["hps"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(combined, 2 * ref, rtol=1e-5, atol=1e-5)


def test_listed_and_bad_configuration_fails_at_load_naming_the_option(hps_dir, tmp_path, capsys):
    from epgrpo.services.reward.main import main

    assert "hpsv2" in available_backends()
    assert main(["--list-rewards"]) == 0 and "hpsv2: HPSv2" in capsys.readouterr().out
    with pytest.raises(InvalidArgument, match="'hpsv2': option 'path' is required"):
        create_backend("hpsv2")
    with pytest.raises(InvalidArgument, match=r"path=.*missing.pt: no such file"):
        backend(hps_dir, path=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidArgument, match=r"junk.pt: cannot load"):
        backend(hps_dir, path=str(tmp_path / "junk.pt"), tokenizer=str(hps_dir))
    with pytest.raises(InvalidArgument, match=r"tokenizer=.*expected a directory with CLIP tokenizer files"):
        backend(hps_dir, tokenizer=str(tmp_path))
    with pytest.raises(InvalidArgument, match="model=ViT-Z: expected one of ViT-H-14"):
        backend(hps_dir, model="ViT-Z")
    # The default architecture (ViT-H-14) does not fit the tiny tokenizer, nor a narrower projection the checkpoint.
    with pytest.raises(InvalidArgument, match=r"tokenizer=.*vocabulary has 138 tokens, the model 49408"):
        backend(hps_dir, model="ViT-H-14")
    (tmp_path / "narrow.json").write_text(json.dumps({**CONFIG, "embed_dim": 8}))
    with pytest.raises(InvalidArgument, match=r"checkpoint tensor for visual_projection.weight has shape \[16, 32\], "
                                              r"the model expects \[8, 32\]"):
        backend(hps_dir, model=str(tmp_path / "narrow.json"))
    timm = {**CONFIG, "vision_cfg": {**CONFIG["vision_cfg"], "timm_model_name": "x"}}
    (tmp_path / "timm.json").write_text(json.dumps(timm))
    with pytest.raises(InvalidArgument, match=r"unsupported open_clip options \['vision_cfg.timm_model_name'\]"):
        backend(hps_dir, model=str(tmp_path / "timm.json"))
    state = open_clip_state()
    for name, broken, message in [("short.pt", {k: v for k, v in state.items() if k != "visual.proj"},
                                   r"lacks 1 weights of the model, e.g. \['visual_projection.weight'\]"),
                                  ("extra.pt", state | {"visual.attn_pool.query": torch.zeros(2)},
                                   r"checkpoint key 'visual.attn_pool.query' has no place")]:
        torch.save({"state_dict": broken}, tmp_path / name)
        with pytest.raises(InvalidArgument, match=message):
            backend(hps_dir, path=str(tmp_path / name), tokenizer=str(hps_dir))


def test_the_vit_h_14_layout_fits_the_real_architecture():
    """The full-size open_clip ViT-H-14 layout (shapes only, no memory) maps onto the model built for
    model=ViT-H-14 with every tensor used, at open_clip's published size (986.11 M parameters)."""
    from epgrpo.services.reward.backends.hps import ARCHITECTURES, build_clip, model_config

    layout = open_clip_state(config=ARCHITECTURES["ViT-H-14"], meta=True)
    model = build_clip(model_config("ViT-H-14"), layout, 49407, 49406, "ViT-H-14")
    assert model.config.vision_config.num_attention_heads == 16 and model.config.text_config.num_attention_heads == 16
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 986.11

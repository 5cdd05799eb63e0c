"""CLIP, HPSv2, PickScore, aesthetic and crop-colour rewards on tiny random-weight models of the real architectures.

Each reward is built from weights saved to disk the way real checkpoints are shipped, and its scores are compared
with the same formula computed by hand on the model that wrote those weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from argrpo.rewards.base import build_reward
from argrpo.rewards.clip import register_open_clip_config
from PIL import Image

# open_clip's ViT-H-14 / ViT-L-14 config layout, shrunk: same CLIP class, ViT vision tower, causal text transformer.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PROMPTS = ["a photo of a red cube", "a blue ball", "two dogs", "a green car left of a cat",
           "an apple", "a purple vase", "three cups", "a white bird"]


@pytest.fixture(scope="module")
def imgs():
    rng = np.random.default_rng(0)
    # different sizes: open_clip's own resize + centre crop must handle them
    return [rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8) for i in range(8)]


def tiny_open_clip(name, cfg=TINY_CLIP, seed=0):
    register_open_clip_config(name, cfg)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def by_hand_features(model, preprocess, tokenizer, images, prompts):
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(x)) for x in images]))
        txt = model.encode_text(tokenizer(prompts))
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


def assert_batch_invariant(reward, holder, imgs, n=8):
    """Scores in batches of 1 equal scores in one batch of 8."""
    holder.batch_size = 8
    full = list(reward(PROMPTS[:n], imgs[:n]))
    holder.batch_size = 1
    ones = list(reward(PROMPTS[:n], imgs[:n]))
    np.testing.assert_allclose(ones, full, rtol=1e-5, atol=1e-6)
    return full


# ------------------------------------------------------------------ CLIPScore


def test_clipscore_matches_formula_and_batching(tmp_path, imgs):
    from safetensors.torch import save_file

    model, preprocess, tokenizer = tiny_open_clip("tiny-clip-test")
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    img, txt = by_hand_features(model, preprocess, tokenizer, imgs, PROMPTS)
    cos = (img * txt).sum(-1).numpy()

    reward = build_reward("clip", model="tiny-clip-test", pretrained=str(ckpt), device="cpu")
    scores = assert_batch_invariant(reward, reward.clip, imgs)
    np.testing.assert_allclose(scores, 2.5 * np.maximum(cos, 0), rtol=1e-5, atol=1e-6)
    raw = build_reward("clip", model="tiny-clip-test", pretrained=str(ckpt), device="cpu", mode="cosine")
    np.testing.assert_allclose(list(raw(PROMPTS, imgs)), cos, rtol=1e-5, atol=1e-6)
    # the score depends on the prompt: swapping prompts changes it
    assert not np.allclose(list(raw(PROMPTS[::-1], imgs)), cos)


def test_clip_bad_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"visual.nothing": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="does not fit open_clip model"):
        build_reward("clip", model="tiny-clip-test2", model_cfg=TINY_CLIP, pretrained=str(bad), device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_reward("clip", model="tiny-clip-test2", model_cfg=TINY_CLIP, pretrained=str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------ HPSv2


def test_hps_loads_state_dict_checkpoint(tmp_path, imgs):
    model, preprocess, tokenizer = tiny_open_clip("tiny-hps-src", seed=1)
    ckpt = tmp_path / "HPS_tiny.pt"
    # HPS ships {"state_dict": ...}; the reader must accept it with weights_only=True
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, ckpt)
    img, txt = by_hand_features(model, preprocess, tokenizer, imgs, PROMPTS)
    want = (img * txt).sum(-1).numpy()

    reward = build_reward("hps", checkpoint=str(ckpt), model="tiny-hps", model_cfg=TINY_CLIP, device="cpu")
    got = assert_batch_invariant(reward, reward.clip, imgs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_torch_checkpoint_with_code_is_refused(tmp_path):
    from argrpo.rewards.clip import load_state_dict_file

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "cls": object()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(path)


# ------------------------------------------------------------------ PickScore


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("r", "e"), ("re", "d</w>"), ("c", "u"), ("cu", "b"), ("cub", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizerFast(vocab=vocab, merges=merges)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(2)
    model = CLIPModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(50.0))  # PickScore's learned scale is about exp(4.6)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    path = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_pickscore_matches_formula_and_batching(pickscore_dir, imgs):
    from transformers import CLIPModel, CLIPProcessor

    tok = CLIPProcessor.from_pretrained(pickscore_dir).tokenizer
    assert tok("red cube")["input_ids"][1:-1] == tok.convert_tokens_to_ids(["red</w>", "cube</w>"])
    reward = build_reward("pickscore", path=str(pickscore_dir), device="cpu")
    got = assert_batch_invariant(reward, reward, imgs)

    model, proc = CLIPModel.from_pretrained(pickscore_dir).eval(), CLIPProcessor.from_pretrained(pickscore_dir)
    want = []
    with torch.no_grad():
        for prompt, im in zip(PROMPTS, imgs):  # one at a time: no padding involved
            px = proc(images=Image.fromarray(im), return_tensors="pt")["pixel_values"]
            ids = proc(text=[prompt], return_tensors="pt")
            i = model.vision_model(pixel_values=px).pooler_output @ model.visual_projection.weight.T
            t = model.text_model(**ids).pooler_output @ model.text_projection.weight.T
            cos = torch.nn.functional.cosine_similarity(i, t).item()
            want.append(50.0 * cos)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ aesthetic


def test_aesthetic_head_on_normalised_clip_embeddings(tmp_path, imgs):
    from safetensors.torch import save_file

    cfg = {**TINY_CLIP, "embed_dim": 768}  # the head reads ViT-L/14's 768-dim embeddings
    model, preprocess, _ = tiny_open_clip("tiny-l14", cfg, seed=3)
    clip_ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_ckpt))
    # the public predictor's key layout and shapes
    g = torch.Generator().manual_seed(4)
    shapes = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    sd = {}
    for i, (o, n) in shapes.items():
        sd[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n**0.5
        sd[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    head = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(sd, head)

    reward = build_reward("aesthetic", head=str(head), clip_model="tiny-l14", clip_pretrained=str(clip_ckpt),
                          device="cpu")
    got = assert_batch_invariant(reward, reward.clip, imgs)
    with torch.no_grad():
        x = model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in imgs]))
        x = x / x.norm(dim=-1, keepdim=True)
        for i in sorted(shapes):  # no activations between the linears
            x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    np.testing.assert_allclose(got, x.squeeze(-1).numpy(), rtol=1e-4, atol=1e-5)
    assert len(set(np.round(got, 6))) > 1

    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="layers.0.weight"):
        build_reward("aesthetic", head=str(bad), clip_model="tiny-l14", clip_pretrained=str(clip_ckpt), device="cpu")


# ------------------------------------------------------------------ colours of crops


def test_color_classifier_is_geneval_zero_shot(imgs):
    from argrpo.rewards.clip import OpenClip
    from argrpo.rewards.colors import GENEVAL_TEMPLATES, ColorClassifier
    from argrpo.rewards.geneval import COLORS

    clip = OpenClip("tiny-clip-test", None, TINY_CLIP, device="cpu")
    clf = ColorClassifier(clip=clip)
    image = imgs[0]
    boxes = [(0, 0, 20, 20), (10.4, 5.6, 40, 30), (30, 30, 30, 30)]  # the last is empty: clipped to one pixel
    got = clf(image, boxes, "cup")
    with torch.no_grad():
        cols = []
        for c in COLORS:
            t = clip.model.encode_text(clip.tokenizer([tpl.format(color=c, cls="cup") for tpl in GENEVAL_TEMPLATES]))
            t = (t / t.norm(dim=-1, keepdim=True)).mean(0)
            cols.append(t / t.norm())
        crops = [image[0:20, 0:20], image[6:30, 10:40], image[30:31, 30:31]]
        f = clip.model.encode_image(torch.stack([clip.preprocess(Image.fromarray(c)) for c in crops]))
        f = f / f.norm(dim=-1, keepdim=True)
        want = [COLORS[k] for k in (f @ torch.stack(cols, 1)).argmax(-1)]
    assert got == want
    assert all(c in COLORS for c in got)


def test_open_clip_config_files_go_with_the_process():
    """Registered configs live in one temp dir that outlives each call and is removed when the process exits."""
    script = ("import os\n"
              "import open_clip\n"
              "import rewards.clip as c\n"
              f"c.register_open_clip_config('argrpo-exit-a', {TINY_CLIP!r})\n"
              f"c.register_open_clip_config('argrpo-exit-b', {TINY_CLIP!r})\n"
              "assert sorted(os.listdir(c._CFG_DIR)) == ['argrpo-exit-a.json', 'argrpo-exit-b.json']\n"
              "assert 'argrpo-exit-a' in open_clip.list_models()\n"
              "print(c._CFG_DIR)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    cfg_dir = out.stdout.strip().splitlines()[-1]
    assert cfg_dir.startswith(tempfile.gettempdir()) and not os.path.exists(cfg_dir)

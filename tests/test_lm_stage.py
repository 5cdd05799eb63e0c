import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from argrpo.config import ConfigError, load_config
from argrpo.data.shapes import ShapesWorld
from argrpo.grpo.lm_stage import (
    CodesCollator,
    CodesDataset,
    PretrainConfig,
    SFTConfig,
    complete_checkpoints,
    run_lm_stage,
    visual_lm_loss,
)
from argrpo.models.image_tokenizers.vq import VQTokenizer
from argrpo.models.layout import layout_preset
from argrpo.models.policy import build_policy, load_policy
from argrpo.models.text_tokenizer import build_text_tokenizer
from argrpo.models.unwrap import unwrap_model
from safetensors.torch import load_file
from transformers import TrainerCallback


@pytest.fixture(scope="module")
def parts(vq_dir):
    tok = build_text_tokenizer(ShapesWorld().vocabulary(), special_tokens=layout_preset(
        "shapes", text_vocab_size=0, codebook_size=8).special_tokens)
    vq = VQTokenizer.from_pretrained(vq_dir)
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=vq.codebook_size)
    return tok, layout


def _batch(tok, layout, captions, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for c in captions:
        ids = tok(layout.format_prompt(c), add_special_tokens=False)["input_ids"]
        items.append({"prompt_ids": ids, "codes": torch.randint(0, layout.codebook_size, (64,), generator=g)})
    return CodesCollator(layout, tok.pad_token_id)(items)


def test_collator_left_pads_and_puts_images_last(parts):
    tok, layout = parts
    b = _batch(tok, layout, ["a photo of a red circle and a blue square", "a photo of a circle", ""])
    T = b["input_ids"].shape[1]
    assert b["image_codes"].shape == (3, 64)
    assert torch.equal(b["input_ids"][:, -64:], b["image_codes"] + layout.visual_offset)
    assert b["attention_mask"][0].all() and not b["attention_mask"][2, 0]
    for row in range(3):
        first = int(b["attention_mask"][row].argmax())
        assert b["position_ids"][row, first] == 0 and b["position_ids"][row, -1] == T - 1 - first
        soi = tok.convert_tokens_to_ids("<|soi|>")
        assert b["input_ids"][row, T - 65] == soi


def test_visual_loss_equals_full_vocabulary_reference(parts):
    tok, layout = parts
    model = build_policy(layout, size="tiny", seed=1)
    b = _batch(tok, layout, ["a photo of two squares", "a photo of a green triangle left of a circle"], seed=1)
    loss, metrics = visual_lm_loss(model, b, layout, text_loss_weight=0.5)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   position_ids=b["position_ids"]).logits  # [B, T, V]: the reference builds what the loss avoids
    ref_img = F.cross_entropy(logits[:, -65:-1, layout.visual_slice].flatten(0, 1), b["image_codes"].flatten())
    L = b["input_ids"].shape[1] - 64
    m = b["attention_mask"][:, :L].bool()
    valid = m[:, :-1] & m[:, 1:]
    ref_txt = F.cross_entropy(logits[:, : L - 1, : layout.text_vocab_size][valid], b["input_ids"][:, 1:L][valid])
    assert metrics["image_loss"] == pytest.approx(ref_img.item(), abs=1e-5)
    assert metrics["text_loss"] == pytest.approx(ref_txt.item(), abs=1e-5)
    assert loss.item() == pytest.approx((ref_img + 0.5 * ref_txt).item(), abs=1e-5)
    # gradients reach the visual rows of the head only through the visual slice
    loss_img, _ = visual_lm_loss(model, b, layout)
    loss_img.backward()
    g = model.get_output_embeddings().weight.grad
    assert g[layout.visual_slice].abs().sum() > 0 and g[: layout.text_vocab_size].abs().sum() == 0


def test_caption_dropout_is_a_function_of_seed_epoch_row(parts):
    import datasets

    tok, layout = parts
    cached = datasets.Dataset.from_dict({"caption": ["a photo of a circle"] * 400,
                                         "codes": np.zeros((400, 64), dtype=np.int32).tolist()})
    a = CodesDataset(cached, tok, layout, caption_dropout=0.25, seed=3)
    b = CodesDataset(cached, tok, layout, caption_dropout=0.25, seed=3)
    drop0 = [a[i]["prompt_ids"] == a.uncond_prompt(a.prompt_ids[i]) for i in range(400)]
    assert 0.15 < np.mean(drop0) < 0.35
    assert drop0 == [b[i]["prompt_ids"] == b.uncond_prompt(b.prompt_ids[i]) for i in range(400)]
    a.set_epoch(1)
    assert drop0 != [a[i]["prompt_ids"] == a.uncond_prompt(a.prompt_ids[i]) for i in range(400)]
    a.set_epoch(0)
    assert drop0 == [a[i]["prompt_ids"] == a.uncond_prompt(a.prompt_ids[i]) for i in range(400)]
    assert a.uncond_prompt(a.prompt_ids[0]) == tok(layout.uncond_prompt, add_special_tokens=False)["input_ids"]


def _overrides(out, vq_dir, cache, steps=6, extra=()):
    return [f"output_dir={out}", f"image_tokenizer={vq_dir}", f"cache_dir={cache}", "policy.size=tiny",
            "data.shapes_n=96", "data.shapes_captions=mixed", f"train.max_steps={steps}", "train.batch_size=16",
            "train.save_steps=2", "train.save_total_limit=null", "train.logging_steps=1", "train.report_to=[]",
            "train.learning_rate=0.003", "train.bf16=false", "train.threads=1", *extra]


def test_pretrain_then_sft(vq_dir, tmp_path):
    pre = load_config(PretrainConfig, None, _overrides(tmp_path / "pre", vq_dir, tmp_path / "cache",
                                                       steps=8, extra=["train.report_to=[tensorboard]"]))
    res = run_lm_stage(pre)
    assert res.global_step == 8
    losses = [h["image_loss"] for h in res.log_history if "image_loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    assert list((tmp_path / "pre").rglob("events.out.tfevents*"))
    # the run dir and every checkpoint are policy checkpoints
    assert [p.name for p in complete_checkpoints(tmp_path / "pre")] == [f"checkpoint-{k}" for k in (2, 4, 6, 8)]
    loaded = load_policy(tmp_path / "pre")
    assert loaded.image_tokenizer_path is not None and (loaded.image_tokenizer_path / "vq.safetensors").is_file()
    assert loaded.layout.codebook_size == VQTokenizer.from_pretrained(vq_dir).codebook_size
    ck = load_policy(tmp_path / "pre" / "checkpoint-8")
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    fresh = build_policy(loaded.layout, size="tiny", seed=0)
    assert not torch.equal(fresh.model.embed_tokens.weight, loaded.model.model.embed_tokens.weight)

    sft = load_config(SFTConfig, None, [f"output_dir={tmp_path / 'sft'}", f"policy.checkpoint={tmp_path / 'pre'}",
                                        f"cache_dir={tmp_path / 'cache'}", "data.shapes_n=64", "data.shapes_seed=1",
                                        "train.max_steps=3", "train.batch_size=16", "train.learning_rate=0.0001", "train.logging_steps=1",
                                        "train.report_to=[]", "train.bf16=true", "train.threads=1"])
    res = run_lm_stage(sft)
    assert res.global_step == 3
    tuned = load_policy(tmp_path / "sft")
    assert tuned.layout == loaded.layout and tuned.image_tokenizer_path is not None
    assert json.loads((tmp_path / "sft" / "argrpo.json").read_text())["extra"]["stage_step"] == 3
    moved = [k for k, v in tuned.model.state_dict().items() if not torch.equal(v, loaded.model.state_dict()[k])]
    assert moved  # SFT started from the pretrained weights and changed them
    first = [h for h in res.log_history if "learning_rate" in h][0]
    assert first["learning_rate"] <= 1e-4


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_setting_reaches_the_loss(vq_dir, tmp_path, monkeypatch, bf16):
    """The visual-slice loss calls the decoder directly (not model.forward, which accelerate wraps in autocast),
    so train.bf16 must take effect inside the loss itself: bf16 matmuls when asked, float32 otherwise."""
    import argrpo.grpo.lm_stage as lm_stage

    seen = []

    def spy(model, batch, layout, text_loss_weight=0.0):
        loss, metrics = visual_lm_loss(model, batch, layout, text_loss_weight)
        w = unwrap_model(model).get_output_embeddings().weight
        seen.append((torch.is_autocast_enabled("cpu"), torch.mm(w[:2], w[:2].T).dtype))
        return loss, metrics

    monkeypatch.setattr(lm_stage, "visual_lm_loss", spy)
    cfg = load_config(PretrainConfig, None, _overrides(tmp_path / "run", vq_dir, tmp_path / "cache", steps=2,
                                                       extra=[f"train.bf16={str(bf16).lower()}"]))
    run_lm_stage(cfg)
    assert len(seen) == 2
    assert all(enabled == bf16 for enabled, _ in seen)
    assert all(mm == (torch.bfloat16 if bf16 else torch.float32) for _, mm in seen)


def test_sft_needs_a_checkpoint_and_new_policy_needs_image_tokenizer():
    with pytest.raises(ConfigError, match="policy.checkpoint"):
        load_config(SFTConfig, None, ["output_dir=x"])
    with pytest.raises(ConfigError, match="image_tokenizer"):
        load_config(PretrainConfig, None, ["output_dir=x"])


class Interrupt(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"interrupted at step {state.global_step}")


class FirstStep(TrainerCallback):
    def __init__(self):
        self.step = None

    def on_train_begin(self, args, state, control, **kw):
        self.step = state.global_step


def test_resume_after_interrupt_matches_uninterrupted_run(vq_dir, tmp_path):
    cache = tmp_path / "cache"
    extra = ["caption_dropout=0.3", "train.bf16=true"]
    straight = run_lm_stage(load_config(PretrainConfig, None,
                                        _overrides(tmp_path / "a", vq_dir, cache, steps=8, extra=extra)))
    assert straight.global_step == 8

    cfg = load_config(PretrainConfig, None, _overrides(tmp_path / "b", vq_dir, cache, steps=8, extra=extra))
    with pytest.raises(KeyboardInterrupt):
        run_lm_stage(cfg, callbacks=[Interrupt(at=5)])  # checkpoint-4 is the last one saved
    assert [p.name for p in complete_checkpoints(tmp_path / "b")][-1] == "checkpoint-4"
    assert not (tmp_path / "b" / "argrpo.json").exists()
    # a checkpoint half-written by a killed save is skipped
    (tmp_path / "b" / "checkpoint-6").mkdir()
    (tmp_path / "b" / "checkpoint-6" / "config.json").write_text("{}")
    first = FirstStep()
    resumed = run_lm_stage(cfg, callbacks=[first])
    assert first.step == 4 and resumed.global_step == 8

    a = load_file(str(Path(tmp_path / "a" / "model.safetensors")))
    b = load_file(str(Path(tmp_path / "b" / "model.safetensors")))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [h["loss"] for h in straight.log_history if "loss" in h]
    lb = [h["loss"] for h in resumed.log_history if "loss" in h]
    assert la[4:] == lb[-4:]

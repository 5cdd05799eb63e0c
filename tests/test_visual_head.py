"""The factored visual head: rows kept in the span of the image tokenizer's code features."""

import pytest
import torch
from argrpo.config import ConfigError, load_config
from argrpo.grpo.lm_stage import PretrainConfig, run_lm_stage
from argrpo.models.image_tokenizers.vq import VQTokenizer
from argrpo.models.layout import layout_preset
from argrpo.models.policy import build_policy, load_policy
from argrpo.models.visual_head import FeatureSpanProjector


def _interaction(weight, layout, vq) -> float:
    """max |W[m,c] - W[m,c'] - W[m',c] + W[m',c']| over mask/colour pairs: 0 exactly when rows are mask + colour."""
    m, c = int(vq.masks.shape[0]), int(vq.colors.shape[0])
    rows = weight[layout.visual_slice][1:].reshape(m, c, -1).double()  # code 1 + m*C + c
    contrast = rows - rows[:, :1] - rows[:1, :] + rows[:1, :1]
    return float(contrast.abs().max())


def test_projection_makes_rows_additive_and_is_idempotent(vq_dir):
    vq = VQTokenizer.from_pretrained(vq_dir)
    layout = layout_preset("shapes", text_vocab_size=40, codebook_size=vq.codebook_size)
    model = build_policy(layout, size="tiny", seed=0)
    head = model.get_output_embeddings().weight
    text_rows = head[: layout.visual_offset].clone()
    assert _interaction(head.detach(), layout, vq) > 1e-3  # a random head couples masks and colours
    project = FeatureSpanProjector(model, layout, vq)
    assert project() > 0.1
    assert _interaction(head.detach(), layout, vq) < 1e-5
    assert project() < 1e-5  # already in the span: nothing left to remove
    assert torch.equal(head[: layout.visual_offset], text_rows)  # text rows untouched


@pytest.mark.parametrize("visual_head", ["free", "factored"])
def test_lm_stage_keeps_a_factored_head_factored(vq_dir, tmp_path, visual_head):
    cfg = load_config(PretrainConfig, None, [
        f"output_dir={tmp_path / 'pre'}", f"image_tokenizer={vq_dir}", f"cache_dir={tmp_path / 'cache'}",
        "policy.size=tiny", "policy.visual_init=random", "data.shapes_n=64", "train.max_steps=4",
        "train.batch_size=16", "train.report_to=[]", "train.learning_rate=0.003", "train.bf16=false",
        "train.threads=1", "train.save_steps=100", "train.logging_steps=1", f"visual_head={visual_head}"])
    res = run_lm_stage(cfg)
    assert res.global_step == 4
    losses = [h["image_loss"] for h in res.log_history if "image_loss" in h]
    assert losses and losses[-1] < losses[0]  # it still learns under the constraint
    loaded = load_policy(tmp_path / "pre")
    head = loaded.model.get_output_embeddings().weight.detach()
    vq = VQTokenizer.from_pretrained(vq_dir)
    if visual_head == "factored":
        assert _interaction(head, loaded.layout, vq) < 1e-4
    else:
        assert _interaction(head, loaded.layout, vq) > 1e-3


def test_visual_head_config_errors(vq_dir):
    with pytest.raises((ConfigError, ValueError), match="visual_head.*unknown 'additive'"):
        load_config(PretrainConfig, None, [f"image_tokenizer={vq_dir}", "visual_head=additive"])
    with pytest.raises((ConfigError, ValueError), match="LoRA"):
        load_config(PretrainConfig, None, [f"image_tokenizer={vq_dir}", "visual_head=factored",
                                           "policy.lora.enabled=true"])

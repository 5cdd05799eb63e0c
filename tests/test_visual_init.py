"""A new policy's visual rows start from the image tokenizer's code features (models.visual_init)."""

from __future__ import annotations

import datasets
import pytest
import torch
from argrpo.config import load_config
from argrpo.data.shapes import ShapesWorld
from argrpo.grpo.lm_stage import PretrainConfig, prepare_policy
from argrpo.models.image_tokenizers.cosmos import DECODER_FILE, CosmosTokenizer, indices_to_codes
from argrpo.models.image_tokenizers.vq import VQTokenizer
from argrpo.models.layout import layout_preset
from argrpo.models.policy import PolicyConfig, build_policy
from argrpo.models.visual_init import VISUAL_INITS, init_visual_rows


@pytest.fixture(scope="module")
def vq():
    _, images, _ = ShapesWorld().sample("train", 300, seed=3)
    return VQTokenizer.fit(images)


def _fresh(vq, seed=0):
    layout = layout_preset("shapes", text_vocab_size=40, codebook_size=vq.codebook_size)
    return build_policy(layout, size="tiny", seed=seed), layout


def _visual_rows(model, layout):
    return (model.get_input_embeddings().weight[layout.visual_slice].detach(),
            model.get_output_embeddings().weight[layout.visual_slice].detach())


def test_vq_code_features_name_each_codes_mask_and_colour(vq):
    feats = vq.code_features()
    m, c = vq.masks.shape[0], vq.colors.shape[0]
    assert feats.shape == (vq.codebook_size, 1 + m + c)
    assert feats[0].tolist() == [1.0] + [0.0] * (m + c)
    for k in (1, 7, vq.codebook_size - 1):
        mask_i = int(feats[k, 1:1 + m].argmax())
        colour_i = int(feats[k, 1 + m:].argmax())
        assert feats[k].sum() == 2
        patch = vq.codebook[k]  # [p, p, 3]: the colour under the mask, background elsewhere
        assert torch.equal(patch[vq.masks[mask_i]], vq.colors[colour_i].expand(int(vq.masks[mask_i].sum()), 3))
        assert (patch[~vq.masks[mask_i]] == vq.background).all()


def test_codebook_init_is_additive_in_mask_and_colour(vq):
    model, layout = _fresh(vq)
    before_text = model.get_input_embeddings().weight[: layout.visual_offset].detach().clone()
    init_visual_rows(model, layout, vq, "codebook", seed=0)
    embed, head = _visual_rows(model, layout)
    assert torch.equal(embed, head)  # untied, but both start from the same rows
    c = vq.colors.shape[0]

    def row(m, colour):
        return embed[1 + m * c + colour]

    # red-minus-blue is the same vector under every mask: a colour's part is shared across shapes
    d0, d5 = row(0, 1) - row(0, 2), row(5, 1) - row(5, 2)
    assert torch.allclose(d0, d5, atol=1e-6) and d0.norm() > 0
    std = model.config.initializer_range
    assert abs(float(embed.std()) - std) < 0.2 * std
    # only the visual rows changed
    assert torch.equal(model.get_input_embeddings().weight[: layout.visual_offset], before_text)
    # deterministic in the seed
    again, _ = _fresh(vq)
    init_visual_rows(again, layout, vq, "codebook", seed=0)
    assert torch.equal(_visual_rows(again, layout)[0], embed)


def test_random_init_keeps_the_architectures_rows_and_bad_names_fail(vq):
    model, layout = _fresh(vq)
    before = [r.clone() for r in _visual_rows(model, layout)]
    init_visual_rows(model, layout, vq, "random", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, _visual_rows(model, layout)))
    assert set(VISUAL_INITS) >= {"random", "codebook"}
    with pytest.raises(ValueError, match="unknown 'nope'"):
        init_visual_rows(model, layout, vq, "nope", seed=0)
    with pytest.raises(ValueError, match="visual_init: unknown 'nope'"):
        PolicyConfig(visual_init="nope")

    class NoFeatures:
        codebook_size = vq.codebook_size

    with pytest.raises(ValueError, match="NoFeatures image tokenizer offers no code_features"):
        init_visual_rows(model, layout, NoFeatures(), "codebook", seed=0)


def test_fsq_code_features_are_the_normalised_codes(tmp_path):
    (tmp_path / DECODER_FILE).write_bytes(b"")  # the modules load lazily; code_features needs neither
    tok = CosmosTokenizer(tmp_path, image_size=(32, 32), levels=(8, 5, 3), spatial_compression=16)
    feats = tok.code_features()
    assert torch.equal(feats, indices_to_codes(torch.arange(120), (8, 5, 3)))
    assert feats.shape == (120, 3) and float(feats.min()) == -1.0 and float(feats.max()) <= 1.0
    # index 1 moves only the first digit: one step of 1 / (8 // 2)
    assert torch.allclose(feats[1] - feats[0], torch.tensor([0.25, 0.0, 0.0]))


@pytest.mark.parametrize("how", ["codebook", "random"])
def test_a_new_lm_stage_policy_uses_policy_visual_init(vq, tmp_path, how):
    vq.save_pretrained(tmp_path / "vq")
    cfg = load_config(PretrainConfig, None, [f"output_dir={tmp_path / 'out'}", f"image_tokenizer={tmp_path / 'vq'}",
                                             "policy.size=tiny", f"policy.visual_init={how}"])
    model, _, family, tok, _ = prepare_policy(cfg, datasets.Dataset.from_dict({"caption": ["a photo"]}))
    embed, _ = _visual_rows(model, family.layout)
    c = tok.colors.shape[0]
    d0, d3 = embed[1 + 1] - embed[1 + 2], embed[1 + 3 * c + 1] - embed[1 + 3 * c + 2]
    assert torch.allclose(d0, d3, atol=1e-6) == (how == "codebook")

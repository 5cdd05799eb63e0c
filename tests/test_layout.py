import pytest
import torch
from argrpo.models.layout import SIMPLEAR_SPECIAL_TOKENS, TokenLayout, layout_preset


def test_simplear_preset():
    lay = layout_preset("simplear", text_vocab_size=151672)
    assert lay.visual_offset == 151672 and lay.codebook_size == 64000
    assert lay.grid == (64, 64) and lay.n_image_tokens == 4096
    assert lay.special_tokens == SIMPLEAR_SPECIAL_TOKENS and len(lay.special_tokens) == 7
    assert lay.format_prompt("a cat") == "<|t2i|>a cat<|soi|>"
    assert lay.uncond_prompt == "<|t2i|><|soi|>"


def test_codes_ids_roundtrip_and_mask():
    lay = layout_preset("shapes", text_vocab_size=40, codebook_size=100)
    codes = torch.randint(0, 100, (3, 8, 8))
    ids = lay.codes_to_ids(codes)
    assert ids.shape == (3, 64) and bool(lay.is_visual(ids).all())
    assert torch.equal(lay.ids_to_codes(ids), codes)
    mask = lay.visual_mask(160)
    assert mask.sum() == 100 and mask[40] and not mask[39] and not mask[140]
    with pytest.raises(ValueError):
        lay.codes_to_ids(torch.tensor([100]))
    with pytest.raises(ValueError):
        lay.ids_to_codes(torch.full((64,), 3))


def test_save_load_and_compat(tmp_path):
    lay = layout_preset("shapes", text_vocab_size=40, codebook_size=100)
    lay.save(tmp_path / "l.json")
    assert TokenLayout.load(tmp_path / "l.json") == lay
    other = layout_preset("shapes", text_vocab_size=40, codebook_size=120)
    with pytest.raises(ValueError, match="codebook_size"):
        lay.check_compatible(other)

"""Offline word-level tokenizer: ids, special tokens, padding, save/load through AutoTokenizer."""

from __future__ import annotations

import pytest
from argrpo.models.layout import SHAPES_SPECIAL_TOKENS, SIMPLEAR_SPECIAL_TOKENS, layout_preset
from argrpo.models.text_tokenizer import build_text_tokenizer, load_text_tokenizer, simplear_test_tokenizer

WORDS = ["a", "photo", "of", "red", "green", "circle", "triangle", "left", ".", "two", "red"]


def test_word_level_ids_and_specials():
    from transformers import PreTrainedTokenizerFast

    tok = build_text_tokenizer(WORDS, SHAPES_SPECIAL_TOKENS)
    assert isinstance(tok, PreTrainedTokenizerFast)
    n_words = len(dict.fromkeys(WORDS))
    assert len(tok) == 1 + n_words + len(SHAPES_SPECIAL_TOKENS)
    assert tok.unk_token_id == 0 and tok.pad_token == "<|pad|>"
    # special tokens end the vocabulary, in the layout's order
    ids = [tok.convert_tokens_to_ids(t) for t in SHAPES_SPECIAL_TOKENS]
    assert ids == list(range(len(tok) - len(SHAPES_SPECIAL_TOKENS), len(tok)))
    lay = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=16)
    enc = tok(lay.format_prompt("Two RED circle left of a green triangle.")).input_ids
    words = ["two", "red", "circle", "left", "of", "a", "green", "triangle", "."]
    assert enc == [ids[1]] + [tok.convert_tokens_to_ids(w) for w in words] + [ids[2]]
    # special tokens match without surrounding spaces; unknown words map to [UNK]; no BOS/EOS is added
    assert tok("<|t2i|>a blob<|soi|>").input_ids == [ids[1], tok.convert_tokens_to_ids("a"), 0, ids[2]]
    assert tok.decode(enc, skip_special_tokens=True) == "two red circle left of a green triangle ."


def test_padding_left_and_default_pad():
    tok = build_text_tokenizer(["a", "red", "circle"], ["<|t2i|>", "<|soi|>"])
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 4  # after the words, before the specials
    batch = tok(["a", "a red circle"], padding=True)
    assert batch.input_ids[0] == [4, 4, 1] and batch.attention_mask[0] == [0, 0, 1]
    for bad in ("two words", "circle."):
        with pytest.raises(ValueError, match="splits into several pieces"):
            build_text_tokenizer([bad])


def test_save_load_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_text_tokenizer(WORDS, SHAPES_SPECIAL_TOKENS)
    tok.save_pretrained(tmp_path / "tok")
    text = "<|t2i|> a photo of two red circle <|soi|> <|pad|>"
    for loaded in (AutoTokenizer.from_pretrained(tmp_path / "tok"), load_text_tokenizer(tmp_path / "tok")):
        assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
        assert loaded(text).input_ids == tok(text).input_ids
        assert loaded.pad_token_id == tok.pad_token_id and loaded.padding_side == "left"
    with pytest.raises(FileNotFoundError):
        load_text_tokenizer(tmp_path / "missing")


def test_simplear_fixture_tokenizer():
    tok = simplear_test_tokenizer()
    for t in SIMPLEAR_SPECIAL_TOKENS:
        assert t in tok.get_vocab()
    assert [tok.convert_tokens_to_ids(t) for t in SIMPLEAR_SPECIAL_TOKENS] == list(range(len(tok) - 7, len(tok)))
    ids = tok("<|t2i|>a photo of a cat<|soi|>").input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|t2i|>") and ids[-1] == tok.convert_tokens_to_ids("<|soi|>")
    assert 0 not in ids

"""The model-family seam: detection from the checkpoint, the registry, and the checkpoint's metadata as the
authority over a preset name in a config."""

from __future__ import annotations

import json

import pytest
from argrpo.models.families import (
    FAMILIES,
    JanusFamily,
    ModelFamily,
    SharedVocabFamily,
    check_engine,
    detect_family,
    family_for_layout,
    register_family,
)
from argrpo.models.layout import layout_preset
from argrpo.models.policy import PolicyConfig, build_policy, load_policy, policy_from_config, save_policy


@pytest.fixture(scope="module")
def simplear_512(tmp_path_factory):
    """A SimpleAR-layout checkpoint converted at a smaller resolution than the preset's default (grid 2x2 here,
    standing for 512 px's 32x32 against the preset's 64x64)."""
    from argrpo.models.text_tokenizer import simplear_test_tokenizer

    tok = simplear_test_tokenizer()
    layout = layout_preset("simplear", text_vocab_size=len(tok), codebook_size=64, grid=(2, 2), image_size=(32, 32))
    path = tmp_path_factory.mktemp("simplear") / "ckpt"
    save_policy(path, build_policy(layout, size="tiny"), tok, layout)
    return path, layout


def test_checkpoint_metadata_is_the_authority_over_a_preset_name(simplear_512):
    path, layout = simplear_512
    assert json.loads((path / "argrpo.json").read_text())["family"] == "simplear"
    loaded = load_policy(path, layout="simplear")  # what the shipped SimpleAR recipe says
    assert loaded.layout == layout and loaded.layout.grid == (2, 2)
    assert isinstance(loaded.family, SharedVocabFamily)
    model, again = policy_from_config(PolicyConfig(checkpoint=str(path), layout="simplear"))
    assert again.layout.grid == (2, 2)
    # a preset name of another family is still refused, and so are explicit preset options that disagree
    with pytest.raises(ValueError, match="'name'"):
        load_policy(path, layout="shapes")
    with pytest.raises(ValueError, match="grid"):
        load_policy(path, layout="simplear", layout_kwargs={"grid": (64, 64), "codebook_size": 64})


def test_detection_and_registry(simplear_512, tmp_path):
    path, layout = simplear_512
    assert detect_family(path) is SharedVocabFamily
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "janus"}))
    assert detect_family(tmp_path) is JanusFamily
    assert detect_family(tmp_path, {"family": "simplear"}) is SharedVocabFamily  # argrpo.json decides
    assert isinstance(family_for_layout(layout), SharedVocabFamily)
    check_engine(family_for_layout(layout), "vllm")  # the shared vocabulary runs on vLLM

    class Other(JanusFamily):
        name = "janus"

    with pytest.raises(ValueError, match="already registered"):
        register_family(Other)

    class Clash(JanusFamily):
        name = "janus-copy"

    with pytest.raises(ValueError, match="model_type 'janus' already belongs"):
        register_family(Clash)
    assert set(FAMILIES) >= {"simplear", "janus"} and all(issubclass(f, ModelFamily) for f in FAMILIES.values())

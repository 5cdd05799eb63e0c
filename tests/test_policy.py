"""Policy build / vocabulary surgery / LoRA / save-load round trips on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from argrpo.models.layout import SHAPES_SPECIAL_TOKENS, layout_preset
from argrpo.models.policy import (
    SIZE_PRESETS,
    VLLM_HEAD_DIMS,
    LoadedPolicy,
    PolicyConfig,
    add_visual_vocab,
    apply_lora,
    build_policy,
    count_parameters,
    load_policy,
    policy_from_config,
    save_policy,
)
from argrpo.models.text_tokenizer import build_text_tokenizer, simplear_test_tokenizer

WORDS = ["a", "photo", "of", "red", "blue", "circle", "square", "and"]


@pytest.fixture(scope="module")
def tok():
    return build_text_tokenizer(WORDS, SHAPES_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def layout(tok):
    return layout_preset("shapes", text_vocab_size=len(tok), codebook_size=100)


def _ids(layout, tok, n=2):
    prompt = tok([layout.format_prompt("a photo of a red circle")] * n, return_tensors="pt").input_ids
    codes = torch.randint(0, layout.codebook_size, (n, 5), generator=torch.Generator().manual_seed(1))
    return torch.cat([prompt, codes + layout.visual_offset], dim=1)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def test_presets_fit_vllm_and_sizes(layout):
    for name, p in SIZE_PRESETS.items():
        assert p.hidden_size == p.num_attention_heads * p.head_dim, name
        assert p.head_dim in VLLM_HEAD_DIMS, name
    m = build_policy(layout, "shapes")
    assert m.config.vocab_size % 64 == 0 and m.config.vocab_size >= layout.min_vocab_size
    n = count_parameters(m)
    assert 2.5e6 < n < 6e6, n
    llama = build_policy(layout, "tiny", arch="llama")
    assert type(llama).__name__ == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="unknown policy size"):
        build_policy(layout, "huge")
    with pytest.raises(ValueError, match="unknown arch"):
        build_policy(layout, "tiny", arch="gpt9")


def test_seeded_build_is_deterministic_and_tie_flag(layout):
    a, b = build_policy(layout, "tiny", seed=3), build_policy(layout, "tiny", seed=3)
    c = build_policy(layout, "tiny", seed=4)
    pa, pb, pc = (dict(m.named_parameters())["model.embed_tokens.weight"] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    tied = build_policy(layout, "tiny", tie_word_embeddings=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("llama", True)])
def test_save_load_identical_logits(tmp_path, tok, layout, arch, tie):
    from transformers import AutoModelForCausalLM

    model = build_policy(layout, "tiny", arch=arch, tie_word_embeddings=tie, seed=1)
    ids = _ids(layout, tok)
    ref = _logits(model, ids)
    out = save_policy(tmp_path / "ckpt", model, tok, layout)
    loaded = load_policy(out, layout="shapes")
    assert isinstance(loaded, LoadedPolicy) and loaded.layout == layout and loaded.image_tokenizer_path is None
    assert loaded.path == out and len(loaded.tokenizer) == layout.text_vocab_size
    assert torch.equal(_logits(loaded.model, ids), ref)
    # the tokenizer comes back exactly (a word-level tokenizer inside a Qwen2 directory)
    text = layout.format_prompt("a photo of a blue square")
    assert loaded.tokenizer(text).input_ids == tok(text).input_ids
    # plain Hugging Face loading still works
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(plain, ids), ref)
    meta = json.loads((out / "argrpo.json").read_text())
    assert meta["layout"]["codebook_size"] == 100 and meta["base_model"] is None


def test_layout_mismatch_names_path_and_key(tmp_path, tok, layout):
    model = build_policy(layout, "tiny")
    out = save_policy(tmp_path / "ckpt", model, tok, layout)
    other = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=120)
    with pytest.raises(ValueError, match="codebook_size") as e:
        load_policy(out, layout=other)
    assert str(out) in str(e.value)
    with pytest.raises(ValueError, match="grid"):
        load_policy(out, layout=layout_preset("shapes", text_vocab_size=len(tok), codebook_size=100, grid=(4, 4)))
    with pytest.raises(ValueError, match="name"):
        load_policy(out, layout="other")
    with pytest.raises(ValueError, match="tokenizer"):
        save_policy(tmp_path / "bad", model, simplear_test_tokenizer(), layout)


def test_add_visual_vocab_mean_init(tok, layout):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    n_text = layout.text_vocab_size
    for tie in (False, True):
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=n_text, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
        lm = Qwen2ForCausalLM(cfg).eval()
        old_emb = lm.model.embed_tokens.weight.detach().clone()
        old_head = lm.lm_head.weight.detach().clone()
        ids = torch.tensor([[1, 2, 3]])
        before = _logits(lm, ids)
        add_visual_vocab(lm, layout)
        emb, head = lm.model.embed_tokens.weight, lm.lm_head.weight
        assert emb.shape[0] == lm.config.vocab_size and emb.shape[0] % 64 == 0
        assert emb.shape[0] >= layout.visual_end and head.shape[0] == emb.shape[0]
        assert torch.equal(emb[:n_text], old_emb)
        assert torch.allclose(emb[n_text:], old_emb.mean(0).expand(emb.shape[0] - n_text, -1))
        assert torch.allclose(head[n_text:], old_head.mean(0).expand(emb.shape[0] - n_text, -1))
        assert (head.data_ptr() == emb.data_ptr()) == tie
        # the text part of the model is unchanged
        assert torch.allclose(_logits(lm, ids)[..., :n_text], before, atol=1e-6)
        with pytest.raises(ValueError, match="already covers"):
            add_visual_vocab(lm, layout)


def test_lora_saves_only_adapters_and_reloads(tmp_path, tok, layout):
    base_dir = save_policy(tmp_path / "base", build_policy(layout, "tiny", seed=2), tok, layout)
    base = load_policy(base_dir).model
    ids = _ids(layout, tok)
    base_logits = _logits(base, ids)
    peft_model = apply_lora(base, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero; move it so the adapter changes the output
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    ref = _logits(peft_model, ids)
    assert not torch.allclose(ref, base_logits)

    out = save_policy(tmp_path / "lora", peft_model, tok, layout)
    files = sorted(p.name for p in out.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "model.safetensors" not in files and "config.json" not in files
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert json.loads((out / "argrpo.json").read_text())["base_model"] == str(base_dir)

    from peft import PeftModel

    loaded = load_policy(out)
    assert isinstance(loaded.model, PeftModel)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert torch.equal(_logits(loaded.model, ids), ref)
    with loaded.model.disable_adapter():
        assert torch.equal(_logits(loaded.model, ids), base_logits)
    resumed = load_policy(out, trainable=True).model
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)


def test_lora_refuses_lm_head_and_unsaved_base(tmp_path, tok, layout):
    model = build_policy(layout, "tiny")
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, target_modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="not found"):
        apply_lora(model, target_modules=("nonexistent_proj",))
    with pytest.raises(ValueError, match="base"):
        save_policy(tmp_path / "lora", apply_lora(model, r=2), tok, layout)
    assert not (tmp_path / "lora").exists()


def test_image_tokenizer_reference(tmp_path, tok, layout):
    model = build_policy(layout, "tiny")
    itok = tmp_path / "itok"
    itok.mkdir()
    (itok / "image_tokenizer.json").write_text('{"kind": "x"}')
    copied = load_policy(save_policy(tmp_path / "a", model, tok, layout, image_tokenizer=itok))
    assert copied.image_tokenizer_path == tmp_path / "a" / "image_tokenizer"
    assert (copied.image_tokenizer_path / "image_tokenizer.json").read_text() == '{"kind": "x"}'
    ref = load_policy(save_policy(tmp_path / "b", model, tok, layout, image_tokenizer=itok,
                                  copy_image_tokenizer=False))
    assert ref.image_tokenizer_path == itok.absolute() and not (tmp_path / "b" / "image_tokenizer").exists()

    class Saver:
        def save_pretrained(self, path):
            path.mkdir()
            (path / "weights.bin").write_bytes(b"123")

    saved = load_policy(save_policy(tmp_path / "c", model, tok, layout, image_tokenizer=Saver()))
    assert (saved.image_tokenizer_path / "weights.bin").read_bytes() == b"123"
    with pytest.raises(FileNotFoundError):
        save_policy(tmp_path / "d", model, tok, layout, image_tokenizer=tmp_path / "missing")
    assert not (tmp_path / "d").exists()


def _simplear_dir(tmp_path, extra_rows=64, codebook=64000):
    """A directory laid out like a released SimpleAR checkpoint, tiny: Qwen2 + tokenizer, no argrpo.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = simplear_test_tokenizer()
    vocab = len(tok) + codebook + extra_rows
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    d = tmp_path / f"simplear_{codebook}"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok, model


def test_simplear_layout_directory(tmp_path):
    d, tok, model = _simplear_dir(tmp_path)
    with pytest.raises(ValueError, match="layout='simplear'"):
        load_policy(d)
    loaded = load_policy(d, layout="simplear")
    lay = loaded.layout
    assert lay.name == "simplear" and lay.visual_offset == len(tok) == lay.text_vocab_size
    assert lay.codebook_size == 64000 and lay.n_image_tokens == 4096
    ids = loaded.tokenizer(lay.format_prompt("a photo of a cat"), return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|t2i|>")
    assert ids[0, -1].item() == tok.convert_tokens_to_ids("<|soi|>")
    logits = _logits(loaded.model, ids)
    visual = logits[..., lay.visual_slice]
    assert visual.shape[-1] == 64000
    # the slice sits at the offset: column j of the slice is the logit of LM id visual_offset + j
    assert torch.equal(visual, _logits(model, ids)[..., len(tok): len(tok) + 64000])
    # and it round-trips through save_policy (now with argrpo.json)
    out = save_policy(tmp_path / "resaved", loaded.model, loaded.tokenizer, lay)
    again = load_policy(out, layout="simplear")
    assert again.layout == lay and torch.equal(_logits(again.model, ids), logits)


def test_simplear_512_options(tmp_path):
    d, tok, _ = _simplear_dir(tmp_path)
    lay = load_policy(d, layout="simplear", layout_kwargs={"grid": (32, 32), "image_size": (512, 512)}).layout
    assert lay.n_image_tokens == 1024 and lay.visual_offset == len(tok)
    out = save_policy(tmp_path / "s512", load_policy(d, layout=lay).model, tok, lay)
    # the checkpoint's argrpo.json is the authority over the preset name (the preset's default is 1024 px, 64x64)
    assert load_policy(out, layout="simplear").layout == lay
    with pytest.raises(ValueError, match="grid"):  # explicit preset options that disagree are still refused
        load_policy(out, layout="simplear", layout_kwargs={"grid": (64, 64), "image_size": (1024, 1024)})


def test_simplear_too_small_vocab_is_clear(tmp_path):
    d, _, _ = _simplear_dir(tmp_path, extra_rows=0, codebook=1000)
    with pytest.raises(ValueError, match="does not cover the SimpleAR visual ids"):
        load_policy(d, layout="simplear")
    tok = build_text_tokenizer(["a"], ["<|t2i|>"])
    tok.save_pretrained(d)
    with pytest.raises(ValueError, match="special tokens"):
        load_policy(d, layout="simplear")


def test_policy_config_and_factory(tmp_path, tok, layout):
    from argrpo.config import ConfigError, describe, load_config

    cfg = load_config(PolicyConfig, None, ["size=tiny", "lora.enabled=true", "lora.r=4"])
    assert cfg.lora.r == 4 and isinstance(cfg.lora.target_modules, tuple)
    assert "lora.target_modules" in describe(PolicyConfig)
    with pytest.raises(ConfigError, match="lm_head"):
        load_config(PolicyConfig, None, ["lora.target_modules=[q_proj, lm_head]"])
    with pytest.raises(ConfigError, match="size"):
        load_config(PolicyConfig, None, ["size=huge"])
    model, loaded = policy_from_config(cfg, layout)
    assert loaded is None and hasattr(model, "peft_config")
    base_dir = save_policy(tmp_path / "base", build_policy(layout, "tiny"), tok, layout)
    full = PolicyConfig(checkpoint=str(base_dir), layout="shapes")
    model, loaded = policy_from_config(full)
    assert loaded.layout == layout and not hasattr(model, "peft_config")
    # a LoRA checkpoint: resumed as adapters with LoRA on, merged into full weights with LoRA off
    lora = apply_lora(load_policy(base_dir).model, r=2)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    ids = _ids(layout, tok)
    ref = _logits(lora, ids)
    lora_dir = save_policy(tmp_path / "lora", lora, tok, layout)
    resumed, _ = policy_from_config(PolicyConfig(checkpoint=str(lora_dir), lora=cfg.lora))
    assert hasattr(resumed, "peft_config") and any(p.requires_grad for p in resumed.parameters())
    merged, _ = policy_from_config(PolicyConfig(checkpoint=str(lora_dir)))
    assert not hasattr(merged, "peft_config") and all(p.requires_grad for p in merged.parameters())
    assert torch.allclose(_logits(merged, ids), ref, atol=1e-5)

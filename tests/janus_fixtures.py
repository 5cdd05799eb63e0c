"""A tiny random-weight Janus-Pro checkpoint in the real transformers classes (nothing downloaded).

``JanusConfig`` with a 2-layer Llama, a 4x4 image grid (16 codes of a 512-code VQ-VAE, 64 px images) and a
word-level tokenizer that holds Janus's special tokens (BOS, pad, ``<begin_of_image>``, the conversation roles).
``save_tiny_janus(dir)`` writes it the way deepseek-community/Janus-Pro-1B ships: config.json (model_type janus),
safetensors, tokenizer files; no argrpo.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

BOS, PAD, BOI = "<｜begin▁of▁sentence｜>", "<｜▁pad▁｜>", "<begin_of_image>"
SPECIALS = [BOS, PAD, BOI, "<end_of_image>", "<image_placeholder>", "<|User|>", "<|Assistant|>"]
WORDS = [":", "a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "left", "right", "and",
         "two", "three", "yellow", "the", "on", "above", "below"]


def tiny_janus_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[UNK]", *SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token=BOS, pad_token=PAD)
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    return fast


def tiny_janus_config(n_layers: int = 2, hidden: int = 64, grid: int = 4, codebook: int = 512, vocab: int = 64):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=2,
                       bos_token_id=1, eos_token_id=None)
    vision = JanusVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=grid * 16, patch_size=16, num_image_tokens=grid * grid, projection_dim=hidden)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=codebook, base_channels=32, channel_multiplier=[1, 1, 2, 2, 4],
                          num_res_blocks=1, latent_channels=16, projection_dim=hidden, image_token_embed_dim=hidden,
                          num_patches=grid)
    return JanusConfig(text_config=text.to_dict(), vision_config=vision, vq_config=vq, image_token_id=5)


def tiny_janus(seed: int = 0, **kwargs):
    """(JanusForConditionalGeneration in eval mode, tokenizer); generation_config carries the ids transformers'
    image generation reads."""
    from transformers import JanusForConditionalGeneration

    tok = tiny_janus_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(tiny_janus_config(**kwargs)).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id = tok.bos_token_id, tok.pad_token_id
    gc.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids(BOI)}
    return model, tok


def save_tiny_janus(path: str | Path, seed: int = 0, **kwargs) -> Path:
    path = Path(path)
    model, tok = tiny_janus(seed, **kwargs)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path

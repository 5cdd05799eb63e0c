"""A tiny random-weight Emu3 checkpoint in the real transformers classes (nothing downloaded).

``Emu3Config`` with a 2-layer text model and a 2x-downsampling ``Emu3VQVAE`` of 64 codes; a word-level tokenizer
that holds Emu3's special tokens under their released names (BOS ``<|extra_203|>``, EOS ``<|extra_204|>``, pad
``<|endoftext|>``, ``<|image start|>``, ``<|image token|>``, ``<|image end|>``, EOF ``<|extra_201|>``, end of row
``<|extra_200|>``), digits and ``*`` for the size tokens, and the 64 ``<|visual token NNNNNN|>`` tokens after the
text, as the released vocabulary has them. ``save_tiny_emu3(dir)`` writes it the way BAAI/Emu3-Gen-hf ships:
config.json (model_type emu3, vocabulary_map), safetensors, tokenizer files; no argrpo.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

BOS, EOS, PAD = "<|extra_203|>", "<|extra_204|>", "<|endoftext|>"
BOI, WRAPPER, EOI, EOF, EOL, IMAGE = "<|image start|>", "<|image token|>", "<|image end|>", "<|extra_201|>", \
    "<|extra_200|>", "<image>"
SPECIALS = [PAD, BOS, EOS, BOI, WRAPPER, EOI, EOF, EOL, IMAGE]
WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "left", "right", "and", "two",
         "three", "yellow", "the", "on", "above", "below", "lowres", "blurry", "*", *[str(d) for d in range(10)]]
CODES = 64


def visual_token(k: int) -> str:
    return f"<|visual token {k:06d}|>"


def tiny_emu3_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["[UNK]", *SPECIALS, *WORDS, *[visual_token(k) for k in range(CODES)]]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI,
                              "image_wrapper_token": WRAPPER, "eof_token": EOF},
    )
    fast.add_special_tokens({"additional_special_tokens": [BOI, WRAPPER, EOI, EOF, EOL, IMAGE]})
    fast.add_tokens([visual_token(k) for k in range(CODES)], special_tokens=True)
    fast.padding_side = "left"
    return fast


def tiny_emu3_config(tok, n_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    from transformers import Emu3Config, Emu3TextConfig, Emu3VQVAEConfig

    text = Emu3TextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, attention_dropout=0.0)
    vq = Emu3VQVAEConfig(codebook_size=CODES, embed_dim=4, latent_channels=4, base_channels=32,
                         channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[], hidden_size=64,
                         temporal_downsample_factor=4)
    return Emu3Config(text_config=text, vq_config=vq, vocabulary_map=tok.get_vocab())


def tiny_emu3(seed: int = 0, **kwargs):
    """(Emu3ForConditionalGeneration in eval mode, tokenizer)."""
    from transformers import Emu3ForConditionalGeneration

    tok = tiny_emu3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Emu3ForConditionalGeneration(tiny_emu3_config(tok, **kwargs)).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model, tok


def save_tiny_emu3(path: str | Path, seed: int = 0, **kwargs) -> Path:
    path = Path(path)
    model, tok = tiny_emu3(seed, **kwargs)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path

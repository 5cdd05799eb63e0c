"""Offline text tokenizers built with the ``tokenizers`` library (nothing is downloaded).

The shapes world needs only a closed vocabulary of words, so a word-level tokenizer is exact and tiny:

    ids: [UNK] | words ... | pad (when not among the special tokens) | special tokens (in the layout's order)

Special tokens come last, like the tokens SimpleAR appends to Qwen's vocabulary, so ``len(tokenizer)`` is the
first free id (the layout's ``visual_offset``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from argrpo.errors import MissingFileError

UNK_TOKEN = "[UNK]"
PAD_TOKEN = "[PAD]"
GENERIC_TOKENIZER_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")


def _pick_pad(special_tokens: Sequence[str], pad_token: str | None) -> str:
    if pad_token is not None:
        return pad_token
    for tok in special_tokens:
        if "pad" in tok.lower():
            return tok
    return PAD_TOKEN


def build_text_tokenizer(
    words: Iterable[str],
    special_tokens: Sequence[str] = (),
    pad_token: str | None = None,
    unk_token: str = UNK_TOKEN,
    model_max_length: int = 512,
):
    """A lower-casing, whitespace-splitting word-level ``PreTrainedTokenizerFast``.

    Args:
        words: the vocabulary; lower-cased and de-duplicated, order kept. Punctuation marks are words of their own
            (the pre-tokenizer splits ``"circle."`` into ``"circle"``, ``"."``).
        special_tokens: e.g. ``layout.special_tokens``; matched verbatim before lower-casing and splitting, so
            ``"<|t2i|>a red circle<|soi|>"`` tokenizes with or without spaces around them.
        pad_token: defaults to the first special token whose name contains "pad", else ``[PAD]`` (added before the
            special tokens).
        unk_token: id 0; any word outside the vocabulary maps to it.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(dict.fromkeys(special_tokens))
    pad = _pick_pad(special_tokens, pad_token)
    splitter = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {unk_token: 0}
    for w in words:
        w = str(w).strip().lower()
        if not w:
            continue
        if len(splitter.pre_tokenize_str(w)) != 1:
            # such a word could never be produced by the pre-tokenizer, so it would be dead weight
            raise ValueError(f"build_text_tokenizer: word {w!r} splits into several pieces (whitespace, or letters "
                             f"mixed with punctuation); pass single words and punctuation marks separately")
        if w in special_tokens or w == pad:
            raise ValueError(f"build_text_tokenizer: word {w!r} is also a special token")
        vocab.setdefault(w, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk_token,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        # prompts are left-padded so every row's next token follows its last prompt token (batched sampling)
        padding_side="left",
    )
    # Added tokens are matched verbatim before normalisation and splitting. They follow the words in order
    # (a pad token outside ``special_tokens`` first), so the layout's tokens end the vocabulary.
    if pad not in special_tokens:
        fast.add_special_tokens({"pad_token": pad})
    fast.add_special_tokens({"additional_special_tokens": special_tokens})
    fast.pad_token = pad
    return fast


def save_text_tokenizer(tokenizer, path: str | Path) -> None:
    tokenizer.save_pretrained(str(path))


def load_text_tokenizer(path: str | Path):
    """Load a text tokenizer from a local directory exactly as it was saved; never touches the network.

    A tokenizer saved by this module is loaded as the generic fast tokenizer, even inside a Qwen2 checkpoint:
    there ``AutoTokenizer`` (transformers 5) always rebuilds a byte-level BPE ``Qwen2Tokenizer`` from the saved
    vocabulary, which tokenizes a word-level vocabulary wrongly. Model-specific tokenizers (a released Qwen/SimpleAR
    checkpoint) go through ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"text tokenizer directory not found: {path}")
    cfg_file = path / "tokenizer_config.json"
    cls = None
    if cfg_file.is_file():
        try:
            cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON: {e}") from e
    if cls in GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def simplear_test_tokenizer(words: Iterable[str] = ("a", "photo", "of", "cat", "dog", "red", "blue")):
    """A tiny stand-in for SimpleAR's tokenizer: a few words, a pad token, and SimpleAR's 7 special tokens last."""
    from argrpo.models.layout import SIMPLEAR_SPECIAL_TOKENS

    return build_text_tokenizer(words, special_tokens=SIMPLEAR_SPECIAL_TOKENS, pad_token="<|endoftext|>")

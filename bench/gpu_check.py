"""A prepared GPU check: argrpo's rollout engine and GRPO learner at SimpleAR-0.5B size, one command, < 8 minutes.

    make gpu-wheels     # where pip can download: trl, datasets, dill, multiprocess wheels (py3.12) -> .gpu-wheels/
    make gpu-check      # on the GPU machine, plain python3 (no venv, no install): -> gpu-check/gpu_check.{json,md}
    python3 bench/gpu_check.py --tiny --device cpu --out /tmp/gc    # the same code on tiny shapes, seconds

Built for a bare, short-lived GPU machine (PyTorch 2.11 + CUDA 13, transformers 5.17, peft, accelerate, safetensors;
no trl, ray, datasets, open_clip or vllm; no network). Nothing is installed: argrpo is imported from this source tree
(setup.cfg's ``package_dir`` mapping rebuilt as links in a temp dir when argrpo is not installed) and the carried
wheels are unpacked into a temp dir placed after the machine's own packages. Nothing on this path imports Ray, vLLM
or open_clip. A missing package is named; without TRL the learner section is skipped and says why, and the rollout
section still runs.

Model: a random-weight Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4,864, tied embeddings) over SimpleAR's vocabulary (151,672 text ids + 64,000 codes), 4,096 tokens per image.

Rollout: argrpo's torch engine against the SimpleAR-style Hugging Face ``generate`` + CFG baseline of
bench/rollout.py (:func:`bench.rollout.hf_generate`), CFG 1 and 3, batch 1 and the largest batch up to 64 that fits
(searched from large to small: the KV cache of both branches reserved, then short calls of both engines; an OOM tries
the next size). Timed in bf16 with ``torch.cuda.synchronize`` around each call. Each (engine, CFG, batch) first runs
a short probe call (also its warm-up) that sizes the timed call to the time left for it: the full 4,096 tokens when
they fit, else a prefix whose seconds are scaled to 4,096 tokens (linear in tokens; marked "est." in the table; the
attention over a growing context makes the real figure somewhat larger). Greedy outputs of both engines are compared
in float32 with TF32 off on the first ``eq_tokens`` tokens of two prompts (32 at full size: a 4,096-token greedy run
of the baseline costs minutes; bf16 rounding differs between a 64,000-row and a 215,680-row head GEMM and flips near
ties of random weights, so the bf16 prefix agreement is reported beside it, not required). Decode FLOP/s of the torch
engine (:func:`bench.rollout.engine_flops` over the timed call) are reported as a fraction of a square bf16
``torch.matmul`` peak measured in the same run (before and after the timings; the best).

Janus-Pro (section ``janus``, last): argrpo's torch engine through the Janus family against transformers' own
``JanusForConditionalGeneration.generate(generation_mode="image")``, greedy, CFG 5, 576 tokens, batch 1 and 16, on
bench/janus_rollout.py's random model at Janus-Pro-1B's shape (all 24 decoder layers here); greedy ids compared in
float32 on 2 prompts; every timed call samples the whole image (transformers' Janus generate has no shorter form).

Learner: one GRPO step of ``grpo.trainer.ARGRPOTrainer`` (TRL's GRPOTrainer with argrpo's visual-slice head and the
importance correction), in-process and without Ray: the rollout function replays fixed random visual completions
(G = 4 per prompt, 4,096 tokens each; sampling is what the rollout section measures), a random reward, SimpleAR's
GRPO recipe settings (recipes/configs/simplear/0.5b_grpo_clip.yaml: loss grpo, beta 0.04, lr 1e-6, G 4, bf16) on
float32 master weights (bf16 autocast; in bf16 weights a 1e-6 Adam update is below the rounding step). Full and LoRA
(r 16 on every projection), with and without gradient checkpointing; two optimizer steps, the second reported (the
first allocates AdamW's state and warms the kernels). Split: rollout (the replay), reward, score (the rest of TRL's
generation-batch work: old and reference log-probs, advantages), forward+backward, optimizer; peak GPU memory
(``torch.cuda.max_memory_allocated``; peak RSS on CPU) over both steps; whether the step moved the trainable weights.

Time guard: the run has ``--budget-s`` seconds (420 by default); 75 s are kept for the Janus section, the rollout
section gets 65% of the rest of what is left when it starts and shares it between its calls (the torch engine's
calls weighted 3:1 over the baseline's), the learner section the remainder; a learner variant or Janus call that
would not fit is skipped and says so. Results are written after every measurement, and at full size a watchdog ends
the process 45 s past the budget (printing where it hung), so a stuck call still leaves what was measured.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import faulthandler
import gc
import importlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "gpu_check"


@dataclasses.dataclass(frozen=True)
class Case:
    """Shapes of one check. ``grid`` gives the tokens per image (h * w)."""

    size: str  # models.policy size preset
    text_vocab: int
    codebook: int
    grid: tuple[int, int]
    prompt_len: tuple[int, int]  # min, max prompt tokens
    cfg_scales: tuple[float, ...]
    max_batch: int  # largest rollout batch tried
    G: int  # samples per prompt (rollout batches above G are P prompts x G; the learner's group size)
    eq_tokens: int  # greedy-equality prefix
    probe_tokens: int  # tokens of the probe call that sizes each timed call
    peak_n: int  # square matmul size of the peak measurement


CASES = {
    # SimpleAR-0.5B: Qwen2.5-0.5B's shape, Qwen2.5's 151,665 ids + 7 special tokens, then 64,000 Cosmos codes
    "simplear-0.5b": Case("0.5b", 151_672, 64_000, (64, 64), (12, 40), (1.0, 3.0), 64, 4, 32, 64, 8192),
    "tiny": Case("tiny", 512, 256, (4, 8), (4, 12), (1.0, 3.0), 8, 4, 32, 8, 256),
}
LATE_STEP_FACTOR = {"torch": 1.2, "hf": 1.5}  # sizing margin of a timed call over its probe's per-token time
ROLLOUT_SHARE = 0.65  # of the budget left when the rollout section starts (the learner gets the rest)
LEARNER_VARIANTS = (("full", True), ("lora", True), ("full", False), ("lora", False))  # (tuning, grad. checkpointing)


# ---- running from a source tree on a bare machine -------------------------------------------------------------
def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _link_source_tree(dest: Path) -> Path:
    """``dest/argrpo`` laid out as setup.cfg's ``package_dir`` installs it, made of links into this tree."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    mapping = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        pkg, _, folder = (x.strip() for x in line.partition("="))
        mapping[pkg] = folder
    pkg_root = dest / "argrpo"
    pkg_root.mkdir(parents=True)
    for item in (ROOT / mapping["argrpo"]).iterdir():
        if item.name != "__pycache__":
            (pkg_root / item.name).symlink_to(item)
    for pkg, folder in mapping.items():
        parts = pkg.split(".")
        if len(parts) != 2 or parts[0] != "argrpo":
            continue  # the top package itself; deeper packages follow their parent folder
        target = pkg_root / parts[1]
        if target.is_symlink() or target.exists():
            raise RuntimeError(f"setup.cfg package_dir: {pkg} collides with {target}")
        target.symlink_to(ROOT / folder, target_is_directory=True)
    return dest


def bootstrap(wheels: Path | None, from_source: bool = False, need_trl: bool = True) -> dict:
    """Make ``bench`` and ``argrpo`` importable and unpack carried wheels if TRL is missing; returns what was done."""
    done: dict = {"argrpo": "installed", "wheels": None}
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # for `bench`; appended so an installed argrpo is found before the source folder
    usable = False
    if not from_source:
        try:
            importlib.import_module("argrpo.grpo")
            usable = True
        except ImportError:
            pass
    if not usable:
        for key in [k for k in sys.modules if k == "argrpo" or k.startswith("argrpo.")]:
            del sys.modules[key]
        tmp = Path(tempfile.mkdtemp(prefix="argrpo-src-"))
        _register_cleanup(tmp)
        sys.path.insert(0, str(_link_source_tree(tmp)))
        importlib.invalidate_caches()
        importlib.import_module("argrpo.grpo")
        done["argrpo"] = f"source tree {ROOT} (linked under {tmp})"
    if need_trl and _module_missing("trl") and wheels is not None and wheels.is_dir():
        files = sorted(wheels.glob("*.whl"))
        if files:
            tmp = Path(tempfile.mkdtemp(prefix="argrpo-wheels-"))
            _register_cleanup(tmp)
            # named like an installation: dill (datasets' hashing) pickles classes of modules outside one by value
            site = tmp / "site-packages"
            for w in files:
                with zipfile.ZipFile(w) as z:
                    z.extractall(site)
            sys.path.append(str(site))  # after the machine's own packages: those win where both exist
            importlib.invalidate_caches()
            done["wheels"] = [w.name for w in files]
    return done


def _register_cleanup(path: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, path, ignore_errors=True)  # unlinks the links, never follows them


def learner_blocker() -> str | None:
    """Why the learner section cannot run here (a named missing package), or None."""
    missing = [m for m in ("trl", "datasets", "peft", "accelerate") if _module_missing(m)]
    if missing:
        return (f"learner skipped: {', '.join(missing)} not importable (carry them as wheels: `make gpu-wheels` where "
                f"pip can download, then run with --wheels .gpu-wheels)")
    try:
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401 - the import is the check
    except Exception as e:  # noqa: BLE001 - whatever breaks TRL's import, the learner cannot run
        return f"learner skipped: trl's GRPOTrainer does not import ({type(e).__name__}: {str(e)[:300]})"
    return None


# ---- timing helpers -------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_peak(device, dtype, n: int, iters: int = 10, repeats: int = 3) -> float:
    """FLOP/s of a square ``[n, n] @ [n, n]`` ``torch.matmul`` in ``dtype``, best of ``repeats``."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t, _ = _timed(lambda: [torch.matmul(a, b) for _ in range(iters)], device)
        best = min(best, t)
    return 2.0 * n**3 * iters / best


def short_layout(layout, n_tokens: int):
    """The same vocabulary with ``n_tokens`` tokens per image (a 64-wide grid where it divides)."""
    grid = (n_tokens // 64, 64) if n_tokens % 64 == 0 else (1, n_tokens)
    return dataclasses.replace(layout, grid=grid, image_size=(grid[0] * 16, grid[1] * 16))


# ---- rollout ----------------------------------------------------------------------------------------------------
class Rollouts:
    """The model, prompts and both samplers of the rollout section."""

    def __init__(self, case: Case, device):
        import torch
        from argrpo.rollout.engines.torch_engine import TorchEngine
        from argrpo.rollout.types import SamplingParams

        from bench.rollout import BenchConfig, build, hf_generate

        self.case, self.device = case, device
        n_prompts = max(2, case.max_batch // case.G)
        bcfg = BenchConfig(case.size, case.grid, n_prompts, case.G, case.text_vocab, case.codebook, case.prompt_len)
        self.layout, model, self.prompts, self.uncond = build(bcfg)
        self.model = model.to(device).eval()
        self.N = self.layout.n_image_tokens
        self.params = sum(p.numel() for p in self.model.parameters())
        self._engine_cls, self._sp, self._hf = TorchEngine, SamplingParams, hf_generate
        self.dtype = torch.float32

    def run(self, engine: str, n_tokens: int, prompts, g: int, cfg: float, greedy: bool = False):
        """Sample ``len(prompts) * g`` images of ``n_tokens`` tokens -> LM ids [rows, n_tokens] on the CPU."""
        lay = self.layout if n_tokens == self.N else short_layout(self.layout, n_tokens)
        if engine == "torch":
            eng = self._engine_cls(self.model, lay, device=self.device, uncond_prompt_ids=self.uncond)
            sp = self._sp(temperature=0.0 if greedy else 1.0, cfg_scale=cfg, n=g, seed=0)
            return eng.generate(prompts, sp).completion_ids
        return self._hf(self.model, lay, prompts, g, self.uncond, cfg, greedy=greedy).cpu()

    def split(self, batch: int) -> tuple[list, int]:
        """A batch as P prompts x g samples (g = G once the batch holds a whole group)."""
        P = max(1, batch // self.case.G)
        return self.prompts[:P], batch // P

    def to_dtype(self, dtype) -> None:
        self.model.to(dtype)
        self.dtype = dtype

    def kv_bytes(self, batch: int) -> int:
        """Bytes of the KV cache of ``batch`` rows over the longest prompt plus a whole image, both CFG branches."""
        import torch

        c = self.model.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        L = self.case.prompt_len[1] + self.N
        elt = torch.finfo(self.dtype).bits // 8
        return 2 * batch * L * c.num_hidden_layers * 2 * c.num_key_value_heads * hd * elt  # both CFG branches


def greedy_equality(r: Rollouts, n_tokens: int) -> dict:
    """Greedy ids of both engines on 2 prompts x ``n_tokens``, each CFG scale: {cfg: {equal, first_mismatch}}."""
    out = {}
    for s in r.case.cfg_scales:
        a = r.run("torch", n_tokens, r.prompts[:2], 1, s, greedy=True)
        b = r.run("hf", n_tokens, r.prompts[:2], 1, s, greedy=True)
        same = (a == b).all(0)
        first = int((~same).nonzero()[0]) if not bool(same.all()) else None
        out[f"cfg{s:g}"] = {"equal": bool(same.all()), "first_mismatch": first, "tokens": n_tokens, "rows": 2}
    return out


def largest_batch(r: Rollouts, cap: int) -> tuple[int, list[str]]:
    """The largest batch <= ``cap`` (halving from ``cap``) whose KV cache fits beside short calls of both engines."""
    import torch

    log = []
    b = cap
    while b >= 1:
        reserve = None
        try:
            if r.device.type == "cuda":
                reserve = torch.empty(int(r.kv_bytes(b) * 1.25), dtype=torch.uint8, device=r.device)
            prompts, g = r.split(b)
            s = max(r.case.cfg_scales)
            for engine in ("torch", "hf"):
                r.run(engine, r.case.probe_tokens, prompts, g, s)
            log.append(f"batch {b}: fits")
            return b, log
        except Exception as e:  # noqa: BLE001 - only an OOM means "try smaller"
            if not _is_oom(e):
                raise
            log.append(f"batch {b}: out of memory")
        finally:
            del reserve
            _free(r.device)
        b //= 2
    raise RuntimeError("not even batch 1 fits: " + "; ".join(log))


def rollout_section(case: Case, device, deadline: float, save) -> dict:
    """Equality, batch search and the timed calls; ``save(partial)`` is called after each measurement."""
    import torch

    res: dict = {"runs": [], "checks": {}, "notes": []}
    t0 = time.perf_counter()
    r = Rollouts(case, device)
    res["config"] = {"params": r.params, "vocab_size": r.model.config.vocab_size, "n_image_tokens": r.N,
                     "text_vocab": case.text_vocab, "codebook": case.codebook, "G": case.G,
                     "build_s": time.perf_counter() - t0}
    print(f"[rollout] model {r.params / 1e6:.4g}M params, vocab {r.model.config.vocab_size}, {r.N} tokens/image, "
          f"built in {res['config']['build_s']:.1f}s", flush=True)

    # float32, TF32 off, one attention kernel for both (the math one): the two engines' greedy ids must agree exactly
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    eq_n = min(case.eq_tokens, r.N)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            res["checks"]["greedy_float32"] = greedy_equality(r, eq_n)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    res["checks"]["greedy_equal"] = all(v["equal"] for v in res["checks"]["greedy_float32"].values())
    print(f"  greedy ids equal (float32, {eq_n} tokens x 2 prompts): {res['checks']['greedy_float32']}", flush=True)
    if device.type == "cuda":
        r.to_dtype(torch.bfloat16)
        res["checks"]["greedy_bf16"] = greedy_equality(r, eq_n)
    res["config"]["dtype"] = str(r.dtype).replace("torch.", "")
    save(res)

    # a CPU does the full-size square in tens of seconds: 1,024 is as square and as fast per FLOP there
    peak_n = case.peak_n if device.type == "cuda" else min(case.peak_n, 1024)
    res["config"]["peak_n"] = peak_n
    peaks = [matmul_peak(device, r.dtype, peak_n)]
    res["config"]["max_batch"], res["batch_search"] = largest_batch(r, case.max_batch)
    batches = sorted({1, res["config"]["max_batch"]})
    plan = [(s, b, e) for b in batches for s in case.cfg_scales for e in ("torch", "hf")]
    weight = {"torch": 3.0, "hf": 1.0}
    for i, (s, b, engine) in enumerate(plan):
        left = deadline - time.monotonic()
        share = left * weight[engine] / sum(weight[e] for _, _, e in plan[i:])
        row = {"engine": "torch" if engine == "torch" else "hf_generate", "cfg": s, "batch": b}
        try:
            row.update(_measure(r, engine, s, b, share))
        except Exception as e:  # noqa: BLE001 - an OOM or a broken baseline is a result too; the section goes on
            if not _is_oom(e) and engine == "torch":
                raise
            row["note"] = f"{type(e).__name__}: {str(e)[:160]}"
            _free(device)
        if engine == "torch" and "seconds" in row:
            lay = short_layout(r.layout, row["tokens_timed"]) if row["tokens_timed"] != r.N else r.layout
            prompts, g = r.split(b)
            from bench.rollout import engine_flops

            row["flops"] = engine_flops(r.model, lay, prompts, g, s != 1.0)
            row["flops_per_s"] = row["flops"] / row["seconds"]
        res["runs"].append(row)
        print(f"  {row['engine']:11s} cfg {s:g} batch {b:3d}: " + (
            f"{row['tokens_timed']} tokens in {row['seconds']:.2f}s -> {row['s_per_image']:.4g} s/image"
            f"{' (est.)' if row['extrapolated'] else ''}, {row['images_per_s']:.4g} images/s"
            if "seconds" in row else row.get("note", "")), flush=True)
        save(res)
    peaks.append(matmul_peak(device, r.dtype, peak_n))
    res["matmul_peak_flops_per_s"] = max(peaks)
    for row in res["runs"]:
        base = next((x for x in res["runs"] if x["engine"] == "hf_generate" and x["cfg"] == row["cfg"]
                     and x["batch"] == row["batch"] and "images_per_s" in x), None)
        if "images_per_s" in row and base:
            row["x_hf"] = row["images_per_s"] / base["images_per_s"]
        if "flops_per_s" in row:
            row["fraction_of_peak"] = row["flops_per_s"] / res["matmul_peak_flops_per_s"]
    res["seconds"] = time.perf_counter() - t0
    del r
    _free(device)
    return res


def _measure(r: Rollouts, engine: str, cfg: float, batch: int, budget_s: float) -> dict:
    """Probe, then one timed call sized to ``budget_s``; seconds scaled to the full image when a prefix was timed.

    With no time left for a second call, the probe itself is the timed call (``probe_only``: it includes the
    first-call effects a warm-up would have absorbed).
    """
    prompts, g = r.split(batch)
    probe = min(r.case.probe_tokens, r.N)
    t_probe, ids = _timed(lambda: r.run(engine, probe, prompts, g, cfg), r.device)
    # a step late in a long image costs more than one in the probe: attention reads a longer context, and the
    # baseline's cache also grows by concatenation (a copy of the whole cache per step)
    per_token = LATE_STEP_FACTOR[engine] * t_probe / probe
    left = budget_s - t_probe
    probe_only = left < per_token * probe
    if probe_only:
        n, seconds = probe, t_probe
    else:
        n = r.N if per_token * r.N <= left else min(r.N, int(left / per_token) // probe * probe)
        seconds, ids = _timed(lambda: r.run(engine, n, prompts, g, cfg), r.device)
    lay = r.layout
    if tuple(ids.shape) != (batch, n) or not bool(((ids >= lay.visual_offset) & (ids < lay.visual_end)).all()):
        raise RuntimeError(f"{engine} returned {tuple(ids.shape)} ids or non-visual ids (expected ({batch}, {n}))")
    full = seconds * r.N / n
    return {"tokens_timed": n, "seconds": seconds, "probe_s": t_probe, "extrapolated": n < r.N,
            "probe_only": probe_only, "s_per_image": full / batch, "images_per_s": batch / full}


# ---- Janus-Pro ---------------------------------------------------------------------------------------------------
# bench/janus_rollout.py's random JanusForConditionalGeneration: Janus-Pro-1B's language model and generation head
# (24 layers at full size), a one-layer understanding tower (image generation never runs it)
JANUS = {
    "simplear-0.5b": dict(shape="1b", layers=24, grid=24, cfg=5.0, batches=(1, 16), text_len=14),
    "tiny": dict(shape=dict(hidden=64, heads=4, kv_heads=4, mlp=128, vocab=102_400), layers=2, grid=4, cfg=5.0,
                 batches=(1, 4), text_len=6),
}
JANUS_RESERVE_S = 75.0  # seconds kept for the Janus section at full size (it runs last)


def janus_section(case_name: str, device, deadline: float, save) -> dict:
    """argrpo's torch engine (Janus family) against transformers' own Janus image generation, greedy, CFG 5.

    Janus's generate always samples the whole image (576 tokens), so nothing is scaled: a call that the time left
    does not cover is skipped and says so. Greedy ids are compared in float32 (math attention, TF32 off) on 2
    prompts; the timed calls run in bf16 on a GPU.
    """
    import torch
    from argrpo.models.families.janus import PROMPT_TEMPLATE, JanusFamily
    from argrpo.models.layout import TokenLayout
    from argrpo.rollout.engines.torch_engine import TorchEngine
    from argrpo.rollout.types import SamplingParams
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.janus_rollout import SHAPES, build

    spec = JANUS[case_name]
    shape = SHAPES[spec["shape"]] if isinstance(spec["shape"], str) else spec["shape"]
    res: dict = {"runs": [], "checks": {}}
    t0 = time.perf_counter()
    model = None
    if device.type == "cuda":
        try:
            with torch.device(device):  # random init of 1.6B parameters takes seconds there, a minute on the CPU
                model = build(shape, spec["layers"], spec["grid"])
        except Exception as e:  # noqa: BLE001 - building on the CPU below is slower, not wrong
            res["build_note"] = f"built on the CPU: building on {device} failed ({type(e).__name__}: {str(e)[:160]})"
            model = None
            _free(device)
    if model is None:
        model = build(shape, spec["layers"], spec["grid"])
    model = model.to(device).eval()
    gen_cfg = model.generation_config
    bos, pad, boi = gen_cfg.bos_token_id, gen_cfg.pad_token_id, gen_cfg.generation_kwargs["boi_token_id"]
    vocab, grid, cfg = shape["vocab"], spec["grid"], spec["cfg"]
    layout = TokenLayout(name="janus", text_vocab_size=vocab, visual_offset=vocab, codebook_size=16_384,
                         grid=(grid, grid), image_size=(grid * 16, grid * 16), prompt_template=PROMPT_TEMPLATE)
    N = layout.n_image_tokens
    g = torch.Generator().manual_seed(0)
    n_prompts = max(2, max(spec["batches"]) // 4)
    # equal lengths, so one unconditional prompt (every token but BOS and BOI -> pad, as transformers builds it)
    # serves every row of both samplers
    prompts = [[bos] + torch.randint(1000, 90_000, (spec["text_len"],), generator=g).tolist() + [boi]
               for _ in range(n_prompts)]
    uncond = [bos] + [pad] * spec["text_len"] + [boi]
    res["config"] = {"shape": spec["shape"] if isinstance(spec["shape"], str) else "tiny", **shape,
                     "layers": spec["layers"], "image_tokens": N, "cfg": cfg,
                     "params": sum(p.numel() for n, p in model.named_parameters()
                                   if "vqmodel" not in n and "vision_model" not in n),
                     "build_s": time.perf_counter() - t0}
    print(f"[janus] {res['config']['params'] / 1e6:.4g}M generation-path params, {N} tokens, CFG {cfg:g}, built in "
          f"{res['config']['build_s']:.1f}s", flush=True)

    def run(engine, batch):
        P = max(1, batch // 4)
        rows = [p for p in prompts[:P] for _ in range(batch // P)]
        if engine == "torch":
            eng = TorchEngine(model, layout, device=device, uncond_prompt_ids=uncond, family=JanusFamily(layout))
            out = eng.generate(prompts[:P], SamplingParams(n=batch // P, temperature=0.0, cfg_scale=cfg))
            return out.completion_ids - layout.visual_offset
        ids = torch.tensor(rows, device=device)
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                  do_sample=False, guidance_scale=cfg).cpu()

    def compare(batch):
        a = run("torch", batch)
        try:
            b = run("hf", batch)
        except Exception as e:  # noqa: BLE001 - a broken baseline leaves the engine's figures standing
            return {"equal": None, "error": f"transformers' Janus generate failed: {type(e).__name__}: {str(e)[:200]}"}
        same = (a == b).all(0)
        return {"equal": bool(same.all()), "first_mismatch": None if bool(same.all()) else int((~same).nonzero()[0]),
                "tokens": N, "rows": batch}

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            t1 = time.perf_counter()
            res["checks"]["greedy_float32"] = compare(2)
            res["checks"]["float32_check_s"] = time.perf_counter() - t1
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    res["checks"]["greedy_equal"] = res["checks"]["greedy_float32"]["equal"]
    print(f"  greedy ids equal (float32, 2 prompts x {N} tokens): {res['checks']['greedy_float32']}", flush=True)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    res["config"]["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    save(res)

    last = {}
    for batch in spec["batches"]:
        for engine in ("torch", "hf"):
            row = {"engine": "torch" if engine == "torch" else "transformers_janus", "cfg": cfg, "batch": batch}
            guess = last.get(engine, res["checks"]["float32_check_s"] / 2) * max(1.0, batch / 4)
            if engine == "hf" and res["checks"]["greedy_float32"].get("error"):
                row["note"] = res["checks"]["greedy_float32"]["error"]
            elif deadline - time.monotonic() < guess:
                row["note"] = f"skipped: {deadline - time.monotonic():.0f}s of the time budget left"
            else:
                try:
                    if batch == spec["batches"][0]:
                        _timed(lambda e=engine, b=batch: run(e, b), device)  # warm-up at this dtype
                    seconds, ids = _timed(lambda e=engine, b=batch: run(e, b), device)
                    if tuple(ids.shape) != (batch, N):
                        raise RuntimeError(f"{engine} returned {tuple(ids.shape)} codes, expected ({batch}, {N})")
                    last[engine] = seconds
                    row.update(tokens_timed=N, seconds=seconds, s_per_image=seconds / batch,
                               images_per_s=batch / seconds)
                except Exception as e:  # noqa: BLE001 - an OOM is a result; the section goes on
                    if not _is_oom(e):
                        raise
                    row["note"] = f"out of memory: {str(e)[:160]}"
                    _free(device)
            res["runs"].append(row)
            print(f"  {row['engine']:18s} cfg {cfg:g} batch {batch:3d}: " + (
                f"{row['seconds']:.2f}s -> {row['s_per_image']:.4g} s/image, {row['images_per_s']:.4g} images/s"
                if "seconds" in row else row["note"]), flush=True)
            save(res)
    for row in res["runs"]:
        base = next((x for x in res["runs"] if x["engine"] == "transformers_janus" and x["batch"] == row["batch"]
                     and "images_per_s" in x), None)
        if "images_per_s" in row and base:
            row["x_hf"] = row["images_per_s"] / base["images_per_s"]
    res["seconds"] = time.perf_counter() - t0
    return res


# ---- learner ----------------------------------------------------------------------------------------------------
def learner_policy(case: Case, work: Path):
    """(layout, random-weight policy on the CPU) of the learner section, saved to ``work / "policy"``.

    TRL builds the full-tuning reference (beta > 0) from the policy's checkpoint path, as a real run has one.
    """
    from argrpo.models.layout import TokenLayout
    from argrpo.models.policy import build_policy

    layout = TokenLayout(name="custom", text_vocab_size=case.text_vocab, visual_offset=case.text_vocab,
                         codebook_size=case.codebook, grid=case.grid, image_size=(case.grid[0] * 16, case.grid[1] * 16))
    model = build_policy(layout, size=case.size, seed=0)
    model.save_pretrained(work / "policy")
    model.config._name_or_path = str(work / "policy")
    return layout, model


def learner_variant(case: Case, layout, base, tuning: str, checkpointing: bool, device, work: Path,
                    beta: float) -> dict:
    """Two GRPO steps of ARGRPOTrainer on a copy of ``base`` fed replayed completions; the second step's split, the
    peak memory."""
    import copy

    import torch
    from argrpo.grpo.config import CorrectionConfig
    from argrpo.grpo.trainer import ARGRPOTrainer
    from argrpo.models.policy import apply_lora
    from argrpo.models.text_tokenizer import build_text_tokenizer
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig

    from bench.memory import peak_rss_mib, reset_peak_rss

    t_start = time.perf_counter()
    model = copy.deepcopy(base)  # training moves the weights (and LoRA's unload rewires modules): a fresh copy each
    peft_config = None
    if tuning == "lora":
        wrapped = apply_lora(model)  # models.policy's defaults: r 16, alpha 32, every projection
        peft_config = wrapped.peft_config["default"]
        model = wrapped.unload()
    tok = build_text_tokenizer(["a", "photo", "of"], special_tokens=("<|pad|>",))
    N, G = layout.n_image_tokens, case.G
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, case.text_vocab, (case.prompt_len[1],), generator=g).tolist()
    completions = (torch.randint(0, case.codebook, (G, N), generator=g) + layout.visual_offset).tolist()
    sampler_logp = -math.log(case.codebook)  # a uniform sampler; feeds the importance correction
    times: dict[str, list[float]] = {"rollout": [], "reward": [], "generate_and_score": []}

    def rollout_func(prompts, trainer):
        t0 = time.perf_counter()
        out = {"prompt_ids": [list(prompt) for _ in prompts],
               "completion_ids": [list(completions[i % G]) for i in range(len(prompts))],
               "logprobs": [[sampler_logp] * N for _ in prompts]}
        times["rollout"].append(time.perf_counter() - t0)
        return out

    rng = torch.Generator().manual_seed(1)

    def random_reward(prompts, completions, **kwargs):
        t0 = time.perf_counter()
        out = torch.rand(len(prompts), generator=rng).tolist()
        times["reward"].append(time.perf_counter() - t0)
        return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.steps, self.cur = [], {}

        def _now(self):
            _sync(device)
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.cur = {"begin": self._now()}

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.cur["opt_begin"] = self._now()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.cur["opt_end"] = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.cur["end"] = self._now()
            self.steps.append(self.cur)

    cuda = device.type == "cuda"
    args = GRPOConfig(
        output_dir=str(work / f"run-{tuning}-{int(checkpointing)}"), per_device_train_batch_size=G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=N, max_steps=2,
        learning_rate=1e-6, loss_type="grpo", beta=beta, epsilon=0.2, max_grad_norm=1.0, temperature=1.0,
        gradient_checkpointing=checkpointing, bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, remove_unused_columns=False, shuffle_dataset=False,
        dataloader_num_workers=0, log_completions=False, seed=0,
    )
    dataset = Dataset.from_dict({"prompt": ["a photo of"] * 3})
    clock = Clock()
    trainer = ARGRPOTrainer(model=model, reward_funcs=[random_reward], args=args, train_dataset=dataset,
                            processing_class=tok, peft_config=peft_config, rollout_func=rollout_func,
                            callbacks=[clock], layout=layout,
                            correction=CorrectionConfig(mode="always", level="token_truncate", cap=2.0))
    inner = trainer._generate_and_score_completions

    def generate_and_score(inputs):
        t0 = clock._now()
        out = inner(inputs)
        times["generate_and_score"].append(clock._now() - t0)
        return out

    trainer._generate_and_score_completions = generate_and_score
    trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts; the figures are printed below
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().flatten()[:: max(1, p.numel() // 512)].float().cpu().clone() for n, p in trainable.items()}
    _free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
    build_s = time.perf_counter() - t_start
    trainer.train()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else peak_rss_mib() / 1024
    changed = sum(not torch.equal(before[n], p.detach().flatten()[:: max(1, p.numel() // 512)].float().cpu())
                  for n, p in trainable.items())
    last = clock.steps[-1]
    gen = times["generate_and_score"][-1]
    opt = last.get("opt_end", last["end"]) - last.get("opt_begin", last["end"])
    step = last["end"] - last["begin"]
    out = {
        "tuning": tuning, "gradient_checkpointing": checkpointing, "trainable_params": sum(p.numel() for p in
                                                                                         trainable.values()),
        "steps": len(clock.steps), "step_s": step, "rollout_s": times["rollout"][-1], "reward_s": times["reward"][-1],
        "score_s": gen - times["rollout"][-1] - times["reward"][-1], "forward_backward_s": step - gen - opt,
        "optimizer_s": opt, "first_step_s": clock.steps[0]["end"] - clock.steps[0]["begin"],
        "peak_memory_gib": peak, "peak_memory_kind": "GPU allocated" if cuda else "process RSS",
        "memory_before_steps_gib": mem_before / 2**30 if cuda else None,
        "weights_changed": changed, "weight_tensors": len(trainable),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "build_s": build_s,
        "completions_per_step": G, "tokens_per_completion": N,
    }
    del trainer, model, trainable
    _free(device)
    return out


def learner_section(case: Case, device, deadline: float, save, beta: float) -> dict:
    res: dict = {"variants": [], "notes": []}
    blocked = learner_blocker()
    if blocked:
        res["skipped"] = blocked
        print(f"[learner] {blocked}", flush=True)
        save(res)
        return res
    print(f"[learner] GRPO steps of G={case.G} x {case.grid[0] * case.grid[1]} tokens", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-learner-"))
    last = None
    try:
        t0 = time.perf_counter()
        layout, base = learner_policy(case, work)
        res["build_s"] = time.perf_counter() - t0
        for tuning, ckpt in LEARNER_VARIANTS:
            left = deadline - time.monotonic()
            label = f"{tuning}, checkpointing {'on' if ckpt else 'off'}"
            if left < 20 or (last is not None and left < 1.3 * last):
                res["variants"].append({"tuning": tuning, "gradient_checkpointing": ckpt,
                                        "note": f"skipped: {left:.0f}s of the time budget left"
                                                + (f", the last variant took {last:.0f}s" if last else "")})
                print(f"  {label}: skipped (time budget)", flush=True)
                continue
            t0 = time.monotonic()
            try:
                v = learner_variant(case, layout, base, tuning, ckpt, device, work, beta)
            except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is raised
                if not _is_oom(e):
                    raise
                _free(device)
                v = {"tuning": tuning, "gradient_checkpointing": ckpt, "note": f"out of memory: {str(e)[:160]}"}
            _free(device)  # the trainer of the variant just run (reference cycles through TRL's callbacks)
            last = time.monotonic() - t0
            v["wall_s"] = last
            res["variants"].append(v)
            if "step_s" in v:
                print(f"  {label}: step {v['step_s']:.2f}s (score {v['score_s']:.2f}, fwd+bwd "
                      f"{v['forward_backward_s']:.2f}, optimizer {v['optimizer_s']:.2f}), peak "
                      f"{v['peak_memory_gib']:.2f} GiB, {v['weights_changed']}/{v['weight_tensors']} weight tensors "
                      f"moved", flush=True)
            else:
                print(f"  {label}: {v['note']}", flush=True)
            save(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


# ---- results ----------------------------------------------------------------------------------------------------
def _fmt_row(row: dict, cols: list[tuple[str, str, str]]) -> dict:
    out = {}
    for title, key, fmt in cols:
        v = row.get(key)
        out[title] = (fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
    return out


def write(out_dir: Path, results: dict) -> tuple[Path, Path]:
    """``gpu_check.json`` (everything) and ``gpu_check.md`` (the two tables and notes) in ``out_dir``."""
    from bench.common import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{NAME}.json", out_dir / f"{NAME}.md"
    env = results.get("environment", {})
    lines = [f"# {NAME} ({results['case']})", ""]
    ro = results.get("rollout")
    if ro:
        rows = []
        for r in ro.get("runs", []):
            row = _fmt_row(r, [("engine", "engine", "{}"), ("CFG", "cfg", "{:g}"), ("batch", "batch", "{}"),
                               ("tokens timed", "tokens_timed", "{}"), ("s/call", "seconds", "{:.3g}"),
                               ("s/image", "s_per_image", "{:.4g}"), ("images/s", "images_per_s", "{:.4g}"),
                               ("x hf_generate", "x_hf", "{:.3g}"), ("TFLOP/s", "flops_per_s", "{:.3g}"),
                               ("of matmul peak", "fraction_of_peak", "{:.2%}"), ("note", "note", "{}")])
            if r.get("extrapolated"):
                row["s/image"] = f"{row['s/image']} (est.)"
            if r.get("probe_only"):
                row["note"] = "budget spent: the probe call was timed"
            if r.get("flops_per_s") is not None:
                row["TFLOP/s"] = f"{r['flops_per_s'] / 1e12:.3g}"
            rows.append(row)
        c = ro.get("config", {})
        lines += ["## Rollout", "", markdown_table(rows) if rows else "(no timed calls)", ""]
        checks = ro.get("checks", {})
        lines += [f"- model: Qwen2 {c.get('params', 0) / 1e6:.4g}M params, vocab {c.get('vocab_size')} "
                  f"(text {c.get('text_vocab')} + {c.get('codebook')} codes), {c.get('n_image_tokens')} tokens/image, "
                  f"{c.get('dtype')}; batches above {c.get('G')} are prompts x {c.get('G')} samples; largest batch "
                  f"tried {results['config'].get('max_batch')}, found {c.get('max_batch')}",
                  f"- greedy ids equal, torch engine vs hf_generate (float32, TF32 off, math attention): "
                  f"{checks.get('greedy_equal')} "
                  f"{json.dumps(checks.get('greedy_float32'))}"]
        if "greedy_bf16" in checks:
            lines.append(f"- bf16 greedy agreement (informational): {json.dumps(checks['greedy_bf16'])}")
        if ro.get("matmul_peak_flops_per_s"):
            lines.append(f"- matmul peak: {ro['matmul_peak_flops_per_s'] / 1e12:.4g} TFLOP/s "
                         f"({c.get('dtype')} [{c.get('peak_n')}]^2 torch.matmul, best of before/after)")
        lines += ["- s/image (est.): a prefix was timed and scaled linearly to the full image (time budget)",
                  "- hf_generate: SimpleAR-style HF generate, CFG as a second pass with its own KV cache, "
                  "full-vocabulary logits restricted to visual ids per row (bench/rollout.py)", ""]
    ja = results.get("janus")
    if ja:
        c = ja.get("config", {})
        lines += ["## Janus-Pro", ""]
        rows = [_fmt_row(r, [("engine", "engine", "{}"), ("CFG", "cfg", "{:g}"), ("batch", "batch", "{}"),
                             ("s/call", "seconds", "{:.3g}"), ("s/image", "s_per_image", "{:.4g}"),
                             ("images/s", "images_per_s", "{:.4g}"), ("x transformers", "x_hf", "{:.3g}"),
                             ("note", "note", "{}")]) for r in ja.get("runs", [])]
        if rows:
            lines += [markdown_table(rows), ""]
        if ja.get("error"):
            lines.append(f"- failed: {ja['error']}")
        if c:
            shape = "Janus-Pro-1B's shape: " if c.get("shape") == "1b" else ""
            lines += [f"- model: random JanusForConditionalGeneration ({shape}language model hidden {c.get('hidden')}, "
                      f"{c.get('layers')} layers, vocabulary {c.get('vocab')}; generation head onto 16,384 codes), "
                      f"{c.get('params', 0) / 1e6:.4g}M generation-path params, {c.get('image_tokens')} "
                      f"tokens/image, {c.get('dtype')}, greedy; batches above 4 are prompts x 4 samples",
                      f"- transformers_janus: model.generate(generation_mode='image', guidance_scale={c.get('cfg'):g}); "
                      f"the whole image is timed (no scaling)",
                      f"- greedy ids equal, torch engine vs transformers (float32, TF32 off, math attention): "
                      f"{ja.get('checks', {}).get('greedy_equal')} {json.dumps(ja.get('checks', {}).get('greedy_float32'))}"]
        lines.append("")
    le = results.get("learner")
    if le:
        lines += ["## Learner", ""]
        if le.get("skipped"):
            lines += [f"- {le['skipped']}", ""]
        rows = []
        for v in le.get("variants", []):
            rows.append(_fmt_row({**v, "variant": f"{v['tuning']}, GC {'on' if v['gradient_checkpointing'] else 'off'}",
                                  "trainable_m": v.get("trainable_params", 0) / 1e6 if "trainable_params" in v else None,
                                  "moved": f"{v['weights_changed']}/{v['weight_tensors']}" if "weights_changed" in v
                                  else None},
                                 [("variant", "variant", "{}"), ("trainable (M)", "trainable_m", "{:.4g}"),
                                  ("step s", "step_s", "{:.3g}"), ("rollout s", "rollout_s", "{:.2g}"),
                                  ("reward s", "reward_s", "{:.2g}"), ("score s", "score_s", "{:.3g}"),
                                  ("fwd+bwd s", "forward_backward_s", "{:.3g}"), ("optimizer s", "optimizer_s",
                                                                                  "{:.3g}"),
                                  ("first step s", "first_step_s", "{:.3g}"),
                                  ("before steps GiB", "memory_before_steps_gib", "{:.3g}"),
                                  ("peak GiB", "peak_memory_gib", "{:.3g}"),
                                  ("weights moved", "moved", "{}"), ("note", "note", "{}")]))
        if rows:
            lines += [markdown_table(rows), ""]
            kind = next((v["peak_memory_kind"] for v in le["variants"] if "peak_memory_kind" in v), "")
            lines += [f"- one GRPO step of ARGRPOTrainer: 1 prompt x G={results['config']['G']} completions, "
                      f"{results['config']['n_image_tokens']} tokens each, replayed (rollout = the replay), loss grpo, "
                      f"beta {results['config']['beta']}, lr 1e-6, importance correction on; float32 master weights"
                      + (", bf16 autocast" if results["config"]["device"] == "cuda" else ""),
                      "- the second of two steps; score = TRL's generation-batch work besides rollout and reward "
                      "(old and reference log-probs, advantages); fwd+bwd includes gradient clipping; optimizer = the "
                      "AdamW step; before steps = GPU memory with the policy (and the full-tuning reference) in place; "
                      "peak = " + kind + " over both steps", ""]
    lines += [f"- {n}" for n in results.get("notes", [])]
    v = env.get("versions", {})
    lines += [f"- device: {env.get('gpu') or env.get('cpu')}; versions: "
              + ", ".join(f"{k} {val}" for k, val in v.items() if val),
              f"- date: {env.get('date')}, commit {env.get('git_commit')}, wall {results.get('wall_s', 0):.0f}s", ""]
    js.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md.write_text("\n".join(lines))
    return js, md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 64, 2 layers, 32 tokens): seconds")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--sections", default="rollout,learner,janus", help="comma list of rollout, learner, janus")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall seconds for the whole run (default 420)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="largest rollout batch tried (default 64; 8 with --tiny)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient of the learner step (recipe: 0.04)")
    ap.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"),
                    help="folder of carried wheels, unpacked when trl is not importable (default .gpu-wheels)")
    ap.add_argument("--from-source", action="store_true",
                    help="import argrpo from this source tree even where it is installed")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"rollout", "learner", "janus"}
    if unknown:
        ap.error(f"--sections: unknown {sorted(unknown)}; known: rollout, learner, janus")

    for mod in ("torch", "transformers", "numpy"):
        if _module_missing(mod):
            print(f"gpu_check: {mod} is not importable by {sys.executable}; it must be installed on this machine",
                  file=sys.stderr)
            return 2
    boot = bootstrap(Path(args.wheels), from_source=args.from_source, need_trl="learner" in sections)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device}, but torch {torch.__version__} sees no CUDA device (use --tiny "
              f"--device cpu for the CPU mode)", file=sys.stderr)
        return 2
    from bench.common import environment

    case_name = "tiny" if args.tiny else "simplear-0.5b"
    case = CASES[case_name]
    if args.max_batch is not None:
        if args.max_batch < 1:
            ap.error("--max-batch must be >= 1")
        case = dataclasses.replace(case, max_batch=args.max_batch)
    deadline = t0 + args.budget_s
    out_dir = Path(args.out)
    results = {"case": case_name, "config": {**dataclasses.asdict(case), "device": device.type, "beta": args.beta,
                                             "budget_s": args.budget_s, "sections": sections,
                                             "n_image_tokens": case.grid[0] * case.grid[1]},
               "bootstrap": boot, "notes": [], "environment": environment()}
    results["environment"]["versions"]["datasets"] = _version("datasets")
    if device.type == "cuda":
        results["environment"]["cuda"] = torch.version.cuda

    def save(section: str):
        def _save(part: dict):
            results[section] = part
            results["wall_s"] = time.monotonic() - t0
            write(out_dir, results)
        return _save

    # the last guard at full size: a hung call must not run the command past its limit (what was measured is already
    # written); tiny runs take seconds, and may run inside a test process
    if not args.tiny:
        faulthandler.dump_traceback_later(args.budget_s + 45.0, exit=True)
    try:
        _run_sections(args, case, device, sections, deadline, results, save)
        results["wall_s"] = time.monotonic() - t0
    finally:
        faulthandler.cancel_dump_traceback_later()
    js, md = write(out_dir, results)
    print(md.read_text())
    print(f"wrote {js} and {md} in {results['wall_s']:.0f}s")
    return 0


def _run_sections(args, case, device, sections, deadline, results, save) -> None:
    boot = results["bootstrap"]
    print(f"gpu_check: {results['case']} on {device} ({results['environment'].get('gpu') or 'cpu'}), budget "
          f"{args.budget_s:.0f}s, argrpo from {boot['argrpo']}, wheels {boot['wheels']}", flush=True)
    janus = "janus" in sections
    reserve = JANUS_RESERVE_S if janus and results["case"] != "tiny" else 0.0
    if "rollout" in sections:
        left = deadline - reserve - time.monotonic()
        share = ROLLOUT_SHARE if "learner" in sections else 0.95
        rollout_section(case, device, time.monotonic() + share * left, save("rollout"))
    if "learner" in sections:
        learner_section(case, device, deadline - 5.0 - reserve, save("learner"), args.beta)
    if janus:
        try:
            janus_section(results["case"], device, deadline - 5.0, save("janus"))
            _free(device)
        except Exception as e:  # noqa: BLE001 - the optional section must not cost the others their results
            save("janus")({**results.get("janus", {}), "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"[janus] failed: {type(e).__name__}: {e}", flush=True)


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script: bench/ itself must not shadow top-level modules (rollout, memory, ...)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    raise SystemExit(main())

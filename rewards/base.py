"""The reward contract, its registry, and the weighted composite.

A reward is any callable ``f(prompts, images, **metadata) -> list[float | None]`` (or a :class:`RewardOutput`,
which is that list plus named per-sample sub-scores). ``None`` means "not applicable to this sample" (TRL turns it
into NaN and leaves it out). Every reward built here is also a valid entry of TRL's ``GRPOTrainer(reward_funcs=...)``:
TRL calls ``f(prompts=..., completions=..., completion_ids=..., <dataset columns>, <rollout extras>, trainer_state=...,
log_extra=..., log_metric=...)``; the images arrive as the rollout's ``images`` key and the GenEval rows as the
``metadata`` column.

Bad outputs are never averaged in silently: the wrong number of scores, NaN/inf, a non-number, or an exception all
raise :class:`RewardError` naming the reward and the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from argrpo.registry import Registry

# Keys TRL passes to reward functions that are not sample metadata.
TRL_CONTROL_KEYS = ("completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


class RewardError(RuntimeError):
    """A reward raised or returned something unusable; the message names the reward and the batch."""


class RewardOutput(list):
    """Per-sample scores ``[B]`` (float or None) plus ``extras``: named per-sample sub-scores ``{name: [B]}``.

    It is a ``list`` subclass so TRL (which iterates the result and checks its length) accepts it as is.
    """

    def __init__(self, scores: Sequence[float | None] = (), extras: Mapping[str, Sequence[float | None]] | None = None):
        super().__init__(scores)
        self.extras: dict[str, list[float | None]] = {k: list(v) for k, v in (extras or {}).items()}

    @property
    def scores(self) -> list[float | None]:
        return list(self)

    def __repr__(self) -> str:
        return f"RewardOutput(scores={list(self)!r}, extras={self.extras!r})"

    def __reduce__(self):
        # Plain pickling of list subclasses with attributes works, but an explicit form keeps Ray transfers simple.
        return (RewardOutput, (list(self), self.extras))


class RewardFn(Protocol):
    """``prompts [B]``, ``images [B]`` (PIL, uint8 ``[B, H, W, 3]`` or a list of uint8 ``[H, W, 3]``) -> ``[B]``."""

    def __call__(self, prompts: list[str], images: Any, **metadata: Any) -> list[float | None] | RewardOutput: ...


# --------------------------------------------------------------------------------------------------- inputs


def as_uint8_images(images: Any) -> list[np.ndarray]:
    """Normalise an image batch to a list of uint8 ``[H, W, 3]`` arrays (sizes may differ between images).

    Accepts a list of PIL images, a uint8 array/tensor ``[B, H, W, 3]`` or a list of uint8 ``[H, W, 3]`` arrays
    (greyscale ``[H, W]`` and RGBA are converted). Floating-point pixels are refused: their scale is ambiguous.
    """
    if images is None:
        raise ValueError("no images given (expected PIL images or uint8 arrays [B, H, W, 3])")
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # a torch tensor
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"an image array must be [B, H, W, 3], got shape {tuple(images.shape)}")
        items = list(images)
    else:
        items = list(images)
    return [_one_image(im, i) for i, im in enumerate(items)]


def _one_image(im: Any, i: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(im, Image.Image):
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if hasattr(im, "detach") and hasattr(im, "cpu"):
        im = im.detach().cpu().numpy()
    arr = np.asarray(im)
    if arr.dtype != np.uint8:
        raise ValueError(f"image {i}: expected uint8 pixels, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {i}: expected [H, W, 3], got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def to_pil(images: Sequence[np.ndarray]) -> list:
    from PIL import Image

    return [Image.fromarray(im) for im in images]


def as_prompts(prompts: Any, n: int | None = None) -> list[str]:
    """Prompt texts from what TRL or a caller passes: strings, dicts with a ``prompt`` key, or chat messages."""
    if prompts is None:
        if n is None:
            raise ValueError("no prompts given")
        return [""] * n
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list with one entry per image, got a single string")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Mapping) and isinstance(p.get("prompt"), str):
            out.append(p["prompt"])
        elif isinstance(p, Mapping) and isinstance(p.get("content"), str):
            out.append(p["content"])
        elif isinstance(p, list) and p and isinstance(p[-1], Mapping) and "content" in p[-1]:
            out.append(str(p[-1]["content"]))  # conversational: the last message is the caption
        else:
            raise ValueError(f"prompt {i}: expected a string (or a dict with 'prompt'), got {type(p).__name__}")
    return out


def describe_batch(prompts: Sequence[str], batch: Any = None, trainer_state: Any = None) -> str:
    """A short name for a batch in error messages: its index or training step, size and first prompt."""
    parts = []
    if batch is not None:
        parts.append(f"batch {batch}")
    step = getattr(trainer_state, "global_step", None)
    if step is not None:
        parts.append(f"step {step}")
    parts.append(f"{len(prompts)} samples")
    if prompts:
        first = prompts[0] if len(prompts[0]) <= 60 else prompts[0][:57] + "..."
        parts.append(f"first prompt {first!r}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------- checks


def _check_value(v: Any, reward: str, where: str, i: int, what: str = "score") -> float | None:
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if not isinstance(v, (int, float)):
        raise RewardError(f"reward {reward!r} ({where}): {what} {i} is {type(v).__name__} {v!r}, not a number")
    v = float(v)
    if not math.isfinite(v):
        raise RewardError(f"reward {reward!r} ({where}): {what} {i} is {v} (NaN/inf is never a valid reward; "
                          f"return None for 'not applicable')")
    return v


def check_output(out: Any, reward: str, n: int, where: str) -> RewardOutput:
    """Validate a reward's raw result for a batch of ``n`` samples; return it as a :class:`RewardOutput`."""
    if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__"):
        raise RewardError(f"reward {reward!r} ({where}): returned {type(out).__name__}, expected a list of {n} scores")
    extras = getattr(out, "extras", None) or {}
    scores = list(out)
    if len(scores) != n:
        raise RewardError(f"reward {reward!r} ({where}): returned {len(scores)} scores for {n} samples")
    checked = [_check_value(v, reward, where, i) for i, v in enumerate(scores)]
    checked_extras = {}
    for key, values in extras.items():
        values = list(values)
        if len(values) != n:
            raise RewardError(f"reward {reward!r} ({where}): extra {key!r} has {len(values)} values for {n} samples")
        checked_extras[key] = [_check_value(v, reward, where, i, f"extra {key!r} value") for i, v in enumerate(values)]
    return RewardOutput(checked, checked_extras)


def call_reward(fn: Callable, name: str, prompts: list[str], images: list[np.ndarray], metadata: Mapping[str, Any],
                batch: Any = None, trainer_state: Any = None) -> RewardOutput:
    """Call ``fn`` on one batch and validate the result; any exception becomes a RewardError naming reward and batch."""
    where = describe_batch(prompts, batch, trainer_state)
    try:
        out = fn(prompts, images, **metadata)
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"reward {name!r} ({where}) raised {type(e).__name__}: {e}") from e
    return check_output(out, name, len(prompts), where)


def check_metadata_lengths(metadata: Mapping[str, Any], n: int, reward: str) -> None:
    for key, value in metadata.items():
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise RewardError(f"reward {reward!r}: metadata column {key!r} has {len(value)} entries for {n} samples")


# --------------------------------------------------------------------------------------------------- rewards


class Reward:
    """Base class for rewards: subclasses implement :meth:`score` on normalised inputs.

    ``__call__`` accepts both the plain form ``r(prompts, images, **metadata)`` and TRL's keyword form, normalises the
    images once (a list of uint8 ``[H, W, 3]``), validates the output, and reports extras' means to TRL's
    ``log_metric`` as ``<name>/<extra>`` when TRL passes it.
    """

    name: str = "reward"

    def __init__(self, name: str | None = None):
        self.name = name or type(self).name
        self.__name__ = self.name  # TRL names reward columns by __name__

    def score(self, prompts: list[str], images: list[np.ndarray], **metadata: Any) -> list[float | None] | RewardOutput:
        """``prompts [B]``, ``images``: B uint8 ``[H, W, 3]`` -> B scores (or a RewardOutput)."""
        raise NotImplementedError

    def __call__(self, prompts: Any = None, images: Any = None, **kwargs: Any) -> RewardOutput:
        log_metric = kwargs.get("log_metric")
        trainer_state = kwargs.get("trainer_state")
        batch = kwargs.pop("batch_index", None)
        metadata = {k: v for k, v in kwargs.items() if k not in TRL_CONTROL_KEYS}
        if images is None:
            raise RewardError(f"reward {self.name!r}: no 'images' given (a TRL rollout must return an 'images' key)")
        if "metadata" not in metadata and prompts and all(isinstance(p, Mapping) and "include" in p for p in prompts):
            metadata["metadata"] = list(prompts)  # the prompt column holds the GenEval rows themselves
        try:
            imgs = as_uint8_images(images)
            texts = as_prompts(prompts, len(imgs))
        except ValueError as e:
            raise RewardError(f"reward {self.name!r}: bad input: {e}") from e
        if len(texts) != len(imgs):
            raise RewardError(f"reward {self.name!r}: {len(texts)} prompts but {len(imgs)} images")
        check_metadata_lengths(metadata, len(imgs), self.name)
        out = call_reward(self.score, self.name, texts, imgs, metadata, batch=batch, trainer_state=trainer_state)
        if callable(log_metric):
            log_extras(out, self.name, log_metric)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def log_extras(out: RewardOutput, name: str, log_metric: Callable[[str, float], Any]) -> None:
    """Send the batch mean of each extra (ignoring None) to a ``log_metric(name, value)`` callback."""
    for key, values in out.extras.items():
        vals = [v for v in values if v is not None]
        if vals:
            log_metric(f"{name}/{key}", float(np.mean(vals)))


class FunctionReward(Reward):
    """Wraps a plain reward function (a user plugin) so it gets the same input normalisation and output checks."""

    def __init__(self, fn: Callable, name: str | None = None, **kwargs: Any):
        self.fn = fn
        self.kwargs = kwargs
        base = fn
        while isinstance(base, functools.partial):
            base = base.func
        super().__init__(name or getattr(base, "__name__", type(fn).__name__))

    def score(self, prompts, images, **metadata):
        return self.fn(prompts, images, **{**self.kwargs, **metadata})


# --------------------------------------------------------------------------------------------------- registry

# Built-in rewards register themselves when their module is imported, on first lookup, so `import rewards` stays light.
REWARDS: Registry[Callable[..., Any]] = Registry("reward", plugins=True, builtins=(
    "argrpo.rewards.clip", "argrpo.rewards.preference", "argrpo.rewards.aesthetic", "argrpo.rewards.geneval"))


def register_reward(name: str):
    """Register a reward class or factory under ``name``; a second registration of the same name is an error.

    A class is instantiated with the config's kwargs; a function is a factory ``f(**kwargs) -> RewardFn``.
    """

    def deco(obj):
        if not callable(obj):
            raise TypeError(f"reward {name!r}: can only register a class or a factory function, got {obj!r}")
        return REWARDS.add(name, obj)

    return deco


def available_rewards() -> list[str]:
    return REWARDS.names()


def build_reward(spec: str | Callable, name: str | None = None, **kwargs: Any) -> Reward:
    """Build a reward from a registered name, ``package.module:function`` (or ``:Class``), or a callable.

    Registered names and classes get ``kwargs`` as constructor arguments; a plugin function is the reward itself and
    ``kwargs`` are passed to it on every call. The result is always a :class:`Reward` (input normalisation, output
    checks, ``__name__`` for TRL). ``name`` overrides the reward's display name.
    """
    if isinstance(spec, str) and ":" in spec:
        obj = REWARDS.lookup(spec)
        if not callable(obj):
            raise ValueError(f"reward {spec!r}: {obj!r} is not callable")
        if inspect.isclass(obj):
            return _as_reward(obj(**kwargs), name or spec.rpartition(":")[2])
        return FunctionReward(obj, name=name, **kwargs)
    if isinstance(spec, str):
        return _as_reward(REWARDS.lookup(spec)(**kwargs), name or spec)
    if isinstance(spec, Reward):
        if kwargs:
            raise ValueError(f"reward {spec!r} is already built; cannot apply {sorted(kwargs)}")
        return spec
    if callable(spec):
        if inspect.isclass(spec):
            return _as_reward(spec(**kwargs), name)
        return FunctionReward(spec, name=name, **kwargs)
    raise TypeError(f"cannot build a reward from {spec!r}")


def _as_reward(obj: Any, name: str | None) -> Reward:
    if isinstance(obj, Reward):
        if name:
            obj.name = obj.__name__ = name
        return obj
    if callable(obj):
        return FunctionReward(obj, name=name)
    raise TypeError(f"reward {name!r}: the factory returned {obj!r}, which is not callable")


# --------------------------------------------------------------------------------------------------- composite


@dataclass
class RewardSpec:
    """One entry of a reward config: which reward, its weight in the composite, and its constructor arguments."""

    name: str = field(metadata={"help": "registered reward name or 'package.module:function' (a plugin)"})
    weight: float = field(default=1.0, metadata={"help": "weight of this reward in the composite sum"})
    kwargs: dict = field(default_factory=dict, metadata={"help": "arguments for the reward's constructor"})
    alias: str | None = field(default=None, metadata={"help": "display name (default: name); must be unique"})
    normalize: str | None = field(default=None, metadata={
        "help": "z-score this reward before the weighted sum: none | batch | running (default: the composite's; none in GRPO)"})

    def __post_init__(self):
        if self.normalize not in (None, "none", "batch", "running"):
            raise ValueError(f"reward {self.key!r}: normalize must be none, batch or running, got {self.normalize!r}")

    @property
    def key(self) -> str:
        return self.alias or self.name


Normalize = Literal["none", "batch", "running"]


class RunningStats:
    """Running mean/std over every value seen (Chan et al. parallel update), for reward normalisation."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: Sequence[float]) -> None:
        x = np.asarray(values, dtype=np.float64)
        if x.size == 0:
            return
        n, mean, m2 = x.size, float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class RewardCombiner:
    """The weighted sum of component outputs, each optionally normalised first (shared by the in-process
    :class:`CompositeReward` and the Ray reward pool, so both give the same numbers).

    ``normalize``: ``"none"``; ``"batch"`` (z-score over this batch's applicable values); ``"running"`` (z-score with
    the running mean/std of all values seen so far, this batch included). A sample where a component returns None
    sums the other components; if every component is None the sample is None. The output's extras hold each
    component's raw scores as ``<name>`` (and normalised as ``<name>/norm``) plus its own extras as ``<name>/<key>``,
    so every component is logged.
    """

    def __init__(self, weights: Mapping[str, float], normalize: Normalize | Mapping[str, Normalize] = "none",
                 eps: float = 1e-6, name: str = "composite"):
        if not weights:
            raise ValueError("composite: no component rewards")
        self.weights = {k: float(w) for k, w in weights.items()}
        per_key = dict(normalize) if isinstance(normalize, Mapping) else {}
        default = "none" if isinstance(normalize, Mapping) else normalize
        # per reward: its own setting, else the composite's
        self.normalize = {k: per_key.get(k) or default for k in self.weights}
        for k, mode in self.normalize.items():
            if mode not in ("none", "batch", "running"):
                raise ValueError(f"composite normalize of {k!r} must be 'none', 'batch' or 'running', got {mode!r}")
        self.eps = eps
        self.name = name
        self.stats = {k: RunningStats() for k in self.weights}

    def combine(self, outputs: Mapping[str, Sequence[float | None]]) -> RewardOutput:
        """Component outputs ``{name: [B]}`` -> the weighted sum ``[B]`` with every component in the extras."""
        missing = set(self.weights) - set(outputs)
        if missing:
            raise RewardError(f"composite {self.name!r}: no output from {sorted(missing)}")
        sizes = {k: len(outputs[k]) for k in self.weights}
        if len(set(sizes.values())) != 1:
            raise RewardError(f"composite {self.name!r}: components scored different batch sizes {sizes}")
        n = next(iter(sizes.values()))
        total: list[float | None] = [None] * n
        extras: dict[str, list[float | None]] = {}
        for key, w in self.weights.items():
            out = outputs[key]
            raw = list(out)
            normed = self.normalise(key, raw)
            extras[key] = raw
            if self.normalize[key] != "none":
                extras[f"{key}/norm"] = normed
            for sub, values in getattr(out, "extras", {}).items():
                extras[f"{key}/{sub}"] = list(values)
            for i, v in enumerate(normed):
                if v is not None:
                    total[i] = (total[i] or 0.0) + w * v
        return RewardOutput(total, extras)

    def normalise(self, key: str, values: list[float | None]) -> list[float | None]:
        """Component ``key``'s scores ``[B]`` under its normalisation (None stays None; "running" updates)."""
        present = [v for v in values if v is not None]
        mode = self.normalize[key]
        if mode == "none" or not present:
            return list(values)
        if mode == "batch":
            mean, std = float(np.mean(present)), float(np.std(present))
        else:
            self.stats[key].update(present)
            mean, std = self.stats[key].mean, self.stats[key].std
        return [None if v is None else (v - mean) / (std + self.eps) for v in values]

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self.stats.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        for k, s in state.items():
            self.stats[k].load_state_dict(s)


class CompositeReward(Reward):
    """Several rewards scored in this process and combined by a :class:`RewardCombiner` (see there for
    ``normalize`` and the extras). ``components``: RewardSpecs (or their dicts, or names), or
    ``{name: reward | (reward, weight)}``.
    """

    name = "composite"

    def __init__(self, components: Sequence[RewardSpec | Mapping | str] | Mapping[str, Any],
                 normalize: Normalize = "none", eps: float = 1e-6, name: str | None = None):
        super().__init__(name)
        self.rewards: dict[str, Reward] = {}
        weights: dict[str, float] = {}
        modes: dict[str, Normalize] = {}
        items = components.items() if isinstance(components, Mapping) else [(None, c) for c in components]
        for key, comp in items:
            reward, weight, key, mode = _component(key, comp)
            if key in self.rewards:
                raise ValueError(f"composite: two components are named {key!r}; give one an alias")
            self.rewards[key] = reward
            weights[key] = weight
            modes[key] = mode or normalize
        self.combiner = RewardCombiner(weights, modes, eps, self.name)

    @property
    def weights(self) -> dict[str, float]:
        return self.combiner.weights

    def score(self, prompts, images, **metadata) -> RewardOutput:
        outputs = {k: r(prompts, images, **metadata) for k, r in self.rewards.items()}
        return self.combiner.combine(outputs)

    def combine(self, outputs: Mapping[str, Sequence[float | None]]) -> RewardOutput:
        return self.combiner.combine(outputs)

    def state_dict(self) -> dict:
        return self.combiner.state_dict()

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        self.combiner.load_state_dict(state)


def _component(key: str | None, comp: Any) -> tuple[Reward, float, str, str | None]:
    """-> (reward, weight, key, its own normalisation or None)."""
    if isinstance(comp, Mapping):
        comp = RewardSpec(**comp)
    if isinstance(comp, str):
        comp = RewardSpec(name=comp)
    if isinstance(comp, RewardSpec):
        key = key or comp.key
        return build_reward(comp.name, name=key, **comp.kwargs), float(comp.weight), key, comp.normalize
    if isinstance(comp, tuple) and len(comp) == 2:
        reward, weight = comp
        reward = build_reward(reward, name=key)
        return reward, float(weight), key or reward.name, None
    reward = build_reward(comp, name=key)
    return reward, 1.0, key or reward.name, None


def build_rewards(specs: Sequence[RewardSpec | Mapping | str], normalize: Normalize = "none") -> Reward:
    """A config's reward list -> one reward (the component itself when there is one with weight 1 and no
    normalisation, else a :class:`CompositeReward`)."""
    specs = as_specs(specs)
    if len(specs) == 1 and specs[0].weight == 1.0 and normalize == "none" and specs[0].normalize in (None, "none"):
        s = specs[0]
        return build_reward(s.name, name=s.key, **s.kwargs)
    return CompositeReward(specs, normalize=normalize)


def as_specs(specs: Sequence[RewardSpec | Mapping | str]) -> list[RewardSpec]:
    """Reward config entries (RewardSpec, its dict, or a bare name) -> RewardSpecs with unique keys."""
    if isinstance(specs, (str, Mapping, RewardSpec)):
        specs = [specs]
    out = []
    for i, s in enumerate(specs):
        if isinstance(s, str):
            s = RewardSpec(name=s)
        elif isinstance(s, Mapping):
            try:
                s = RewardSpec(**s)
            except TypeError as e:
                fields = [f.name for f in dataclasses.fields(RewardSpec)]
                raise ValueError(f"reward entry {i}: {e}; valid keys: {fields}") from e
        elif not isinstance(s, RewardSpec):
            raise TypeError(f"reward entry {i}: expected a name, a dict or a RewardSpec, got {s!r}")
        out.append(s)
    keys = [s.key for s in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"rewards {dup} appear twice; give each an alias")
    return out

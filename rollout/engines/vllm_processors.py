"""vLLM V1 logits processor: visual-slice sampling and classifier-free guidance over request pairs.

vLLM samples every request row of a step independently, after batch-level logits processors have run. This
processor rewrites the rows of argrpo requests (those whose ``SamplingParams.extra_args`` carry ``"argrpo"``) so
that vLLM's own sampler draws from exactly the distribution :func:`rollout.sampling.final_logprobs` defines: the
processor writes that distribution's normalised log-probabilities into the visual slice and ``-inf`` everywhere
else, and the engine submits ``temperature=1`` (or 0 for greedy) with top-k/top-p off, so vLLM's temperature and
filters are identities and its ``processed_logprobs`` are the sampler logprobs.

CFG pairs. A guided sample is two requests, a conditional row and an unconditional row, that must see the same
image tokens. vLLM draws one token per scheduled row per step, each from its own row's logits, for all rows at
once after the processors ran. So when the uncond row's logits of step t are processed, the cond row's token of
step t is not known yet: the uncond row cannot be masked to "the token its partner draws now". Masking it to its
partner's *previous* token makes it lag one position, and then its logits are those of position t-1 while the cond
row needs position t (guidance with stale uncond logits). Drawing the token inside the processor and forcing both
rows to it (a one-hot row) would keep them in step, but vLLM would then report logprob 0, not the sampler logprob.
Instead both rows receive the *same* guided log-probabilities and the same per-request seed, and vLLM's
per-request generators draw the same token on both rows (greedy: the same argmax); vLLM's processed logprob of that
token is the sampler logprob. The engine checks afterwards that the two rows emitted identical tokens.

Half pairs. A row whose partner is not in this step, or is at a different output position (scheduled in another
step, preempted, still in a chunked prefill), cannot be guided correctly, and no later step can repair it: the two
rows would stay out of step for the rest of the image. Such a row is forced to emit ``marker`` (a non-visual stop
id), which ends it at once and frees its slot; its partner hits the same rule. The engine prevents splits by
submitting only as many pairs per call as the scheduler can hold in one step, and re-runs any marked pair.

extra_args["argrpo"] (all JSON-able, so the multiprocess engine can carry them):
    lo, hi: the visual slice [lo, hi) of the vocabulary
    role: "solo" (no CFG), "cond" or "uncond"
    pair: int key shared by the two rows of a pair (ignored for "solo")
    marker: non-visual id a half pair emits
    temperature, top_k, top_p, cfg_scale: the argrpo SamplingParams of the call
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from argrpo.rollout.sampling import final_logprobs
from argrpo.rollout.types import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

EXTRA_KEY = "argrpo"
ROLES = ("solo", "cond", "uncond")


@dataclass(frozen=True)
class RowSpec:
    lo: int
    hi: int
    role: str
    pair: int
    marker: int
    temperature: float
    top_k: int
    top_p: float
    cfg_scale: float

    @property
    def group(self) -> tuple:
        """Rows with equal groups share one distribution computation."""
        return (self.lo, self.hi, self.temperature, self.top_k, self.top_p, self.cfg_scale)


def parse_spec(params) -> RowSpec | None:
    """The argrpo settings of a vLLM SamplingParams, or None for a foreign request. Raises ValueError if malformed."""
    extra = getattr(params, "extra_args", None) or {}
    raw = extra.get(EXTRA_KEY)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"extra_args[{EXTRA_KEY!r}] must be a dict, got {type(raw).__name__}")
    need = ("lo", "hi", "role", "marker", "temperature", "top_k", "top_p", "cfg_scale")
    missing = [k for k in need if k not in raw]
    if missing:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}] lacks keys {missing}")
    spec = RowSpec(
        lo=int(raw["lo"]),
        hi=int(raw["hi"]),
        role=str(raw["role"]),
        pair=int(raw.get("pair", -1)),
        marker=int(raw["marker"]),
        temperature=float(raw["temperature"]),
        top_k=int(raw["top_k"]),
        top_p=float(raw["top_p"]),
        cfg_scale=float(raw["cfg_scale"]),
    )
    if spec.role not in ROLES:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]['role'] must be one of {ROLES}, got {spec.role!r}")
    if not 0 <= spec.lo < spec.hi:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]: bad visual slice [{spec.lo}, {spec.hi})")
    if spec.lo <= spec.marker < spec.hi:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]: marker {spec.marker} lies inside the visual slice")
    if spec.role != "solo" and spec.pair < 0:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]: a {spec.role} row needs a pair key >= 0")
    if spec.role == "solo" and spec.cfg_scale != 1.0:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]: a solo row cannot use cfg_scale {spec.cfg_scale}")
    _sampling_for(spec.group)  # range checks of temperature / top_k / top_p / cfg_scale
    return spec


@dataclass
class _Row:
    spec: RowSpec
    out: list[int]  # vLLM's live list of the request's output ids (its length is the row's position)


class VisualCFGLogitsProcessor(LogitsProcessor):
    """Batch-level processor; see the module docstring. Rows of other requests pass through untouched."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, _Row] = {}  # persistent-batch index -> row
        self.half_pair_rows = 0  # rows forced to the marker so far (a counter for tests and logs)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_spec(sampling_params)

    def is_argmax_invariant(self) -> bool:
        # It rewrites the distribution (mask + CFG), so greedy sampling must see it too.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        # vLLM's order: removed, then added, then moved.
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            spec = parse_spec(params)
            if spec is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(spec, output_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: float32 [num_reqs, V], row i = persistent-batch index i; rewritten in place."""
        if not self.rows:
            return logits
        solos: dict[tuple, list[int]] = {}  # settings group -> solo rows
        pairs: dict[tuple, list[tuple[int, int]]] = {}  # settings group -> (cond row, uncond row)
        partners: dict[int, dict[str, int]] = {}
        num_rows = logits.shape[0]
        for index, row in self.rows.items():
            if index >= num_rows:
                continue
            if row.spec.role == "solo":
                solos.setdefault(row.spec.group, []).append(index)
            else:
                partners.setdefault(row.spec.pair, {})[row.spec.role] = index
        lone: list[int] = []
        for pair_rows in partners.values():
            c, u = pair_rows.get("cond"), pair_rows.get("uncond")
            if c is None or u is None or len(self.rows[c].out) != len(self.rows[u].out):
                lone.extend(i for i in (c, u) if i is not None)
            else:
                pairs.setdefault(self.rows[c].spec.group, []).append((c, u))

        device = logits.device
        for group, rows in solos.items():
            idx = torch.tensor(rows, device=device)
            # gather only the [rows, C] visual block, never whole [rows, V] rows
            logp = final_logprobs(
                logits[:, group[0] : group[1]].index_select(0, idx), None, _sampling_for(group)
            )
            _write(logits, rows, idx, group, logp)
        for group, cu in pairs.items():
            c_idx = torch.tensor([c for c, _ in cu], device=device)
            u_idx = torch.tensor([u for _, u in cu], device=device)
            lo, hi = group[0], group[1]
            visual = logits[:, lo:hi]
            logp = final_logprobs(
                visual.index_select(0, c_idx), visual.index_select(0, u_idx), _sampling_for(group)
            )  # [P, C]: read both rows before either is overwritten
            rows = [c for c, _ in cu] + [u for _, u in cu]
            _write(logits, rows, torch.cat([c_idx, u_idx]), group, torch.cat([logp, logp]))
        if lone:
            self.half_pair_rows += len(lone)
            idx = torch.tensor(lone, device=device)
            markers = torch.tensor([self.rows[i].spec.marker for i in lone], device=device)
            logits[idx] = float("-inf")
            logits[idx, markers] = 0.0
        return logits


def _write(
    logits: torch.Tensor, rows: list[int], idx: torch.Tensor, group: tuple, logp: torch.Tensor
) -> None:
    """Set rows ``idx`` of logits [R, V] to ``logp`` [len(idx), C] on the visual slice and -inf elsewhere."""
    lo, hi = group[0], group[1]
    if len(rows) == logits.shape[0] and sorted(rows) == list(range(len(rows))):
        # The usual case (every row is ours): plain slices, no gather/scatter of [R, V] rows.
        order = torch.argsort(idx)
        logits[:, :lo] = float("-inf")
        logits[:, hi:] = float("-inf")
        logits[:, lo:hi] = logp.index_select(0, order)
    else:
        logits[idx, :lo] = float("-inf")
        logits[idx, hi:] = float("-inf")
        logits[idx, lo:hi] = logp


_SAMPLING_CACHE: dict[tuple, SamplingParams] = {}


def _sampling_for(group: tuple) -> SamplingParams:
    sp = _SAMPLING_CACHE.get(group)
    if sp is None:
        _, _, temperature, top_k, top_p, cfg_scale = group
        sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        _SAMPLING_CACHE[group] = sp
    return sp

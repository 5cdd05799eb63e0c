"""TRL's ``rollout_func``: the prompts TRL hands over -> image completions from the rollout pool.

TRL calls ``rollout_func(prompts, trainer)`` once per generation batch with this process's prompts, each already
repeated ``num_generations`` times in a row; it wants one completion per entry. We send each distinct caption to
the pool once with ``G = num_generations`` (the pool samples a whole group per prompt) and return:

    prompt_ids [B] lists, completion_ids [B, N] lists (visual LM ids), logprobs [B, N] (the sampler's, used by the
    importance-sampling correction), images [B] uint8 [H, W, 3] (merged by TRL into the reward functions' kwargs),
    and for a family with forced tokens env_mask [B, N] (0 at forced tokens: TRL's loss mask leaves them out)

Several learner processes (``torch.distributed.run``): TRL cuts each generation's P*G repeated prompts into one
contiguous slice per process, so a group can span two processes (TRL gathers every process's rewards before it
computes advantages). Each process samples its own slice with its own pool: whole groups in one call, a group's
head or tail (at the slice's ends) as a smaller call. Completion ``i`` of a generation (its row among all
processes' P*G) always gets seed ``base(k) + i``, so the samples do not depend on the number of processes and the
two halves of a split group never share a seed.

Sync mode generates generation ``k`` when TRL asks for it. Async mode also submits generation ``k + 1`` right
after handing ``k`` over, so the workers sample it while the learner trains on ``k``; when TRL then asks for
``k + 1`` the samples are (mostly) ready and one optimizer step stale, which the importance correction accounts for.
"""

from __future__ import annotations

import time

from argrpo.grpo.prompts import generation_prompts
from argrpo.grpo.stats import StepStats
from argrpo.grpo.weight_sync import WeightSync
from argrpo.rewards.base import as_prompts
from argrpo.rollout.pool import RolloutFuture
from argrpo.rollout.types import Rollout, SamplingParams

# Sample r of generation k uses seed base + k * SEED_STRIDE + r: generations never share a seed.
SEED_STRIDE = 1 << 20


def _segments(flat: list[str], offset: int, G: int) -> list[tuple[str, int, int]]:
    """This process's slice (rows ``offset ..`` of the generation) -> (caption, first row, count) per group part.

    Global row ``i`` belongs to group ``i // G``; every row of a part must carry the same caption.
    """
    parts: list[list] = []
    for j, caption in enumerate(flat):
        row = offset + j
        if parts and (parts[-1][1] // G) == (row // G):
            if caption != parts[-1][0]:
                raise ValueError(f"rollout: rows {parts[-1][1]} and {row} belong to one group of {G} but carry "
                                 f"different prompts; the prompt grouping this rollout function relies on has changed")
            parts[-1][2] += 1
        else:
            parts.append([caption, row, 1])
    return [tuple(p) for p in parts]


def _process(trainer) -> tuple[int, int]:
    """(this process's index, number of learner processes) from the trainer's accelerator."""
    acc = getattr(trainer, "accelerator", None)
    return (int(getattr(acc, "process_index", 0)), int(getattr(acc, "num_processes", 1))) if acc else (0, 1)


class RolloutSource:
    """Callable handed to ``GRPOTrainer(rollout_func=...)``.

    Args:
        pool: a RolloutPool / LocalRolloutPool (``generate``, ``generate_async``, ``load_weights``).
        sync: pushes the learner's weights before each generation (version = optimizer step).
        sampling: how images are sampled (``n`` and ``seed`` are set here).
        num_generations: G.
        stream_captions: the train dataset's caption column, in order (see grpo.prompts).
        prompts_per_generation: P; generation k is rows [k*P, (k+1)*P) of the stream.
        mode: "sync" or "async".
        seed: base sampling seed.
        stats: where timings go.
    """

    def __init__(self, pool, sync: WeightSync, sampling: SamplingParams, num_generations: int,
                 stream_captions: list[str], prompts_per_generation: int, mode: str = "sync", seed: int = 0,
                 stats: StepStats | None = None):
        if mode not in ("sync", "async"):
            raise ValueError(f"rollout mode must be 'sync' or 'async', got {mode!r}")
        self.pool, self.sync, self.sampling = pool, sync, sampling
        self.G, self.P = int(num_generations), int(prompts_per_generation)
        self.captions = list(stream_captions)
        self.mode, self.seed = mode, int(seed)
        self.stats = stats or StepStats()
        self._pending = None  # (k, captions, future)
        self._next_k: int | None = None
        self._calls = 0
        self.generations: list[int | None] = []  # stream generation index served by each call (None: off-stream)
        self.prefetch_hits = 0
        self.prefetch_misses = 0

    def _sampling(self, k: int) -> SamplingParams:
        return self.sampling.with_(n=1, seed=self.seed * 7_919 + (k + 1) * SEED_STRIDE)

    def __call__(self, prompts, trainer) -> dict:
        flat = as_prompts(prompts)
        G = self.G
        rank, n_proc = _process(trainer)
        if (len(flat) * n_proc) % G:
            raise ValueError(f"rollout: {len(flat)} prompts x {n_proc} processes is not a multiple of "
                             f"num_generations {G}")
        offset = rank * len(flat)  # this slice's first row among the generation's rows (TRL's slicing)
        segments = _segments(flat, offset, G)
        k = self._find_generation(flat, offset)
        model = trainer.model
        version = int(trainer.state.global_step)

        sync_s = self.sync.take_seconds()
        t0, c0 = time.perf_counter(), time.process_time()
        pending, self._pending = self._pending, None
        if pending is not None and k is not None and pending[0] == k and pending[1] == flat:
            rollout = pending[2].result()  # sampled while the learner trained the previous step
            self.prefetch_hits += 1
        else:
            if pending is not None:
                pending[2].result()  # never leave a stale job running on the workers
                self.prefetch_misses += 1
            self.sync.ensure(model, version)
            kk = k if k is not None else -1 - self._calls
            rollout = self._submit(segments, kk).result()
        pushed = self.sync.take_seconds()
        wait = time.perf_counter() - t0 - pushed  # the push is accounted as sync, not as waiting for samples
        cpu = time.process_time() - c0
        sync_s += pushed
        self._calls += 1

        if self.mode == "async" and k is not None:
            nxt = self._slice(k + 1, offset, len(flat))
            if nxt is not None:
                self.sync.ensure(model, version)
                self._pending = (k + 1, nxt, self._submit(_segments(nxt, offset, G), k + 1))
        self._next_k = None if k is None else k + 1
        self.generations.append(k)

        if rollout.images is None:
            raise ValueError("rollout: the workers returned no images (the policy checkpoint has no image "
                             "tokenizer?); rewards score decoded images")
        if len(rollout) != len(flat):
            raise ValueError(f"rollout: the pool returned {len(rollout)} samples for {len(flat)} requested")
        s = self.stats
        s.add_time("rollout", wait, cpu=cpu)
        s.add_time("sync", sync_s + self.sync.take_seconds())
        s.add_time("rollout_generate", rollout.timings.get("generate", 0.0))
        s.add_time("decode", rollout.timings.get("decode", 0.0))
        s.set("rollout/staleness", version - rollout.weight_version)
        s.set("rollout/weight_version", rollout.weight_version)
        out = {
            "prompt_ids": [list(p) for p in rollout.prompt_ids],
            "completion_ids": rollout.completion_ids.tolist(),
            "logprobs": rollout.logprobs.float().tolist(),
            "images": list(rollout.images),
        }
        family = getattr(trainer, "family", None)
        if family is not None and family.forced_tokens:
            # TRL's env_mask: forced tokens (Emu3's row ends) stay in the attention but get no loss, KL or ratio
            out["env_mask"] = [family.sampled_mask().int().tolist()] * len(flat)
        return out

    def _slice(self, k: int, offset: int, length: int) -> list[str] | None:
        """Generation ``k``'s repeated prompts, rows ``offset .. offset+length`` (None past the stream's end)."""
        prompts = generation_prompts(self.captions, k, self.P)
        if prompts is None or offset + length > len(prompts) * self.G:
            return None
        return [prompts[i // self.G] for i in range(offset, offset + length)]

    def _find_generation(self, flat: list[str], offset: int) -> int | None:
        """Which generation of the stream this slice is (the expected one is checked first); None if none."""
        n = len(self.captions) // self.P
        hint = self._next_k
        order = ([hint] if hint is not None and 0 <= hint < n else []) + [k for k in range(n) if k != hint]
        for k in order:
            if self._slice(k, offset, len(flat)) == flat:
                return k
        return None

    def _submit(self, segments: list[tuple[str, int, int]], k: int) -> RolloutFuture:
        """Sample the slice's group parts: whole groups in one pool call, a split group's part as its own call;
        row ``i`` of the generation gets seed ``base(k) + i`` (see the module docstring)."""
        base = self._sampling(k)
        calls: list[tuple[list[str], int, int]] = []  # (prompts, samples per prompt, first row)
        for caption, row, count in segments:
            if count == self.G and calls and calls[-1][1] == self.G:
                calls[-1][0].append(caption)
            else:
                calls.append(([caption], count, row))
        futures = [self.pool.generate_async(prompts, n, base.with_(seed=base.seed + row))
                   for prompts, n, row in calls]
        if len(futures) == 1:
            return futures[0]
        return RolloutFuture(lambda: Rollout.concat([f.result() for f in futures]),
                             lambda: all(f.done() for f in futures))

    def close(self) -> None:
        """Wait for a prefetched job (so the pool can shut down cleanly)."""
        if self._pending is not None:
            try:
                self._pending[2].result()
            finally:
                self._pending = None

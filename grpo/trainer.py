"""The GRPO learner: TRL's ``GRPOTrainer`` fed by the rollout pool, scored by argrpo rewards.

Everything GRPO-specific is TRL's: group advantages, the loss types (grpo, dr_grpo, dapo, bnpo, cispo, sapo, ...),
clipping, the k3 KL against the reference (for LoRA: the same model with its adapter disabled, no copy), the
importance-sampling correction code and the metrics. argrpo plugs in through TRL's public hooks:

- ``rollout_func`` (grpo.rollouts.RolloutSource): samples come from ``rollout.RolloutPool`` (Ray workers running
  the torch engine or vLLM), sync or one step ahead (async); images reach the rewards as a rollout column;
- ``reward_funcs`` (grpo.reward_funcs): argrpo rewards, weighted by ``reward_weights``;
- ``GRPOConfig``: built from the run config (grpo.config).

Two small additions where TRL has no hook, both pinned by tests/test_grpo_trl_pin.py:

1. The learner's log-probabilities are normalised over the visual slice at the sampler's temperature
   (grpo.logprobs.install_visual_head replaces what ``fused_lm_head=True`` computes).
2. The importance-sampling correction from the sampler's logprobs: TRL applies it only on its own vLLM path, keyed
   on ``self.use_vllm``. ``ARGRPOTrainer`` turns that path's switches on after construction (no vLLM object is
   built; TRL's ``sync_weights`` call goes to a no-op, argrpo syncs weights itself), so TRL computes
   ``min(exp(old_logp - sampler_logp), cap)`` per token, multiplies it into the loss and logs its statistics
   (``sampling/importance_sampling_ratio/*``, ``sampling/sampling_logp_difference/*``).

Several learner processes (``python -m torch.distributed.run --nproc_per_node N -m recipes.cli grpo ...``, or
``accelerate launch`` with a DDP / DeepSpeed / FSDP config on GPUs): accelerate wraps the model as TRL does, and
every process runs the same script. Each process owns a rollout pool (in-process, or its own Ray actors in a
cluster shared by address) and samples the slice of each generation TRL hands it (grpo.rollouts); rewards are
scored on that slice in the process; TRL gathers all rewards before computing group advantages, so a group may
span processes. Only the main process writes metrics, image grids, checkpoints and the final policy (the
replicas' weights and optimizer states are identical under DDP).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
from argrpo.grpo.config import NOT_TRL_FIELDS, CorrectionConfig, GRPORunConfig
from argrpo.grpo.logprobs import install_visual_head
from argrpo.grpo.sharding import (
    UnshardOutputHead,
    consolidated_model,
    enable_fsdp_on_cpu,
    set_plugin_precision,
    training_arguments,
)
from argrpo.grpo.stats import StepStats
from argrpo.models.families import family_for_layout
from argrpo.models.unwrap import unwrap_model
from trl import GRPOConfig, GRPOTrainer

logger = logging.getLogger(__name__)


class _NoVLLM:
    """Stands where TRL keeps its vLLM backend; TRL calls ``sync_weights()`` before a rollout, argrpo syncs itself."""

    def sync_weights(self):
        return None


class ARGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` for visual-token policies.

    Extra keyword arguments:
        layout: the policy's ``ModelFamily`` (how its visual logits are computed), or a bare TokenLayout (the
            shared-vocabulary family).
        correction: CorrectionConfig to apply the importance-sampling correction with, or None.
        stats: StepStats the rollout function and rewards write into; merged into each training log line.
        skip_zero_advantage: drop completions whose advantage is 0 from the generation batch before it is split
            into micro-batches (only valid with beta = 0 and no entropy bonus: they add no gradient then).
    """

    def __init__(self, *args, layout, correction: CorrectionConfig | None = None, stats: StepStats | None = None,
                 skip_zero_advantage: bool = False, **kwargs):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's documented hook
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            self.add_callback(UnshardOutputHead())  # the visual head reads lm_head.weight without calling lm_head
        self.family = family_for_layout(layout)
        self.layout = self.family.layout
        self.stats = stats if stats is not None else StepStats()
        install_visual_head(unwrap_model(self.model), self.family, self.temperature)
        if self.ref_model is not None:
            install_visual_head(unwrap_model(self.ref_model), self.family, self.temperature)
        self.skip_zero_advantage = skip_zero_advantage
        self.sampler_correction = correction
        if correction is not None:
            self._enable_sampler_correction(correction)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)  # accelerate drops an FSDP plugin on CPU (grpo.sharding says why)

    def _enable_sampler_correction(self, c: CorrectionConfig) -> None:
        # TRL's vLLM path reads exactly these attributes; with them set, _generate_and_score_completions computes
        # old log-probs, the truncated (or masked) IS ratio against the rollout's logprobs and its metrics, and
        # _compute_loss multiplies it in.
        self.use_vllm = True
        self.vllm_generation = _NoVLLM()
        self._last_loaded_step = -1
        self.vllm_importance_sampling_correction = True
        self.vllm_importance_sampling_mode = c.level
        self.vllm_importance_sampling_clip_max = c.cap
        self.vllm_importance_sampling_clip_min = c.floor

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.stats.record_advantages(out["advantages"])
        if self.skip_zero_advantage and self.model.training:
            out = keep_nonzero_advantage(out, self.args.steps_per_generation)
            kept = out["completion_mask"].sum().reshape(1).float()
            # the dapo/cispo normaliser counts the tokens the learner actually sees, over every process
            out["num_items_in_batch"] = self.accelerator.gather(kept).sum()
            self.stats.set("advantages/kept", out["advantages"].numel())
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            logs.update(self.stats.take())
        super().log(logs, start_time)


def keep_nonzero_advantage(batch: dict, multiple: int) -> dict:
    """The rows of a generation batch whose advantage is nonzero, padded with zero-advantage rows up to a multiple
    of ``multiple`` (TRL splits the batch into that many equal micro-batches and drops a remainder; zero rows add
    no gradient, so the padding changes nothing but keeps every informative row).

    batch: TRL's generation batch: ``advantages`` [B] and other per-row tensors [B, ...] (or lists of B);
    0-d tensors and None pass through. Row order is kept (TRL shuffles afterwards). Returns a new dict.
    """
    adv = batch["advantages"]
    n = adv.shape[0]
    nonzero = torch.nonzero(adv != 0).reshape(-1)
    zero = torch.nonzero(adv == 0).reshape(-1)
    want = min(n, max(multiple, -(-nonzero.numel() // multiple) * multiple))
    keep = torch.sort(torch.cat([nonzero, zero[:want - nonzero.numel()]])).values
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
            out[key] = value[keep]
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in keep.tolist()]
        else:
            out[key] = value
    return out


# ---- building a run from its config --------------------------------------------------------------------------------
def trl_args(cfg: GRPORunConfig, n_image_tokens: int, device: torch.device) -> GRPOConfig:
    """The TRL ``GRPOConfig`` of a run."""
    g = cfg.grpo
    own = {f.name: getattr(g, f.name) for f in dataclasses.fields(g) if f.name not in NOT_TRL_FIELDS}
    report = [r for r in cfg.logging.report_to if r == "wandb"]  # TensorBoard is wired by argrpo itself
    c = cfg.correction
    args = GRPOConfig(
        **own,
        **dict(g.trl),
        **training_arguments(cfg.distributed),
        output_dir=str(Path(cfg.output_dir)),
        seed=cfg.seed,
        data_seed=cfg.seed,
        temperature=cfg.rollout.sampling.temperature,
        max_completion_length=n_image_tokens,
        logging_steps=1,
        save_strategy="no",
        report_to=report or "none",
        run_name=cfg.logging.run_name,
        disable_tqdm=True,
        shuffle_dataset=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        log_completions=False,
        vllm_importance_sampling_mode=c.level,
        vllm_importance_sampling_clip_max=c.cap,
        vllm_importance_sampling_clip_min=c.floor,
    )
    set_plugin_precision(args, cfg.distributed)
    return args


def generations_needed(cfg: GRPORunConfig) -> int:
    g = cfg.grpo
    micro_steps = g.max_steps * g.gradient_accumulation_steps
    per_generation = (g.steps_per_generation or g.gradient_accumulation_steps) * g.num_iterations
    return math.ceil(micro_steps / per_generation)


@dataclasses.dataclass
class GRPORun:
    """A built run: the trainer and what it was built from (returned by :func:`build_run`)."""

    cfg: GRPORunConfig
    trainer: ARGRPOTrainer
    pool: object
    source: object
    sync: object
    stats: StepStats
    layout: object
    tokenizer: object
    image_tokenizer_path: Path | None
    base_model_path: str | None
    callbacks: dict

    def close(self) -> None:
        try:
            self.source.close()
        finally:
            shutdown = getattr(self.pool, "shutdown", None)
            if shutdown is not None:
                shutdown()
            for f in getattr(self.trainer, "reward_funcs", []):
                close = getattr(f, "close", None)
                if close is not None:
                    close()
            tb = self.callbacks.get("tb_writer")
            if tb is not None:
                tb.close()


def build_run(cfg: GRPORunConfig, eval_fn=None) -> GRPORun:
    """Load the policy, start the rollout pool, build rewards, prompts and the trainer (nothing is trained yet).

    eval_fn: optional ``fn(trainer, step) -> {name: value}``; default: grpo.evaluate when eval.every > 0.
    """
    from argrpo.grpo.prompts import load_prompts, prompt_stream, weight_by_tag
    from argrpo.grpo.reward_funcs import build_reward_funcs
    from argrpo.models.runtime import resolve_device, set_threads

    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per learner process
    out = Path(cfg.output_dir)
    _check_shared_ray(cfg)

    # Inputs first, cheapest first (prompts, rewards, policy), so a bad one fails by name before any worker starts
    # or anything is written to output_dir.
    if not cfg.data.train_prompts:
        raise ValueError("data.train_prompts: name the training prompts (shapes:train, a .jsonl or a .txt)")
    specs = load_prompts(cfg.data.train_prompts, cfg.data.shapes_per_tag, cfg.data.shapes_seed)
    if cfg.data.max_prompts:
        specs = specs[: cfg.data.max_prompts]
    if cfg.data.tag_weights:
        specs = weight_by_tag(specs, cfg.data.tag_weights, where=f"data.tag_weights ({cfg.data.train_prompts})")
    P = cfg.grpo.prompts_per_generation
    dataset = prompt_stream(specs, P, generations_needed(cfg), cfg.seed, cfg.data.shuffle)

    if cfg.actor_requests():
        from argrpo.cluster import check_resources, init_ray

        init_ray()
        # all of the run's actors at once: each pool alone may fit where both together never would
        check_resources(cfg.actor_requests(), "grpo run")
    stats = StepStats()
    reward_funcs, weights = build_reward_funcs(cfg.rewards, stats, actors=cfg.reward_actors,
                                               pool_config=cfg.reward_pool,
                                               pending_timeout_s=cfg.ray_pending_timeout_s)
    pools: list = []
    try:
        return _build_run(cfg, eval_fn, device, out, P, dataset, stats, reward_funcs, weights, pools)
    except BaseException:
        _close_all(reward_funcs, pools)
        raise


def _is_main_process() -> bool:
    """Whether this is the learner's main process (``RANK`` 0, or the only one); it alone writes run files."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_shared_ray(cfg: GRPORunConfig) -> None:
    """Several learner processes each own their rollout pool and reward actors (see ``train``). On Ray those must
    live in one shared cluster joined by address; a local Ray started by each process would overbook the machine."""
    from argrpo.grpo.config import learner_processes

    n = learner_processes()
    if n == 1 or not (cfg.rollout.num_workers > 0 or cfg.reward_actors):
        return
    import ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        raise ValueError(
            f"{n} learner processes with Ray actors (rollout.num_workers={cfg.rollout.num_workers}, "
            f"reward_actors={cfg.reward_actors}) need one shared Ray cluster: start it (`ray start --head`) and pass "
            f"--ray-address (or set RAY_ADDRESS), or use in-process rollouts and rewards (rollout.num_workers=0, "
            f"reward_actors=false)")


def reward_norm_state(reward_funcs) -> dict:
    """{reward name: running normalisation statistics} of the rewards that keep some."""
    return {f.__name__: f.state_dict() for f in reward_funcs if getattr(f, "state_dict", None) and f.state_dict()}


def load_reward_norm_state(reward_funcs, state: dict) -> None:
    for f in reward_funcs:
        if f.__name__ in state:
            f.load_state_dict(state[f.__name__])


def _close_all(reward_funcs, pools) -> None:
    """Stop what a failed build started (reward actors, rollout workers)."""
    for f in reward_funcs:
        close = getattr(f, "close", None)
        if close is not None:
            close()
    for pool in pools:
        pool.shutdown()


def _build_run(cfg, eval_fn, device, out, P, dataset, stats, reward_funcs, weights, pools: list) -> GRPORun:
    """The part of build_run that loads the policy and starts workers (appended to ``pools`` as they start)."""
    from argrpo.grpo import callbacks as cb
    from argrpo.grpo.rollouts import RolloutSource
    from argrpo.grpo.weight_sync import WeightSync, worker_policy
    from argrpo.models.families import check_engine, detect_family
    from argrpo.models.policy import is_peft_model, policy_from_config
    from argrpo.rollout.pool import build_rollout_pool
    from transformers.integrations import TensorBoardCallback

    # an engine that cannot generate the checkpoint's family fails here, before any weights load
    check_engine(detect_family(cfg.policy.checkpoint), cfg.rollout.engine)
    # policy: a fresh LoRA adapter goes to TRL as a peft_config, so TRL's reference is the adapter-disabled model
    model, loaded = policy_from_config(cfg.policy, device=str(device))
    peft_config, fresh_lora = None, False
    if cfg.policy.lora.enabled and not (Path(cfg.policy.checkpoint) / "adapter_config.json").is_file():
        peft_config = model.peft_config["default"]
        model = model.unload()
        fresh_lora = True
    layout, tokenizer = loaded.layout, loaded.tokenizer
    base_model_path = str(loaded.path) if fresh_lora else None
    if is_peft_model(model):  # a LoRA checkpoint: its base is recorded in its argrpo.json
        from argrpo.models.policy import read_policy_meta

        base_model_path = (read_policy_meta(loaded.path) or {}).get("base_model")
    if loaded.image_tokenizer_path is not None:
        from argrpo.models.image_tokenizers import load_image_tokenizer

        # the rollout workers decode with it: a codebook or grid that differs would fail (or scramble) every image
        layout.check_image_tokenizer(load_image_tokenizer(loaded.image_tokenizer_path),
                                     what=f"image tokenizer {loaded.image_tokenizer_path}")

    out.mkdir(parents=True, exist_ok=True)
    pool = build_rollout_pool(worker_policy(str(loaded.path), cfg.rollout.engine, layout=cfg.policy.layout,
                                            lora=cfg.policy.lora if fresh_lora else None, dtype=cfg.policy.dtype,
                                            layout_kwargs=cfg.policy.layout_options),
                              cfg.rollout, pending_timeout_s=cfg.ray_pending_timeout_s)
    pools.append(pool)
    sync = WeightSync(pool)
    source = RolloutSource(pool, sync, cfg.rollout.sampling, cfg.grpo.num_generations, dataset["prompt"], P,
                           mode=cfg.rollout.mode, seed=cfg.seed, stats=stats)
    args = trl_args(cfg, layout.n_image_tokens, device)
    args.reward_weights = weights

    callbacks: dict = {"timer": cb.StepTimer(stats), "jsonl": cb.MetricsJsonl(out / "metrics.jsonl"),
                       "progress": cb.ProgressBar(cfg.logging.progress)}
    hf_callbacks = [callbacks["timer"]]
    if "tensorboard" in cfg.logging.report_to and _is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        callbacks["tb_writer"] = SummaryWriter(str(out / "tensorboard"))
        hf_callbacks.append(TensorBoardCallback(tb_writer=callbacks["tb_writer"]))
    callbacks["images"] = cb.ImageGridLogger(
        stats, out / "images", cfg.logging.image_every, cfg.grpo.num_generations,
        {f.__name__: w for f, w in zip(reward_funcs, weights)}, cfg.logging.image_prompts,
        tb_writer=callbacks.get("tb_writer"))
    hf_callbacks += [callbacks["images"], callbacks["jsonl"], callbacks["progress"]]

    trainer = ARGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=source,
        callbacks=hf_callbacks,
        layout=loaded.family,
        correction=cfg.correction if cfg.use_correction else None,
        stats=stats,
        skip_zero_advantage=cfg.grpo.skips_zero_advantage,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)

    run = GRPORun(cfg, trainer, pool, source, sync, stats, layout, tokenizer, loaded.image_tokenizer_path,
                  base_model_path, callbacks)
    if cfg.checkpoint.every:
        from argrpo.config import to_dict

        callbacks["checkpoints"] = cb.Checkpointer(
            trainer, out / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.keep, stats,
            tokenizer=tokenizer, layout=layout, image_tokenizer_path=loaded.image_tokenizer_path,
            base_model_path=base_model_path, run_state={"config": to_dict(cfg), "prompts_per_generation": P},
            state_fn=lambda: {"reward_norm": reward_norm_state(reward_funcs)})
        trainer.add_callback(callbacks["checkpoints"])  # last: it saves after the step's log line is written
    if cfg.budget_minutes:
        callbacks["budget"] = cb.TimeBudget(cfg.budget_minutes, cfg.budget_clock, stats)
        trainer.callback_handler.callbacks.insert(
            trainer.callback_handler.callbacks.index(callbacks["timer"]) + 1, callbacks["budget"])
    if cfg.rollout.mode == "sync":
        callbacks["push"] = cb.WeightPusher(trainer, sync, stats)
        # before the timer, so the push is inside the step's wall time and booked as sync
        trainer.callback_handler.callbacks.insert(
            trainer.callback_handler.callbacks.index(callbacks["timer"]), callbacks["push"])
    if cfg.eval.every:
        fn = eval_fn or _default_eval_fn(cfg, run)
        callbacks["eval"] = cb.PeriodicEval(lambda step: fn(trainer, step), cfg.eval.every, stats,
                                            at_start=cfg.eval.at_start)
        trainer.callback_handler.callbacks.insert(
            trainer.callback_handler.callbacks.index(callbacks["timer"]) + 1, callbacks["eval"])
    return run


def _default_eval_fn(cfg: GRPORunConfig, run: GRPORun):
    """Held-out GenEval-style score of the learner's current weights (grpo.evaluate), as {score, score_se, <tag>}."""
    from types import SimpleNamespace

    from argrpo.grpo import evaluate as ev
    from argrpo.models.image_tokenizers import load_image_tokenizer

    e = cfg.eval
    specs, _ = ev.load_prompt_set(e.prompts or cfg.data.eval_prompts, e.shapes_per_tag, e.shapes_seed)
    specs = specs[: e.limit] if e.limit else specs
    family = run.trainer.family
    image_tokenizer = family.image_decoder(run.trainer.model)  # the checkpoint's own decoder (Janus), if any
    if image_tokenizer is None and run.image_tokenizer_path is None:
        raise ValueError(f"{cfg.policy.checkpoint}: evaluation needs the policy's image tokenizer")
    if image_tokenizer is None:
        image_tokenizer = load_image_tokenizer(run.image_tokenizer_path)

    def fn(trainer, step):
        policy = SimpleNamespace(model=trainer.accelerator.unwrap_model(trainer.model), tokenizer=run.tokenizer,
                                 layout=run.layout, image_tokenizer_path=run.image_tokenizer_path, family=family)
        result = ev.evaluate(policy, image_tokenizer, specs, e.settings)
        out = {"score": result.overall, "score_se": result.overall_stderr}
        out.update({tag: s.accuracy for tag, s in result.tags.items()})
        return out

    return fn


def _finished_from_checkpoint(cfg: GRPORunConfig, ckpt: Path) -> dict:
    """``--resume`` when the newest checkpoint already holds every step: nothing is trained (from a checkpoint at
    max_steps, transformers would train one step more), the final policy is written from the checkpoint."""
    import json

    from argrpo.grpo.checkpointing import export_checkpoint, is_sharded_checkpoint, save_policy_files
    from argrpo.models.policy import load_policy, read_policy_meta

    out = Path(cfg.output_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    final = None
    if cfg.checkpoint.save_final and int(os.environ.get("RANK", "0")) == 0 and is_sharded_checkpoint(ckpt):
        final = export_checkpoint(ckpt, out / "final")  # consolidated from the shards, in this process
    elif cfg.checkpoint.save_final and int(os.environ.get("RANK", "0")) == 0:
        loaded = load_policy(ckpt)
        final = save_policy_files(out / "final", loaded.model, loaded.tokenizer, loaded.layout,
                                  loaded.image_tokenizer_path, (read_policy_meta(ckpt) or {}).get("base_model"),
                                  extra={"grpo_step": state["global_step"]})
    history = [h for h in state.get("log_history", []) if "reward" in h]
    logger.info("--resume: %s already holds all %d steps; nothing to train", ckpt, cfg.grpo.max_steps)
    return {"output_dir": str(out), "final": str(final) if final else None, "steps": state["global_step"],
            "resumed_from": str(ckpt), "seconds": 0.0, "time_totals": {}, "last": history[-1] if history else {},
            "eval": [], "prefetch": {"hits": 0, "misses": 0}}


def train(cfg: GRPORunConfig, resume: bool = False, eval_fn=None) -> dict:
    """Run GRPO as configured; returns a summary (final metrics, paths, time split).

    resume: continue from the newest checkpoint in ``output_dir/checkpoints`` (same step, data position,
    optimizer, scheduler and RNG); without one, start from the beginning.
    """
    from argrpo.grpo.checkpointing import (
        check_resumable,
        check_sharding,
        latest_checkpoint,
        read_run_state,
        save_policy_files,
    )
    from argrpo.grpo.config import learner_processes

    out = Path(cfg.output_dir)
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out / "checkpoints")
        if ckpt is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", out / "checkpoints")
        else:  # before anything is built or started: a checkpoint of another run is refused by name
            from argrpo.config import to_dict
            from argrpo.models.layout import TokenLayout
            from argrpo.models.policy import read_policy_meta

            meta = read_policy_meta(cfg.policy.checkpoint) if cfg.policy.checkpoint else None
            layout = TokenLayout.from_dict(meta["layout"]) if meta else None
            check_resumable(ckpt, {**to_dict(cfg), "prompts_per_generation": cfg.grpo.prompts_per_generation},
                            layout)
            check_sharding(ckpt, cfg.distributed.strategy, learner_processes())
            if read_run_state(ckpt)["step"] >= cfg.grpo.max_steps:
                return _finished_from_checkpoint(cfg, ckpt)
    run = build_run(cfg, eval_fn=eval_fn)
    if ckpt is not None:
        load_reward_norm_state(run.trainer.reward_funcs, read_run_state(ckpt).get("reward_norm", {}))
    t0 = time.perf_counter()
    try:
        run.trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        final = None
        # under FSDP2 every process takes part in gathering the shards; the main process writes them
        model = consolidated_model(run.trainer.accelerator.unwrap_model(run.trainer.model)) \
            if cfg.checkpoint.save_final else None
        if cfg.checkpoint.save_final and run.trainer.is_world_process_zero():
            final = save_policy_files(out / "final", model, run.tokenizer, run.layout, run.image_tokenizer_path,
                                      run.base_model_path, extra={"grpo_step": run.trainer.state.global_step})
    finally:
        run.close()
    history = [h for h in run.trainer.state.log_history if "reward" in h]
    return {
        "output_dir": str(out),
        "final": str(final) if final else None,
        "steps": run.trainer.state.global_step,
        "resumed_from": str(ckpt) if ckpt else None,
        "seconds": time.perf_counter() - t0,
        "time_totals": dict(run.stats.totals),
        "last": history[-1] if history else {},
        "eval": run.callbacks["eval"].history if "eval" in run.callbacks else [],
        "prefetch": {"hits": run.source.prefetch_hits, "misses": run.source.prefetch_misses},
    }

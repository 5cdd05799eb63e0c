"""One GRPO run config: TRL's ``GRPOConfig`` knobs plus policy, rollout, rewards, data, logging and checkpoints.

Sections (YAML keys; any key can be overridden with ``--set section.key=value``)::

    output_dir, seed, threads, device, budget_minutes, budget_clock
    policy:      models.policy.PolicyConfig    checkpoint, layout, full or LoRA (policy.lora.*)
    rollout:     rollout.pool.RolloutConfig    engine, num_workers, mode (sync | async), sampling (SamplingParams)
    rewards:     list of RewardSpec            name or 'package.module:function', weight, kwargs, alias
    reward_actors, reward_pool                 score rewards on Ray actors (rewards.pool), one per reward
    data:        DataConfig                    prompt sets (GenEval-schema jsonl)
    grpo:        GRPOSection                   TRL GRPOConfig fields (loss_type, beta, epsilon, ...), plus `trl`
                                               for any other GRPOConfig field, and skip_zero_advantage
    correction:  CorrectionConfig              importance-sampling correction from the sampler logprobs
    logging:     LoggingConfig                 TensorBoard / W&B, image grids, metrics.jsonl
    checkpoint:  CheckpointConfig              every N steps, atomic, resumable
    eval:        EvalConfig                    periodic held-out evaluation
    distributed: DistributedConfig             ddp or fsdp (FSDP2) over the learner processes (grpo.sharding)

Batch sizes use TRL's names. One generation holds ``per_device_train_batch_size * steps_per_generation``
completions per learner process (``steps_per_generation`` defaults to ``gradient_accumulation_steps``), times the
number of processes (``WORLD_SIZE`` under ``torch.distributed.run`` / ``accelerate launch``), i.e. that number
divided by ``num_generations`` prompts, each sampled ``num_generations`` times; a prompt's group may span two
processes (TRL computes advantages after gathering every process's rewards).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from argrpo.cluster import ActorRequest
from argrpo.config import require_at_least
from argrpo.grpo.evaluate import EvalSettings
from argrpo.grpo.sharding import DistributedConfig
from argrpo.models.policy import PolicyConfig
from argrpo.models.runtime import resolve_bf16, resolve_device
from argrpo.rewards.base import RewardSpec
from argrpo.rewards.pool import RewardPoolConfig
from argrpo.rollout.pool import RolloutConfig

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

# GRPOConfig fields this toolkit sets itself (from other sections, or because another value breaks image rollouts).
MANAGED_TRL_FIELDS = {
    "output_dir": "the top-level output_dir",
    "seed": "the top-level seed",
    "num_generations": "grpo.num_generations",
    "temperature": "rollout.sampling.temperature (the learner must score at the sampler's temperature)",
    "top_k": "rollout.sampling.top_k", "top_p": "rollout.sampling.top_p",
    "max_completion_length": "the layout's image token count",
    "use_vllm": "rollout.engine (rollouts always come from the rollout pool)",
    "vllm_importance_sampling_correction": "correction.mode", "vllm_importance_sampling_mode": "correction.level",
    "vllm_importance_sampling_clip_max": "correction.cap", "vllm_importance_sampling_clip_min": "correction.floor",
    "reward_weights": "rewards[].weight",
    "report_to": "logging.report_to", "logging_steps": "logging (every step is logged)",
    "save_strategy": "checkpoint.every", "save_steps": "checkpoint.every",
    "mask_truncated_completions": "nothing: images have a fixed length, so every completion would be masked",
    "shuffle_dataset": "data.shuffle", "remove_unused_columns": "nothing (the metadata column must reach rewards)",
    "disable_tqdm": "logging.progress",
    "fsdp": "distributed.strategy", "fsdp_config": "distributed.fsdp",
}


@dataclass
class DataConfig:
    """Prompt sets: 'shapes:<split>' (generated), a .jsonl (one object a line with a 'prompt'; GenEval rows carry
    tag/include for GenEval-style rewards) or a .txt (one caption a line)."""

    train_prompts: str | None = field(default=None, metadata={"help": "training prompts: shapes:train, .jsonl, .txt"})
    eval_prompts: str | None = field(default=None, metadata={"help": "held-out prompts for evaluation"})
    shapes_per_tag: int = field(default=200, metadata={"help": "'shapes:<split>' training prompts per tag"})
    shapes_seed: int = field(default=0, metadata={"help": "'shapes:<split>' prompt set seed"})
    shuffle: bool = field(default=True, metadata={"help": "reshuffle the prompts every epoch (seeded)"})
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N training prompts"})
    tag_weights: dict = field(
        default_factory=dict,
        metadata={"help": "how often each GenEval tag's training prompts are drawn, relative to the file (tags not "
                          "named: 1), e.g. {single_object: 0.25}: a quarter of that tag's rows, in file order; "
                          "2: each row twice; {} = every row once per epoch"})

    def __post_init__(self):
        for tag, w in self.tag_weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise ValueError(f"data.tag_weights.{tag}: expected a number >= 0, got {w!r}")


# GRPOSection fields that are argrpo's and never reach TRL's GRPOConfig
NOT_TRL_FIELDS = ("trl", "skip_zero_advantage")


@dataclass
class GRPOSection:
    """TRL GRPOConfig fields (same names, same meaning; see TRL's docs). Any other GRPOConfig field goes in `trl`;
    the fields in NOT_TRL_FIELDS are argrpo's."""

    loss_type: str = field(default="dapo", metadata={"help": f"TRL loss: {', '.join(LOSS_TYPES)}"})
    beta: float = field(default=0.0, metadata={"help": "KL (k3) weight against the reference policy (0: no KL)"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip range of the ratio"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper clip range (default: epsilon)"})
    delta: float | None = field(default=None, metadata={"help": "two-sided clipping bound (None: off)"})
    num_generations: int = field(default=8, metadata={"help": "G: samples per prompt (a group)"})
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group", metadata={"help": "divide advantages by the group std, the batch std, or nothing"})
    importance_sampling_level: Literal["token", "sequence"] = field(
        default="token", metadata={"help": "policy ratio per token or per sequence (GSPO)"})
    num_iterations: int = field(default=1, metadata={"help": "optimisation passes over each generation batch"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "completions per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "micro-batches per generation batch (default: gradient_accumulation_steps)"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "linear, cosine, constant, ..."})
    warmup_steps: float = field(default=0.0, metadata={"help": "warm-up steps (a value < 1 is a ratio)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer name (transformers)"})
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = field(
        default="sum_then_normalize", metadata={"help": "how several rewards are combined before advantages"})
    top_entropy_quantile: float = field(default=1.0, metadata={"help": "train only on the top-q entropy tokens"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus weight"})
    off_policy_mask_threshold: float | None = field(
        default=None, metadata={"help": "drop negative-advantage sequences whose KL to the sampler exceeds this"})
    use_bias_correction_kl: bool = field(default=False, metadata={"help": "importance-weight the KL term"})
    bf16: bool | Literal["auto"] = field(
        default=False,
        metadata={"help": "bfloat16 autocast for the learner. auto: on where the learner device runs bf16 natively "
                          "(a bf16 CUDA device, a CPU with AVX512-BF16 or AMX), off elsewhere, where it is emulated "
                          "and slower than float32; the run's saved config holds the resolved value"})
    skip_zero_advantage: bool | Literal["auto"] = field(
        default="auto",
        metadata={"help": "learn only on completions whose advantage is nonzero (argrpo's, not TRL's): a group whose "
                          "rewards all tie adds no policy gradient when beta and entropy_coef are 0, so its forward "
                          "and backward are skipped; each micro-batch then holds fewer completions. auto: on exactly "
                          "when beta and entropy_coef are 0; true with either term set is an error"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    trl: dict = field(default_factory=dict, metadata={"help": "any other GRPOConfig field, passed through"})

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type: unknown {self.loss_type!r}; TRL's losses: {list(LOSS_TYPES)}")
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations must be >= 2 (advantages are relative within a group of G "
                             f"samples), got {self.num_generations}")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_iterations", "max_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"grpo.{key} must be >= 1, got {getattr(self, key)}")
        if self.steps_per_generation is not None and self.steps_per_generation < 1:
            raise ValueError(f"grpo.steps_per_generation must be >= 1, got {self.steps_per_generation}")
        if self.global_generation_batch_size % self.num_generations:
            n = learner_processes()
            raise ValueError(
                f"grpo: the generation batch (per_device_train_batch_size {self.per_device_train_batch_size} x "
                f"steps_per_generation {self.steps_per_generation or self.gradient_accumulation_steps}"
                f"{f' x {n} learner processes' if n > 1 else ''} = {self.global_generation_batch_size} completions) "
                f"must be divisible by num_generations {self.num_generations}, so every prompt gets its whole group")
        if self.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {self.beta}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("grpo.epsilon and grpo.epsilon_high must be > 0")
        if self.learning_rate <= 0:
            raise ValueError(f"grpo.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(f"grpo.top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.skip_zero_advantage is True and (self.beta or self.entropy_coef):
            raise ValueError("grpo.skip_zero_advantage needs grpo.beta = 0 and grpo.entropy_coef = 0: the KL and "
                             "entropy terms give zero-advantage completions a gradient too (auto, the default, "
                             "turns it on only where it is valid)")
        check_trl_passthrough(self.trl)

    @property
    def skips_zero_advantage(self) -> bool:
        """Whether zero-advantage completions are left out of the learner's batches (``auto`` resolved)."""
        if self.skip_zero_advantage == "auto":
            # with a KL or entropy term a tied group still has a gradient, so skipping it would change the loss
            return not (self.beta or self.entropy_coef)
        return bool(self.skip_zero_advantage)

    @property
    def generation_batch_size(self) -> int:
        """Completions per generation on one process."""
        return self.per_device_train_batch_size * (self.steps_per_generation or self.gradient_accumulation_steps)

    @property
    def global_generation_batch_size(self) -> int:
        """Completions per generation over all learner processes (TRL's ``GRPOConfig.generation_batch_size``)."""
        return self.generation_batch_size * learner_processes()

    @property
    def prompts_per_generation(self) -> int:
        """Distinct prompts per generation over all learner processes (a prompt's group may span two of them)."""
        return self.global_generation_batch_size // self.num_generations


def learner_processes() -> int:
    """How many learner processes this run has: ``WORLD_SIZE``, which ``torch.distributed.run``, ``accelerate
    launch`` and DeepSpeed set for every process they start (1 when run directly). TRL's GRPOConfig counts
    processes the same way, so the batch arithmetic here agrees with TRL's."""
    import os

    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def check_trl_passthrough(extra: dict) -> None:
    from trl import GRPOConfig

    valid = {f.name for f in dataclasses.fields(GRPOConfig)}
    own = {f.name for f in dataclasses.fields(GRPOSection)}
    for key in extra:
        if key in MANAGED_TRL_FIELDS:
            raise ValueError(f"grpo.trl.{key}: set by argrpo from {MANAGED_TRL_FIELDS[key]}")
        if key in own:
            raise ValueError(f"grpo.trl.{key}: use grpo.{key}")
        if key not in valid:
            raise ValueError(f"grpo.trl.{key}: not a TRL GRPOConfig field")


@dataclass
class CorrectionConfig:
    """Importance-sampling correction: a per-token weight ``min(exp(old_logp - sampler_logp), cap)`` on the loss.

    The learner's ``old_logp`` comes from the weights it trains; the sampler logprob from the distribution the
    sample was actually drawn from (CFG, top-k/top-p, one-step-stale weights in async mode, another engine's
    numerics). TRL's own correction code does the work (its vLLM path); these are its settings.
    """

    mode: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={"help": "auto: applied when the sampler's distribution differs from the learner's (CFG, top-k/p, "
                          "async, a non-torch engine, a bf16 learner beside a float32 sampler); always; never"})
    level: str = field(default="token_truncate", metadata={"help": f"TRL mode: {', '.join(IS_MODES)}"})
    cap: float | None = field(default=2.0, metadata={"help": "upper bound (truncate) or mask threshold of the weight"})
    floor: float | None = field(default=None, metadata={"help": "lower bound of the weight (None: none)"})

    def __post_init__(self):
        if self.level not in IS_MODES:
            raise ValueError(f"correction.level: unknown {self.level!r}; known: {list(IS_MODES)}")
        if self.cap is not None and self.cap <= 0:
            raise ValueError(f"correction.cap must be > 0, got {self.cap}")
        if self.cap is not None and self.floor is not None and self.floor >= self.cap:
            raise ValueError(f"correction.floor {self.floor} must be below correction.cap {self.cap}")


@dataclass
class LoggingConfig:
    """Where metrics and pictures go. metrics.jsonl (one line per step) is always written."""

    report_to: list[str] = field(default_factory=lambda: ["tensorboard"],
                                 metadata={"help": "tensorboard and/or wandb ([] for neither)"})
    image_every: int = field(default=10, metadata={"help": "write an image grid every N steps (0: never)"})
    image_prompts: int = field(default=4, metadata={"help": "prompts (rows) in an image grid"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    run_name: str | None = field(default=None, metadata={"help": "W&B run name"})

    def __post_init__(self):
        bad = [r for r in self.report_to if r not in ("tensorboard", "wandb")]
        if bad:
            raise ValueError(f"logging.report_to: unknown {bad}; use 'tensorboard' and/or 'wandb'")
        require_at_least(self, "logging.", image_every=0, image_prompts=1)


@dataclass
class CheckpointConfig:
    """Resumable checkpoints under ``output_dir/checkpoints/step-N`` (policy in argrpo format + trainer state)."""

    every: int = field(default=0, metadata={"help": "save every N steps (0: only at the end)"})
    keep: int = field(default=2, metadata={"help": "keep the newest N step checkpoints (0: all)"})
    save_final: bool = field(default=True, metadata={"help": "save the final policy to output_dir/final"})

    def __post_init__(self):
        if self.every < 0 or self.keep < 0:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 0")


@dataclass
class EvalConfig:
    """Held-out GenEval-style evaluation (grpo.evaluate.evaluate) every N steps, logged as eval/score, eval/<tag>."""

    every: int = field(default=0, metadata={"help": "evaluate every N steps (0: never during training)"})
    at_start: bool = field(default=True, metadata={"help": "also evaluate before the first step (when every > 0)"})
    prompts: str | None = field(
        default=None, metadata={"help": "GenEval jsonl or 'shapes:<split>' (default: data.eval_prompts)"})
    shapes_per_tag: int = field(default=20, metadata={"help": "'shapes:<split>' prompts per tag"})
    shapes_seed: int = field(default=0, metadata={"help": "'shapes:<split>' prompt set seed"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N prompts"})
    settings: EvalSettings = field(default_factory=lambda: EvalSettings(progress=False),
                                   metadata={"help": "sampling and detector settings (pinned for comparability)"})

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit must be >= 1, got {self.limit}")


@dataclass
class GRPORunConfig:
    """A GRPO run: `argrpo grpo CONFIG [--set key=value ...] [--resume]`."""

    output_dir: str = field(default="runs/grpo", metadata={"help": "run directory (metrics, images, checkpoints)"})
    seed: int = field(default=0, metadata={"help": "seeds the data order, sampling and TRL"})
    threads: int | None = field(default=None, metadata={"help": "torch threads of the learner (default: env/cores)"})
    device: str = field(default="auto", metadata={"help": "learner device: auto, cpu, cuda"})
    budget_minutes: float | None = field(
        default=None, metadata={"help": "stop after this many minutes of training (None: run grpo.max_steps)"})
    budget_clock: Literal["wall", "cpu"] = field(
        default="wall", metadata={"help": "budget clock: wall time, or this process's CPU time (all its threads; "
                                          "robust when other jobs share the machine)"})
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata={"help": "the policy"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "rollouts"})
    rewards: list[RewardSpec] = field(default_factory=list, metadata={"help": "rewards and weights"})
    reward_actors: bool = field(default=False, metadata={"help": "score rewards on Ray actors, all concurrently"})
    reward_pool: RewardPoolConfig = field(default_factory=RewardPoolConfig,
                                          metadata={"help": "reward actors' resources (with reward_actors)"})
    ray_pending_timeout_s: float = field(
        default=600.0,
        metadata={"help": "seconds a rollout or reward actor may wait for a joined Ray cluster's resources before the "
                          "run fails (a warning names it every 30 s meanwhile; a local cluster too small for the "
                          "actors fails at once)"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "prompt sets"})
    grpo: GRPOSection = field(default_factory=GRPOSection, metadata={"help": "TRL GRPO settings"})
    correction: CorrectionConfig = field(default_factory=CorrectionConfig, metadata={"help": "IS correction"})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "logging"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "checkpoints"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "periodic evaluation"})
    distributed: DistributedConfig = field(
        default_factory=DistributedConfig,
        metadata={"help": "several learner processes: ddp (replicas) or fsdp (FSDP2 shards, see distributed.fsdp)"})

    def __post_init__(self):
        self.grpo.bf16 = resolve_bf16(self.grpo.bf16, resolve_device(self.device))
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        if self.ray_pending_timeout_s <= 0:
            raise ValueError(f"ray_pending_timeout_s must be > 0, got {self.ray_pending_timeout_s}")
        if not self.rewards:
            raise ValueError("rewards: at least one reward is needed (e.g. rewards: [{name: geneval_dense}])")
        keys = [r.key for r in self.rewards]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"rewards: {dup} appear twice; give one an alias")
        s = self.rollout.sampling
        if s.temperature <= 0:
            raise ValueError("rollout.sampling.temperature must be > 0 for GRPO (greedy samples of a group are "
                             "identical, so every advantage would be 0)")
        if s.n != 1:
            raise ValueError("rollout.sampling.n: leave it at 1; samples per prompt is grpo.num_generations")
        if s.jacobi:
            raise ValueError("rollout.sampling.jacobi is not supported for training rollouts")
        if self.policy.checkpoint is None:
            raise ValueError("policy.checkpoint: GRPO starts from a trained policy; name its directory")
        if self.eval.every and not (self.eval.prompts or self.data.eval_prompts):
            raise ValueError("eval.every > 0 needs eval.prompts or data.eval_prompts")

    @property
    def use_correction(self) -> bool:
        """Whether the importance-sampling correction is applied (see CorrectionConfig.mode)."""
        if self.correction.mode != "auto":
            return self.correction.mode == "always"
        s = self.rollout.sampling
        # a bf16-autocast learner scores float32 samples with other numerics: a small, systematic ratio drift
        learner_numerics = self.grpo.bf16 and self.policy.dtype == "float32"
        return (self.rollout.mode == "async" or self.rollout.engine != "torch" or s.use_cfg or s.top_k > 0
                or s.top_p < 1.0 or learner_numerics)

    def actor_requests(self) -> list[ActorRequest]:
        """The Ray actors this run creates (rollout workers, reward actors) and what each asks for."""
        requests = [self.rollout.actor_request()]
        if self.reward_actors:
            requests += self.reward_pool.actor_requests([r.key for r in self.rewards])
        return [r for r in requests if r.count > 0]

"""The training sections of the run configuration: the stage schedule, the KD loss, the optimizer,
the training loop and the Ray Train job.

Re-exported by ``pocl_core.config`` (import them from there) beside the data, model, scoring,
evaluation and storage sections of ``pocl_core.config_sections``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, model_validator

from pocl_core.config_sections import Seed, _Section


class CurriculumConfig(_Section):
    """The stage schedule.

    strategy: ``curriculum`` (easy → hard), ``anti`` (hard → easy), ``random`` (shuffled buckets),
    ``none`` (plain KD, the baseline: one stage over all the data with the same number of optimizer
    steps, hence the same sample budget, as the staged schedule, at ``baseline_temperature`` and
    ``baseline_kd_weight``).
    num_stages: K; stage s trains on buckets 0..s (cumulative). epochs_per_stage: passes over the
    stage's subset. temperatures / kd_weights: explicit per-stage lists; when absent, linear from
    temperature_start to temperature_end (kd_weight_start to kd_weight_end) over the stages.
    fresh_optimizer_per_stage: new AdamW and LR schedule at each stage (the reference recipe).
    shuffle_seed: seeds the within-stage shuffles and random buckets (like every seed here, an
    integer from 0 to 2^63 − 1).
    """

    strategy: Literal["curriculum", "anti", "random", "none"] = "curriculum"
    num_stages: int = Field(4, ge=1, le=64)
    epochs_per_stage: int = Field(1, ge=1)
    temperature_start: float = Field(1.0, gt=0.0)
    temperature_end: float = Field(2.0, gt=0.0)
    temperatures: Optional[list[float]] = None
    kd_weight_start: float = Field(0.7, ge=0.0, le=1.0)
    kd_weight_end: float = Field(1.0, ge=0.0, le=1.0)
    kd_weights: Optional[list[float]] = None
    fresh_optimizer_per_stage: bool = True
    shuffle_seed: Seed = 10
    baseline_temperature: float = Field(1.0, gt=0.0)
    baseline_kd_weight: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "CurriculumConfig":
        for name in ("temperatures", "kd_weights"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != self.num_stages:
                raise ValueError(
                    f"curriculum.{name} has {len(values)} values but curriculum.num_stages is "
                    f"{self.num_stages}"
                )
            if name == "temperatures" and any(not v > 0 for v in values):
                raise ValueError("curriculum.temperatures must all be > 0")
            if name == "kd_weights" and any(not 0.0 <= v <= 1.0 for v in values):  # NaN fails it too
                raise ValueError("curriculum.kd_weights must all lie in [0, 1]")
        return self


class LossConfig(_Section):
    """The KD divergence: ``name`` (fkl, rkl, jsd, tvd, skl, srkl, akl, gjsd) and its ``params``.

    temperature_scaling: ``t_squared`` (default) multiplies the divergence at temperature T by T²,
    for every loss alike; ``none`` leaves it bare (docs/losses.md, "Temperature: one rule").

    GKD on-policy mixing (see docs/losses.md and pocl_core/on_policy.py):
    on_policy_fraction: share of optimizer steps that train on responses the current student samples
    for the step's prompts instead of the dataset's (0 = off, the default; 1 = every step). Which steps
    is a function of (seed, global step), the same on every worker. On-policy steps need the live
    teacher (not train.use_teacher_cache) and use the divergence alone (no CE on the student's own
    tokens). on_policy_max_new_tokens: most tokens sampled per response (also capped by
    data.max_length). on_policy_temperature: sampling temperature (0 = greedy). replay_buffer_size:
    per-worker buffer of the N most recent generations (0 = none); with N > 0 an on-policy step
    trains on a uniform draw from the buffer after adding its fresh generations; N must be at least
    the per-worker batch (optim.global_batch_size / ray.num_workers).
    """

    ON_POLICY_FIELDS: ClassVar[tuple[str, ...]] = (
        "on_policy_fraction", "on_policy_max_new_tokens", "on_policy_temperature", "replay_buffer_size")

    name: str = "fkl"
    params: dict[str, Any] = Field(default_factory=dict)
    temperature_scaling: Literal["t_squared", "none"] = "t_squared"
    on_policy_fraction: float = Field(0.0, ge=0.0, le=1.0)
    on_policy_max_new_tokens: int = Field(256, gt=0)
    on_policy_temperature: float = Field(1.0, ge=0.0)
    replay_buffer_size: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        from pocl_core.losses.registry import resolve_loss  # imported here: it needs torch, the config does not

        try:
            resolve_loss(self.name, self.params)
        except ValueError as exc:
            raise ValueError(f"loss.name / loss.params: {exc}") from None
        if self.replay_buffer_size and not self.on_policy_fraction:
            raise ValueError(
                f"loss.replay_buffer_size ({self.replay_buffer_size}) keeps student generations, which only "
                "on-policy steps make: set loss.on_policy_fraction > 0 or loss.replay_buffer_size=0"
            )
        return self


class OptimConfig(_Section):
    """AdamW with cosine decay from ``lr`` to ``min_lr`` over each stage (over the whole run when
    ``curriculum.fresh_optimizer_per_stage`` is false).

    warmup_steps: optimizer steps of linear warm-up to ``lr`` before the cosine decay starts (0, the
    default: none); with a fresh optimizer per stage each stage warms up again. global_batch_size:
    samples per optimizer step over all workers; micro_batch_size: samples per forward pass on one
    worker (gradient accumulation fills the rest). grad_clip: max grad norm. weight_decay: AdamW's
    decoupled weight decay, on trainable matrices only (biases and norm weights get none).
    """

    lr: float = Field(1e-4, gt=0.0)
    min_lr: float = Field(1e-7, ge=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    global_batch_size: int = Field(8, gt=0)
    micro_batch_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) is above optim.lr ({self.lr}): the cosine schedule "
                             "would raise the learning rate through each stage")
        return self


class TrainConfig(_Section):
    """Training-loop mechanics (not the recipe).

    checkpoint_every_steps: also checkpoint every N optimizer steps inside a stage (0 = only at
    stage boundaries, which always checkpoint). keep_checkpoints: how many of the newest complete
    checkpoints a run keeps (None keeps all): Ray Train prunes during training, and the distill task
    removes the older ones it never registered (a killed attempt's, local mode's) when training ends.
    log_every_steps: optimizer steps per metrics window (a window also ends at each checkpoint, so a
    resumed run logs the rows of an uninterrupted one); rank 0 appends each window's means to
    ``train/metrics.jsonl``, which the distill task turns into log lines and its progress artifact
    (Ray Train itself gets a report only at checkpoints).
    freeze_embeddings: keep the student's input embedding (and a tied LM head) fixed: no gradient
    and no optimizer state for the largest matrix of a small student. autocast_dtype: run the
    student's forward under torch.autocast in that dtype (weights and optimizer stay float32; the
    teacher runs at ``models.teacher_dtype``); ``float16`` adds dynamic loss scaling (a GradScaler,
    checkpointed with the run), with ``ddp`` only.
    use_teacher_cache: distil from the top-k teacher logits stored by the scoring pass
    (``scoring.teacher_cache_topk`` > 0) instead of running the teacher at every step; the teacher
    is then never loaded by the workers. The cached teacher is the tempered teacher lumped onto its
    top-k columns plus one tail bucket, exact at every stage temperature (docs/losses.md).
    parallel_strategy: ``ddp`` (every worker holds the whole student; Ray Train's prepare_model) or
    ``fsdp`` (FSDP2: weights, gradients and optimizer state sharded across workers, one shard unit
    per transformer block; CUDA or CPU; needs ``ray.num_workers`` ≥ 1). Only rank 0 reads the
    weights (into host memory); the others build the model on the meta device and receive their
    shards, so no device holds the whole student (docs/operations.md §5).
    """

    checkpoint_every_steps: int = Field(0, ge=0)
    keep_checkpoints: Optional[int] = Field(None, ge=1)
    log_every_steps: int = Field(10, ge=1)
    freeze_embeddings: bool = False
    autocast_dtype: Literal["none", "bfloat16", "float16"] = "none"
    use_teacher_cache: bool = False
    parallel_strategy: Literal["ddp", "fsdp"] = "ddp"


class RayConfig(_Section):
    """Where and how wide the distillation job runs.

    address: an existing Ray cluster (``ray://`` or ``host:port``; ``auto``: the cluster ``ray start``
    began on this machine); None uses RAY_ADDRESS, else starts a fresh local Ray (never joins a
    running one unasked). num_workers: Ray Train workers (0 runs the loop in-process with no
    cluster, Ray Train's local mode: for debugging; every checkpoint is kept).
    use_gpu: one GPU per worker. max_failures: worker-group restarts from the last checkpoint.
    worker_niceness: Unix niceness of this run's Ray workers (training and scoring). Ray's own
    default is 15, below every other process on the node, Ray's included; with as many busy workers
    as cores, Ray's background work then preempts them, and a synchronous DDP step waits for the
    slowest. 0 (the default) runs them like any process; None leaves Ray's default.
    cpu_affinity: for CPU training workers (use_gpu false, num_workers ≥ 1): ``spread`` pins each
    worker to its own share of its node's cores (``pocl_core/cpu_affinity.py``); ``none`` leaves
    placement to the OS; ``auto`` (the default) is ``spread`` when the run uses a local Ray of its
    own (``address`` and RAY_ADDRESS unset, or ``local``; once Ray is up in the process, one it
    started) and ``none`` on a cluster, whose cores other jobs may share. Runs sharing one machine,
    each with its own local Ray, pin to the same shares: give them ``none``.
    train_log_level: the level of Ray Train's own log lines on the console (its ``ray.train`` loggers:
    ``INFO`` adds a line per report and checkpoint, process-group set-up and the like); its log files
    in the Ray session folder keep every level, and the run's own lines are not affected.
    collective_timeout_s: how long (seconds) a worker waits in one collective of the training's process
    group (gloo or NCCL) before it fails: the time-out of Ray Train's TorchConfig, 1800 by default.
    Workers wait in one while rank 0 picks the checkpoint to resume (downloading it from an object
    store and verifying it) and, under FSDP, while rank 0 loads the student: raise it for checkpoints
    that take longer than that to fetch.
    """

    address: Optional[str] = None
    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    max_failures: int = Field(0, ge=-1)
    worker_niceness: Optional[int] = Field(0, ge=0, le=19)
    cpu_affinity: Literal["auto", "spread", "none"] = "auto"
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    collective_timeout_s: int = Field(1800, gt=0)

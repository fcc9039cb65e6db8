"""The sections of the run configuration: one pydantic model per part of the pipeline.

``pocl_core.config.PoclConfig`` assembles them; import them from ``pocl_core.config``. Every model
forbids unknown keys, so a typo is an error naming the key.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A seed: what torch, numpy and the per-sample hashes all accept (0 ≤ seed < 2^63).
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]

Dtype = Literal["float32", "bfloat16", "float16"]


class _Section(BaseModel):
    # strict: YAML's true is not a count of 1, nor 1 a boolean (an int is still a valid float);
    # no .inf / .nan: no setting means them, and a bound like `gt=0` lets .inf (and a list's .nan) through
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelsConfig(_Section):
    """Which models distil into which.

    teacher / student: a local save_pretrained folder or a hub name. tokenizer: defaults to the
    student's. teacher_dtype: weights dtype of the teacher for scoring and distillation (the student
    trains in float32 with optional autocast). trust_remote_code stays False unless you vouch for the
    model code.
    """

    teacher: str = Field(min_length=1)
    student: str = Field(min_length=1)
    tokenizer: Optional[str] = Field(None, min_length=1)
    teacher_dtype: Dtype = "float32"
    trust_remote_code: bool = False

    @property
    def tokenizer_source(self) -> str:
        """Folder or hub name the shared tokenizer is loaded from: ``tokenizer``, else the student's."""
        return self.tokenizer or self.student


class DataConfig(_Section):
    """Training and held-out data.

    train_path: JSONL / Parquet file or Hugging Face dataset folder (``Dataset.save_to_disk``) with
    Dolly, Alpaca or ``prompt``/``response`` fields.
    eval_path: held-out file, sharing no sample (prompt and response) with train_path; when absent,
    ``eval_fraction`` of train_path is held out by a stable hash of the sample id.
    prompt_template: a format string whose ``{prompt}`` is replaced (a literal brace is ``{{``), or
    ``chat``: the tokenizer's chat template with one user turn and the assistant header.
    max_prompt_length / max_length: token limits. long_prompts: ``truncate`` cuts a longer prompt's
    own text from the left (keeps its end and the template's BOS, markers and response header); ``drop`` removes such samples at load time (counted in the log).
    on_bad_rows: ``error`` stops at the first unusable row (naming file and row); ``drop`` skips and
    counts them. max_train_samples / max_eval_samples: optional caps, applied after the split (first
    N by id hash).
    """

    train_path: str = Field(min_length=1)
    eval_path: Optional[str] = Field(None, min_length=1)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    max_prompt_length: int = Field(256, gt=0)
    max_length: int = Field(512, gt=1)
    long_prompts: Literal["truncate", "drop"] = "truncate"
    on_bad_rows: Literal["error", "drop"] = "error"
    max_train_samples: Optional[int] = Field(None, gt=0)
    max_eval_samples: Optional[int] = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.prompt_template != "chat" and "{prompt}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain '{prompt}' or be 'chat' (the tokenizer's chat template)")
        if self.prompt_template != "chat":
            try:
                self.prompt_template.format(prompt="")
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise ValueError(f"data.prompt_template is a Python format string whose only field is {{prompt}}, "
                                 f"and formatting it fails ({type(exc).__name__}: {exc}): write a literal brace "
                                 "as '{{' or '}}'") from None
        if self.eval_path is None and self.eval_fraction <= 0:
            raise ValueError("data.eval_fraction is 0 and there is no data.eval_path: the run would have no "
                             "held-out samples to evaluate; set data.eval_fraction > 0 (e.g. 0.1) or data.eval_path")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be below data.max_length "
                f"({self.max_length}) to leave room for the response"
            )
        return self


class SamplingConfig(_Section):
    """Decoding settings shared by scoring's and evaluation's generations.

    do_sample False decodes greedily (the sampling settings are then ignored); otherwise ancestral
    sampling at ``temperature`` with ``top_k`` (0: off) and ``top_p`` (1: off).
    no_repeat_ngram_size: 0 turns it off. max_new_tokens: generated tokens per prompt.
    ``pocl_core.sampling.decoding_kwargs`` turns them into ``generate``'s arguments.
    """

    do_sample: bool = True
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    no_repeat_ngram_size: int = Field(6, ge=0)
    max_new_tokens: int = Field(64, gt=0)


class ScoringGenerationConfig(SamplingConfig):
    """How generative measures (``rouge_l``) let the scoring model answer each prompt.

    Defaults are the authors' near-greedy decoding: sampling (``do_sample``) at ``temperature`` 0.01
    with ``top_k`` 0 and ``top_p`` 1 (both off) and ``no_repeat_ngram_size`` 6. ``do_sample`` False
    gives plain greedy decoding. max_new_tokens: generated tokens per prompt (the authors' max length
    512 minus max prompt 256). seed: the sampling seed; each sample draws from its own generator,
    seeded from it and the sample's id, so a value depends neither on the batch (``batch_size``, its
    other samples) nor on which shard ran first or on which worker.
    """

    temperature: float = Field(0.01, gt=0.0)
    max_new_tokens: int = Field(256, gt=0)
    seed: Seed = 10


class ScoringConfig(_Section):
    """Difficulty scoring (the measurer).

    model: which model scores the samples (``teacher`` or the initial ``student``).
    measures: measure names computed per sample: ``nll`` (mean response cross-entropy, nats/token)
    and ``rouge_l`` (ROUGE-L F1 of the model's own answer vs the reference; see ``generation``).
    fusion: ``single`` uses the first measure; ``rrf`` fuses the ranks by reciprocal rank fusion
    with constant ``rrf_k`` (the method: ``rrf`` over ``[nll, rouge_l]`` with k = 60); samples a
    measure ties share its mean rank, and equal fused scores are ordered by sample_id.
    batch_size: samples per forward pass. shard_size: samples per Parquet shard (the resume unit).
    num_workers: 1 scores in-process; more runs one Ray task per shard, at most this many at once
    (each loads the scoring model, so keep shards large enough to amortise that; one GPU per task
    when ``ray.use_gpu``). teacher_cache_topk: when > 0, the same teacher pass also stores the
    teacher's top-k logits, the full-row log-sum-exp and the tail's log-sum-exp at every curriculum
    temperature, at every response position, in ``teacher_cache/`` (needs ``model: teacher``); 0 turns
    the cache off.
    """

    model: Literal["teacher", "student"] = "teacher"
    measures: list[str] = Field(default_factory=lambda: ["nll"], min_length=1)
    fusion: Literal["single", "rrf"] = "single"
    rrf_k: int = Field(60, gt=0)
    batch_size: int = Field(8, gt=0)
    shard_size: int = Field(256, gt=0)
    generation: ScoringGenerationConfig = Field(default_factory=ScoringGenerationConfig)
    num_workers: int = Field(1, ge=1)
    teacher_cache_topk: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ScoringConfig":
        if len(set(self.measures)) != len(self.measures):
            raise ValueError(f"scoring.measures lists a measure twice: {self.measures}")
        from pocl_core.measures import MEASURES  # imported here: it needs torch, the config does not

        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown:
            raise ValueError(f"scoring.measures: unknown measure(s) {', '.join(map(repr, unknown))}; "
                             f"available: {', '.join(sorted(MEASURES))}")
        if self.teacher_cache_topk and self.model != "teacher":
            raise ValueError(
                f"scoring.teacher_cache_topk ({self.teacher_cache_topk}) caches the teacher's logits, but "
                f"scoring.model is '{self.model}': set scoring.model=teacher or scoring.teacher_cache_topk=0"
            )
        return self


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


class EvalConfig(SamplingConfig):
    """Held-out evaluation: ROUGE-L F1 (×100) of generations and mean response NLL.

    seeds: one sampled generation pass per seed (the mean is reported). do_sample False makes those
    passes greedy too. greedy: also one greedy pass (seed-independent), reported as its own ROUGE-L.
    do_sample/temperature/top_k/top_p/no_repeat_ngram_size/max_new_tokens: see SamplingConfig (the
    method's: temperature 1, no top-k/top-p, no repeated 6-grams; its answers run to 256 new tokens,
    as configs/paper.yaml sets; the default of 64 suits short answers). seeds must differ, and be one
    when do_sample is False.
    batch_size: prompts per generate call. at_stage_boundaries:
    also evaluate the student as it was at the end of every stage but the last (that one is the
    final student); training then saves those students under ``<run>/stages/``.
    """

    seeds: list[Seed] = Field(default_factory=lambda: [10], min_length=1)
    batch_size: int = Field(16, gt=0)
    greedy: bool = True
    at_stage_boundaries: bool = False

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"eval.seeds lists a seed twice: {self.seeds} (a repeated seed repeats the same pass)")
        if not self.do_sample and len(self.seeds) > 1:
            raise ValueError(f"eval.do_sample is false, so each of eval.seeds {self.seeds} would decode the same greedy "
                             f"pass: give one seed (eval.seeds=[{self.seeds[0]}]) or set eval.do_sample=true")
        return self


class StorageConfig(_Section):
    """Object-store settings for a ``runs_root`` URI (``s3://bucket/prefix``); unused for local folders.

    endpoint_url: an S3-compatible server (MinIO, Ceph, moto), e.g. ``http://10.0.0.5:9000``; None
    uses the ``AWS_ENDPOINT_URL_S3`` environment variable, else ``AWS_ENDPOINT_URL``, else AWS S3.
    region: None uses ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``. Credentials are
    never configured here: they come from the standard AWS environment variables or default chain
    (see ``pocl_core/storage.py``).
    model_cache_dir: local folder where models kept in a remote run folder (the final student) are
    downloaded before evaluation loads them (``<model_cache_dir>/s3/<bucket>/<key>``).
    """

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    model_cache_dir: str = Field(".cache/run-models", min_length=1)

    @model_validator(mode="after")
    def _local_cache(self) -> "StorageConfig":
        if "://" in self.model_cache_dir:
            raise ValueError(f"storage.model_cache_dir {self.model_cache_dir} must be a local folder (models of a "
                             "remote run folder are downloaded there to be loaded), not a URI")
        return self

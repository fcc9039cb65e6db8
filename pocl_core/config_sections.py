"""The sections of the run configuration: one pydantic model per part of the pipeline; here the
models, data, scoring, evaluation and storage sections, in ``pocl_core.config_training`` the
curriculum, loss, optimizer, training-loop and Ray sections.

``pocl_core.config.PoclConfig`` assembles them; import them from ``pocl_core.config``. Every model
forbids unknown keys, so a typo is an error naming the key.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

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

"""The Ray Train worker function: POCL curriculum distillation, stage by stage.

Read top to bottom: setup (config, data, models), resume (from the newest valid checkpoint), then
the stage loop (optimizer per stage, batches of the stage's buckets, micro-batch accumulation,
clipping, metrics), checkpointing at every stage boundary and every N steps.

Loss normalisation: each micro-batch's token-mean loss is weighted by its share of the response
tokens in the whole global batch (times the world size, since DDP averages gradients), so a step
is one token-mean over the global batch whatever the number of workers or micro-batches.

GKD on-policy mixing (``loss.on_policy_fraction`` > 0, ``pocl_core.on_policy``): on a step chosen by
(seed, global step), each worker swaps its samples' responses for the unwrapped student's own
samples before cutting micro-batches; the response-token count is then summed over workers, the
loss is the divergence alone (λ = 1), and the metrics window reports the share of such steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch

from pocl_core.checkpoint import Position, rng_state
from pocl_core.config import PoclConfig
from pocl_core.contracts import read_table
from pocl_core.cpu_affinity import pin_to_share
from pocl_core.data import table_to_samples
from pocl_core.gc_setup import gc_paused
from pocl_core.encoding import EncodedSample, collate, encode_sample, pad_id_of
from pocl_core.models import causal_lm_skeleton, load_causal_lm, load_tokenizer, warn_if_slow_dtype
from pocl_core.on_policy import OnPolicyMixer
from pocl_core.parallel import (all_ranks_succeed, grad_sync, load_optimizer_state, materialize_from_rank0,
                                same_structure_as_rank0, shard_fsdp, transformer_blocks)
from pocl_core.partition import bucket_sizes, stage_members
from pocl_core.sampling import stop_token_ids
from pocl_core.schedule import plan_stages, stage_batches
from pocl_core.storage import Location, append_text, location
from pocl_core.teacher_cache import TeacherCache
from pocl_core.train_step import ResponseLogitsLM, build_lr_scheduler, build_optimizer, distillation_losses
from pocl_core.vocab import check_vocab_compatible
from tasks.distill_checkpoints import report_checkpoint, save_stage_student
from tasks.distill_resume import restore_replay_buffer, restore_rng, resume_checkpoint

AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_report_lines(level: str) -> None:
    """Give ``ray.train_log_level`` to the logger of Ray Train's report lines ("Reporting training result
    ..." from every worker at every report): it is named after its source file rather than placed under
    ``ray.train``, so Ray Train's own LoggingConfig does not reach it. Nothing happens if Ray moves it."""
    try:
        from ray.train.v2._internal.execution import context as report_context
    except ImportError:
        return
    logging.getLogger(report_context.__file__).setLevel(level)


def distill_loop(loop_config: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker (``train_loop_per_worker``)."""
    cfg = PoclConfig.model_validate(loop_config["cfg"])
    quiet_report_lines(cfg.ray.train_log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    if loop_config.get("pin_cpus"):  # ray.cpu_affinity, resolved by the driver (never in local mode)
        cores = pin_to_share(ctx.get_local_rank(), ctx.get_local_world_size())
        # a log record, not print(): Ray Train forwards a worker's print() to the driver twice
        logging.getLogger("pocl").info(f"rank {rank}: pinned to CPU core(s) {cores}" if cores is not None else
                                       f"rank {rank}: CPU pinning is not available here; workers stay where the OS "
                                       "puts them")
    torch.manual_seed(cfg.seed)

    # --- setup: data in partition order, models, vocabulary check
    # in a worker process of the job's own, the collector paused meanwhile and what survives frozen: imports
    # and models live as long as the process (pocl_core.gc_setup); in local mode the process is the caller's
    with gc_paused() if not loop_config.get("in_process") else contextlib.nullcontext():
        tokenizer = load_tokenizer(cfg.models.tokenizer_source, cfg.models.trust_remote_code)
        samples = {s.sample_id: s for s in table_to_samples(read_table(loop_config["train_path"]))}
        part = read_table(loop_config["partition_path"]).to_pydict()
        encoded = [encode_sample(tokenizer, samples[i], cfg.data.prompt_template, cfg.data.max_prompt_length,
                                 cfg.data.max_length) for i in part["sample_id"]]
        buckets = np.asarray(part["bucket"])
        pad = pad_id_of(tokenizer)
        plans = plan_stages(cfg.curriculum, bucket_sizes(len(buckets), cfg.curriculum.num_stages),
                            cfg.optim.global_batch_size)

        # under FSDP rank 0 alone reads the student (and its checkpoints); the others receive their shards
        reads_weights = rank == 0 or cfg.train.parallel_strategy != "fsdp"
        # a rank that cannot load stops every rank (the others would wait for it in the next collective)
        student_lm = all_ranks_succeed(lambda: (load_causal_lm if reads_weights else causal_lm_skeleton)(
            cfg.models.student, "float32", cfg.models.trust_remote_code))
        if cfg.train.parallel_strategy == "fsdp" and world > 1 and not same_structure_as_rank0(student_lm):
            # e.g. weights saved untied while config.json ties them: loading unties them, a build from the
            # config does not
            logging.getLogger("pocl").warning(
                "rank %d: the student built from its config differs from the one rank 0 loaded (%s); this rank "
                "reads the whole student too", rank, cfg.models.student)
            student_lm = load_causal_lm(cfg.models.student, "float32", cfg.models.trust_remote_code)
        teacher, cache = _load_teacher(cfg, loop_config, device)
        if cache is not None:
            cache.check_temperatures([p.temperature for p in plans])
        teacher_width = cache.metadata["vocab_columns"] if cache is not None else \
            teacher.lm.get_output_embeddings().weight.shape[0]
        columns = check_vocab_compatible(load_tokenizer(cfg.models.teacher, cfg.models.trust_remote_code), tokenizer,
                                         teacher_width, student_lm.get_output_embeddings().weight.shape[0])
        if cfg.train.freeze_embeddings:
            student_lm.get_input_embeddings().weight.requires_grad_(False)

        # --- resume: the newest checkpoint that passes its checksums
        resumed = resume_checkpoint(loop_config, student_lm if reads_weights else None, cfg)
        position = resumed.position if resumed is not None else Position(0, 0, 0, 0)
        student = _wrap_student(cfg, ResponseLogitsLM(student_lm), device, rank)
        mixer = _on_policy_mixer(cfg, student, rank, tokenizer, pad, columns)
        if mixer is not None and mixer.buffer is not None and resumed is not None:
            restore_replay_buffer(mixer, resumed, rank, world)
        if cfg.train.autocast_dtype != "none":
            warn_if_slow_dtype(cfg.train.autocast_dtype, device)
        autocast = torch.autocast(device.type, dtype=AUTOCAST[cfg.train.autocast_dtype]) \
            if cfg.train.autocast_dtype != "none" else contextlib.nullcontext()
        # float16 gradients of small token shares underflow to 0 without loss scaling; a no-op otherwise
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.autocast_dtype == "float16")
        if resumed is not None and resumed.grad_scaler_state is not None and scaler.is_enabled():
            scaler.load_state_dict(resumed.grad_scaler_state)

    # --- the stage loop
    per_worker = cfg.optim.global_batch_size // world
    metrics_path = location(loop_config["metrics_path"])
    fault = loop_config.get("fault") or {}
    optimizer = scheduler = None
    global_step, samples_seen = position.global_step, position.samples_seen
    for plan in plans[position.stage:]:
        members = stage_members(buckets, max(plan.buckets))
        start = position.step_in_stage if plan.stage == position.stage else 0
        if optimizer is None or cfg.curriculum.fresh_optimizer_per_stage:
            optimizer = build_optimizer(student, cfg.optim)
            horizon = plan.num_steps if cfg.curriculum.fresh_optimizer_per_stage else sum(p.num_steps for p in plans)
            scheduler = build_lr_scheduler(optimizer, cfg.optim, horizon)
            if rank == 0 and start == 0 and cfg.optim.warmup_steps >= horizon:
                logging.getLogger("pocl").warning(
                    "optim.warmup_steps (%d) is not below the %d optimizer steps the LR schedule spans (stage %d): "
                    "the learning rate never reaches optim.lr's cosine decay; lower optim.warmup_steps",
                    cfg.optim.warmup_steps, horizon, plan.stage)
        if resumed is not None:  # the first stage after a resume: continue its optimizer, RNG streams
            if resumed.optimizer_state is not None:
                load_optimizer_state(student, optimizer, resumed.optimizer_state)
                scheduler.load_state_dict(resumed.scheduler_state)
            restore_rng(resumed, rank, world, device)
            resumed = None
        window = _Window()
        for step, idx in stage_batches(members, plan.num_steps, cfg.optim.global_batch_size,
                                       cfg.curriculum.shuffle_seed, plan.stage, start):
            t0 = time.perf_counter()
            global_tokens = sum(encoded[i].n_response for i in idx)
            local = [encoded[i] for i in idx[rank * per_worker:(rank + 1) * per_worker]]
            student.train()
            on_policy = False
            if mixer is not None:  # GKD: maybe replace the responses with the student's own
                with autocast:
                    local, on_policy = mixer.samples_for_step(global_step, local)
                if on_policy:
                    global_tokens = _sum_over_ranks(sum(e.n_response for e in local), world, device)
            kd_weight = 1.0 if on_policy else plan.kd_weight  # no CE on the student's own tokens
            micro = [local[j:j + cfg.optim.micro_batch_size] for j in range(0, len(local), cfg.optim.micro_batch_size)]
            for k, mb in enumerate(micro):
                batch = {n: t.to(device) for n, t in collate(mb, pad).items()}
                cached = None if cache is None else cache.sparse_for(
                    [e.sample_id for e in mb], device, n_positions=[e.n_response for e in mb])
                with grad_sync(student, enabled=k == len(micro) - 1 or world == 1):
                    with autocast:
                        losses = distillation_losses(student, teacher, batch, temperature=plan.temperature,
                                                     kd_weight=kd_weight, loss_name=cfg.loss.name,
                                                     loss_params=cfg.loss.params, vocab_columns=columns,
                                                     teacher_logits=cached,
                                                     temperature_scaling=cfg.loss.temperature_scaling)
                    share = losses.num_tokens / max(global_tokens, 1) * world
                    scaler.scale(losses.total * share).backward()
                window.add(losses, share / world, reference=not on_policy)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)  # skipped when a scaled float16 gradient overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            samples_seen += len(idx)
            window.tokens += global_tokens
            window.steps += 1
            window.on_policy_steps += int(on_policy)
            window.kd_weight_sum += kd_weight
            window.seconds += time.perf_counter() - t0
            done_stage = step + 1 == plan.num_steps
            every = cfg.train.checkpoint_every_steps
            checkpoint_now = done_stage or bool(every and (step + 1) % every == 0)
            # a window also ends at each checkpoint, so a run resumed there logs the same rows as one
            # that never stopped
            if checkpoint_now or (step + 1) % cfg.train.log_every_steps == 0:
                row = window.flush(world, device, stage=plan.stage, step_in_stage=step + 1, global_step=global_step,
                                   temperature=plan.temperature, lr=optimizer.param_groups[0]["lr"],
                                   samples_seen=samples_seen)
                if rank == 0:
                    _append_jsonl(metrics_path, row)
            if done_stage and cfg.eval.at_stage_boundaries and plan.stage < len(plans) - 1:
                save_stage_student(student, loop_config["run_dir"], plan.stage, loop_config["train_key"], rank)
            if checkpoint_now:
                nxt = Position(plan.stage + 1, 0, global_step, samples_seen) if done_stage else \
                    Position(plan.stage, step + 1, global_step, samples_seen)
                report_checkpoint(student, optimizer, scheduler, nxt, rank, loop_config["train_key"],
                                  {"stage": plan.stage, "global_step": global_step, "stage_done": done_stage},
                                  loop_config.get("checkpoints_in_place"), _gather_replay_buffers(mixer, world),
                                  _gather(rng_state(device), world),
                                  scaler.state_dict() if scaler.is_enabled() else None)
            _maybe_inject_fault(fault, global_step, rank)
        position = Position(plan.stage + 1, 0, global_step, samples_seen)


def _wrap_student(cfg: PoclConfig, model: ResponseLogitsLM, device: torch.device, rank: int) -> torch.nn.Module:
    """DDP through Ray Train's prepare_model, or FSDP2 sharding per transformer block (train.parallel_strategy).

    FSDP: ``model`` is on the CPU on rank 0 and on the meta device elsewhere; it is sharded unit by
    unit onto ``device``, then every rank receives its shard of rank 0's weights.
    """
    if cfg.train.parallel_strategy == "fsdp":
        weights = {k: v.detach() for k, v in model.state_dict().items()} if rank == 0 else None
        shard_fsdp(model, transformer_blocks(model.lm), device)
        materialize_from_rank0(model, weights, device)
        return model
    return ray.train.torch.prepare_model(model.to(device))


def _load_teacher(cfg: PoclConfig, loop_config: dict[str, Any],
                  device: torch.device) -> tuple[ResponseLogitsLM | None, TeacherCache | None]:
    """The live teacher (frozen, eval mode), or the scoring pass's top-k cache when configured."""
    if cfg.train.use_teacher_cache:
        return None, TeacherCache.load(loop_config["teacher_cache_dir"])
    lm = load_causal_lm(cfg.models.teacher, cfg.models.teacher_dtype, cfg.models.trust_remote_code, device)
    return ResponseLogitsLM(lm).eval().requires_grad_(False), None


def _on_policy_mixer(cfg: PoclConfig, student: torch.nn.Module, rank: int, tokenizer: Any, pad: int,
                     columns: int) -> OnPolicyMixer | None:
    """GKD on-policy mixing over the unwrapped student (no DDP hooks while sampling), or None when off."""
    if not cfg.loss.on_policy_fraction:
        return None
    inner = student.module.lm if hasattr(student, "module") else student.lm
    return OnPolicyMixer(inner, fraction=cfg.loss.on_policy_fraction, max_new_tokens=cfg.loss.on_policy_max_new_tokens,
                         temperature=cfg.loss.on_policy_temperature, replay_buffer_size=cfg.loss.replay_buffer_size,
                         seed=cfg.seed, rank=rank, max_length=cfg.data.max_length,
                         eos_id=stop_token_ids(inner, tokenizer), pad_id=pad, vocab_columns=columns)


def _gather(value: Any, world: int) -> list[Any]:
    """Every rank's ``value`` (picklable), indexed by rank (a collective: every rank calls it)."""
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _gather_replay_buffers(mixer: OnPolicyMixer | None, world: int) -> list[list[EncodedSample]] | None:
    """Every rank's GKD replay buffer, indexed by rank, or None without one (a collective: every rank calls it)."""
    if mixer is None or mixer.buffer is None:
        return None
    return _gather(mixer.buffer.items(), world)


def _sum_over_ranks(value: int, world: int, device: torch.device) -> int:
    """``value`` summed over all workers (a collective: every rank must call it)."""
    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(total)
    return int(total.item())


class _Window:
    """Running sums between two metric reports: this rank's token-weighted losses (weights are shares
    of the global batch's response tokens), steps, λ used, tokens and seconds."""

    def __init__(self) -> None:
        self.total = self.kd = self.ce = 0.0
        self.weight = self.ce_weight = 0.0
        self.tokens = 0
        self.seconds = 0.0
        self.steps = self.on_policy_steps = 0
        self.kd_weight_sum = 0.0

    def add(self, losses: Any, weight: float, reference: bool = True) -> None:
        """``reference``: the responses are the data's (not the student's own on-policy samples), so the
        step's CE is the reference cross-entropy that ``ce_loss`` reports."""
        self.total += losses.total.item() * weight
        self.kd += losses.kd.item() * weight
        self.weight += weight
        if reference:
            self.ce += losses.ce.item() * weight
            self.ce_weight += weight

    def flush(self, world: int, device: torch.device, **fields: Any) -> dict[str, Any]:
        """One ``TRAIN_METRICS_FIELDS`` row; the losses are summed over every rank first (a
        collective: every rank calls it at the same step), so they are global-batch token means."""
        sums = [self.total, self.kd, self.ce, self.weight, self.ce_weight]
        if world > 1:
            t = torch.tensor(sums, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            sums = t.tolist()
        total, kd, ce, weight, ce_weight = sums
        w = max(weight, 1e-12)
        row = {**fields, "kd_weight": self.kd_weight_sum / max(self.steps, 1), "loss": total / w, "kd_loss": kd / w,
               "ce_loss": ce / ce_weight if ce_weight > 0 else None,
               "tokens_per_s": self.tokens / max(self.seconds, 1e-9), "seconds": self.seconds,
               "on_policy_fraction": self.on_policy_steps / max(self.steps, 1)}
        self.__init__()
        return row


def _append_jsonl(path: Location, row: dict[str, Any]) -> None:
    append_text(path, json.dumps(row) + "\n")


def _maybe_inject_fault(fault: dict[str, Any], global_step: int, rank: int) -> None:
    """Fault injection for resilience tests (``POCL_FAULT_INJECT``, see tasks/distill.py).

    Fires once (a marker file records it) on rank 0 after ``at_global_step`` (and after that step's
    checkpoint, if it has one): ``raise`` raises, ``kill`` SIGKILLs the worker process, ``hang`` stops
    there for good (a test then kills the whole run at a known point).
    """
    if not fault or rank != 0 or global_step != fault["at_global_step"]:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(str(global_step))
    if fault.get("kind", "raise") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.get("kind") == "hang":
        while True:
            time.sleep(60)
    raise RuntimeError(f"injected fault at global step {global_step}")

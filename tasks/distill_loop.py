"""The Ray Train worker function: POCL curriculum distillation, stage by stage.

Read top to bottom: setup (config, data, models), resume (from Ray Train's latest checkpoint),
then the stage loop (optimizer per stage, batches of the stage's buckets, micro-batch
accumulation, clipping, metrics), checkpointing at every stage boundary and every N steps.

Loss normalisation: each micro-batch's token-mean loss is weighted by its share of the response
tokens in the whole global batch (times the world size, since DDP averages gradients), so the step
equals one token-mean over the global batch whatever the number of workers or micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch

from pocl_core.checkpoint import Position, load_checkpoint, save_checkpoint
from pocl_core.config import PoclConfig
from pocl_core.data import collate, encode_sample, pad_id_of, table_to_samples
from pocl_core.models import load_causal_lm, load_tokenizer
from pocl_core.partition import stage_members
from pocl_core.schedule import build_schedule, stage_batches, stage_num_steps
from pocl_core.train_step import ResponseLogitsLM, build_lr_scheduler, build_optimizer, distillation_losses
from pocl_core.vocab import check_vocab_compatible


def distill_loop(loop_config: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker (``train_loop_per_worker``)."""
    cfg = PoclConfig.model_validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)

    # --- setup: data ordered by the partition, models, vocabulary check
    tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.student, cfg.models.trust_remote_code)
    samples = {s.sample_id: s for s in table_to_samples(pq.read_table(loop_config["train_path"]))}
    part = pq.read_table(loop_config["partition_path"]).to_pydict()
    encoded = [encode_sample(tokenizer, samples[i], cfg.data.prompt_template, cfg.data.max_prompt_length,
                             cfg.data.max_length) for i in part["sample_id"]]
    buckets = np.asarray(part["bucket"])
    pad = pad_id_of(tokenizer)

    student_lm = load_causal_lm(cfg.models.student, "float32", cfg.models.trust_remote_code)
    teacher_lm = load_causal_lm(cfg.models.teacher, cfg.models.teacher_dtype, cfg.models.trust_remote_code, device)
    teacher_tok = load_tokenizer(cfg.models.teacher, cfg.models.trust_remote_code)
    columns = check_vocab_compatible(teacher_tok, tokenizer, teacher_lm.get_output_embeddings().weight.shape[0],
                                     student_lm.get_output_embeddings().weight.shape[0])
    teacher = ResponseLogitsLM(teacher_lm).eval().requires_grad_(False)

    # --- resume: the newest checkpoint Ray Train knows for this run (or an explicit one)
    checkpoint = ray.train.get_checkpoint()
    position, ckpt_dir = Position(0, 0, 0, 0), None
    if checkpoint is not None:
        ckpt_dir = tempfile.mkdtemp(prefix="pocl-resume-")
        with checkpoint.as_directory() as d:
            shutil.copytree(d, ckpt_dir, dirs_exist_ok=True)
        found = json.loads((Path(ckpt_dir) / "position.json").read_text()).get("train_key")
        if found != loop_config["train_key"]:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was written by a different training config (train_key {found}, "
                f"now {loop_config['train_key']}); use a new run_name to train with the new settings")
        position = load_checkpoint(ckpt_dir, model=student_lm)
    student = ray.train.torch.prepare_model(ResponseLogitsLM(student_lm.to(device)))

    # --- the stage loop
    schedule = build_schedule(cfg.curriculum)
    per_worker = cfg.optim.global_batch_size // world
    stage_sizes = [len(stage_members(buckets, p.stage)) for p in schedule]
    stage_steps = [stage_num_steps(n, p.epochs, cfg.optim.global_batch_size) for n, p in zip(stage_sizes, schedule)]
    optimizer = scheduler = None
    metrics_path = Path(loop_config["metrics_path"])
    global_step, samples_seen = position.global_step, position.samples_seen
    for plan in schedule[position.stage:]:
        members = stage_members(buckets, plan.stage)
        start = position.step_in_stage if plan.stage == position.stage else 0
        if optimizer is None or cfg.curriculum.fresh_optimizer_per_stage:
            optimizer = build_optimizer(student, cfg.optim)
            horizon = stage_steps[plan.stage] if cfg.curriculum.fresh_optimizer_per_stage else sum(stage_steps)
            scheduler = build_lr_scheduler(optimizer, cfg.optim, horizon)
        if ckpt_dir is not None and (start > 0 or not cfg.curriculum.fresh_optimizer_per_stage):
            load_checkpoint(ckpt_dir, optimizer=optimizer, scheduler=scheduler, restore_rng=True)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            ckpt_dir = None
        window = _Window()
        for step, idx in stage_batches(members, plan.epochs, cfg.optim.global_batch_size,
                                       cfg.curriculum.shuffle_seed, plan.stage, start):
            t0 = time.perf_counter()
            global_tokens = sum(encoded[i].n_response for i in idx)
            local = idx[rank * per_worker:(rank + 1) * per_worker]
            micro = [local[j:j + cfg.optim.micro_batch_size] for j in range(0, len(local), cfg.optim.micro_batch_size)]
            student.train()
            for k, mb in enumerate(micro):
                batch = {n: t.to(device) for n, t in collate([encoded[i] for i in mb], pad).items()}
                sync = contextlib.nullcontext() if k == len(micro) - 1 or world == 1 else student.no_sync()
                with sync:
                    losses = distillation_losses(student, teacher, batch, temperature=plan.temperature,
                                                 kd_weight=plan.kd_weight, loss_name=cfg.loss.name,
                                                 loss_params=cfg.loss.params, vocab_columns=columns)
                    share = losses.num_tokens / max(global_tokens, 1) * world
                    (losses.total * share).backward()
                window.add(losses, share / world)
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            samples_seen += len(idx)
            window.tokens += global_tokens
            window.seconds += time.perf_counter() - t0
            done_stage = step + 1 == stage_steps[plan.stage]
            if done_stage or (step + 1) % cfg.train.log_every_steps == 0:
                row = window.flush(stage=plan.stage, step_in_stage=step + 1, global_step=global_step,
                                   temperature=plan.temperature, kd_weight=plan.kd_weight,
                                   lr=optimizer.param_groups[0]["lr"], samples_seen=samples_seen)
                if rank == 0:
                    _append_jsonl(metrics_path, row)
            every = cfg.train.checkpoint_every_steps
            if done_stage or (every and (step + 1) % every == 0):
                nxt = Position(plan.stage + 1, 0, global_step, samples_seen) if done_stage else \
                    Position(plan.stage, step + 1, global_step, samples_seen)
                _report_checkpoint(student, optimizer, scheduler, nxt, rank, loop_config["train_key"],
                                   {"stage": plan.stage, "global_step": global_step, "stage_done": done_stage})
        position = Position(plan.stage + 1, 0, global_step, samples_seen)


class _Window:
    """Token-weighted running means of the losses between two metric reports."""

    def __init__(self) -> None:
        self.total = self.kd = self.ce = 0.0
        self.weight = 0.0
        self.tokens = 0
        self.seconds = 0.0

    def add(self, losses: Any, weight: float) -> None:
        self.total += losses.total.item() * weight
        self.kd += losses.kd.item() * weight
        self.ce += losses.ce.item() * weight
        self.weight += weight

    def flush(self, **fields: Any) -> dict[str, Any]:
        w = max(self.weight, 1e-12)
        row = {**fields, "loss": self.total / w, "kd_loss": self.kd / w, "ce_loss": self.ce / w,
               "tokens_per_s": self.tokens / max(self.seconds, 1e-9)}
        self.__init__()
        return row


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _report_checkpoint(student: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, position: Position,
                       rank: int, train_key: str, metrics: dict[str, Any]) -> None:
    """Every rank reports (a collective); rank 0 attaches the checkpoint folder."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    folder = tempfile.mkdtemp(prefix="pocl-ckpt-")
    try:
        inner = student.module.lm if hasattr(student, "module") else student.lm
        save_checkpoint(folder, inner, optimizer, scheduler, position, extra={"train_key": train_key})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

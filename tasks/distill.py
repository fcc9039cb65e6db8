"""Task: run curriculum distillation as a Ray Train job and save the final student.

Ray Train storage is ``<run>/train`` with the fixed experiment name ``distill``: starting the flow
again with the same run name makes Ray Train resume from the newest checkpoint of that run, so
finished stages are not redone. In an ``s3://`` run folder, Ray Train gets the run folder's pyarrow
filesystem (``RunConfig(storage_path, storage_filesystem)``), so checkpoints are uploaded there.

The final checkpoint becomes ``<run>/student`` (save_pretrained, safetensors, with the tokenizer):
built in a local temporary folder, then renamed into place (local run folder) or uploaded with
``pocl_provenance.json`` last (object store): that file marks a complete student.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray
import torch
from prefect import task
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pocl_core.checkpoint import load_checkpoint
from pocl_core.config import ConfigError, LossConfig, PoclConfig, RayConfig
from pocl_core.contracts import STUDENT_PROVENANCE, RunPaths, StaleOutputError, read_metadata, read_table
from pocl_core.models import load_causal_lm, load_tokenizer, model_fingerprint, tokenizer_fingerprint, weights_digest
from pocl_core.partition import bucket_sizes
from pocl_core.schedule import num_trained_stages, plan_stages
from pocl_core.storage import Location, for_workers, location, ray_storage, write_dir_atomic
from pocl_core.teacher_cache import cache_shards
from tasks.common import task_logger
from tasks.distill_loop import distill_loop
from tasks.load_data import DatasetSplits
from tasks.run_checkpoints import (EXPERIMENT_NAME, foreign_checkpoints, list_checkpoints, named_as_stored,
                                   newest_verified_copy, prune_checkpoints)
from tasks.train_progress import MetricsFollower

PROVENANCE_FILE = STUDENT_PROVENANCE


def training_key(cfg: PoclConfig, data: DatasetSplits, partition_path: str, teacher_cache_dir: str | None = None) -> str:
    """Hash of everything the trained weights depend on (recipe, models, tokenizer, data, partition).

    With on-policy mixing off (``loss.on_policy_fraction`` 0) its other knobs change nothing, so they
    stay out of the hash: such runs keep their key whatever those knobs say. The parallel strategy
    enters only when it is not the default ``ddp`` (FSDP checkpoints store the optimizer differently);
    the live teacher's dtype only when it is not float32 (the cached teacher's is in the cache's
    provenance). A new setting's default stays out, so adding a setting does not change existing keys.
    Data enter by content, not path: a moved checkout keeps its keys.
    """
    recipe = cfg.model_dump(mode="json", include={"seed", "curriculum", "loss", "optim", "data"})
    for key in ("train_path", "eval_path"):  # the data enter by content (train_data); paths move with checkouts
        recipe["data"].pop(key)
    if not cfg.loss.on_policy_fraction:
        recipe["loss"] = {k: v for k, v in recipe["loss"].items() if k not in LossConfig.ON_POLICY_FIELDS}
    if cfg.loss.temperature_scaling == "t_squared":  # the default keeps the keys of runs made before the knob
        del recipe["loss"]["temperature_scaling"]
    partition_path = location(partition_path, cfg.storage)
    teacher_cache_dir = location(teacher_cache_dir, cfg.storage) if teacher_cache_dir else None
    blob = {
        "recipe": recipe,
        "teacher": model_fingerprint(cfg.models.teacher),
        "student": model_fingerprint(cfg.models.student),
        "tokenizer": tokenizer_fingerprint(cfg.models.tokenizer_source),
        "train_data": data.train_fingerprint,
        "partition": read_metadata(partition_path),
        "train_settings": cfg.train.model_dump(mode="json", include={"freeze_embeddings", "autocast_dtype",
                                                                      "use_teacher_cache"}),
        "teacher_cache": _cache_fingerprint(teacher_cache_dir) if cfg.train.use_teacher_cache else None,
    }
    if cfg.train.parallel_strategy != "ddp":  # its checkpoints' optimizer state has another layout
        blob["parallel_strategy"] = cfg.train.parallel_strategy
    if not cfg.train.use_teacher_cache and cfg.models.teacher_dtype != "float32":  # the live teacher's numerics
        blob["teacher_dtype"] = cfg.models.teacher_dtype
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _cache_fingerprint(folder: Location | None) -> dict:
    if folder is None:
        raise ValueError("train.use_teacher_cache is set but the scoring pass wrote no teacher cache")
    return {p.name: read_metadata(p) for p in cache_shards(folder)}


FAULT_KINDS = ("raise", "kill", "hang")


def fault_injection() -> dict | None:
    """The fault to inject into training, from ``POCL_FAULT_INJECT`` (for resilience tests).

    JSON like ``{"at_global_step": 3, "marker": "/tmp/fired", "kind": "raise"}``: rank 0 fails once
    after that step (``kill`` SIGKILLs the worker instead of raising, ``hang`` stops it there for
    good); the marker file makes it fire only once, so a restarted worker group runs through.
    """
    raw = os.environ.get("POCL_FAULT_INJECT")
    if not raw:
        return None
    fault = json.loads(raw)
    if not isinstance(fault, dict) or "at_global_step" not in fault or "marker" not in fault:
        raise ValueError(f"POCL_FAULT_INJECT must be a JSON object with at_global_step and marker, got {raw!r}")
    if fault.get("kind", "raise") not in FAULT_KINDS:
        raise ValueError(f"POCL_FAULT_INJECT kind must be one of {', '.join(FAULT_KINDS)}, got {fault['kind']!r}")
    return fault


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s)
# and a worker's ray.train.report() waits for the poll that collects the previous report, so with the
# default every checkpoint after the first costs ~2 s of training time and every fit() ends up to 2 s
# after its loop returns. 0.1 s makes both ~0.1 s for a few more small calls per second (measured in
# BENCHMARKS.md). A value set in the environment wins (raise it for clusters with many workers).
RAY_TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
# On a fresh local Ray no node is ever drained, so Ray Train's preemption watcher (an extra actor per
# fit, which also logs a core_worker error line at creation) has nothing to watch.
LOCAL_RAY_TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
WORKER_SETUP_HOOK = "tasks.ray_worker_setup.quiet_ray_train_helpers"
# Every Ray worker of the run's job: no tokenizer thread pools beside torch's, and no progress bars for
# model loads (a worker's stderr is a log forwarded to the driver, where each bar became one long line)
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def job_runtime_env() -> dict:
    """The runtime environment of every Ray job a run starts (``ensure_ray``): ``WORKER_ENV`` and the
    worker set-up hook. A new dict each call (Ray may fill in what it is given)."""
    return {"env_vars": dict(WORKER_ENV), "worker_process_setup_hook": WORKER_SETUP_HOOK}


def ray_address(address: str | None) -> str:
    """The Ray this run uses: ``address`` (``ray.address``), else RAY_ADDRESS, else ``local`` (a fresh
    local Ray started by ``ensure_ray``)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def ray_is_local(address: str | None) -> bool:
    """Whether the run's Ray is a fresh local one of this process's own (no other job on its cores).

    Once Ray is up in this process, the Ray in use decides, whatever ``address`` says (``ensure_ray``
    keeps a connection made earlier, e.g. from a notebook): local when this process started its head
    node. Before that, or where Ray does not tell, ``ray_address(address) == "local"``.
    """
    if ray.is_initialized():
        # Ray's own record of the node this process runs on; not a public API, hence the fallback
        head = getattr(getattr(ray._private.worker, "_global_node", None), "head", None)
        if isinstance(head, bool):
            return head
    return ray_address(address) == "local"


@contextmanager
def environment_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set the variables of ``values`` that this process's environment lacks, for the block only."""
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def ensure_ray(address: str | None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), or start a fresh local Ray when neither is set.

    Ray's own ``ray.init()`` without an address would join a cluster that ``ray start`` left running
    on this machine; here that takes ``address="auto"``.
    """
    if ray.is_initialized():
        return
    ray.init(address=ray_address(address), include_dashboard=False, log_to_driver=True, runtime_env=job_runtime_env())


def check_gpus(cfg: PoclConfig, needed: int, job: str) -> None:
    """With ray.use_gpu, a Ray that cannot hold ``needed`` GPUs for ``job``: a ConfigError on a local
    Ray (the job would wait for GPUs forever), a warning on a cluster (its autoscaler may still add them)."""
    if not cfg.ray.use_gpu:
        return
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus >= needed:
        return
    message = f"ray.use_gpu is true and {job} needs {needed} GPU(s), but the Ray cluster has {gpus}"
    if ray_is_local(cfg.ray.address):
        raise ConfigError(f"{message}: set ray.use_gpu=false, fewer workers, or ray.address of a GPU cluster")
    task_logger().warning("%s now: the job waits until the cluster has them (autoscaling)", message)


def check_ray_address(cfg: PoclConfig, timeout_s: float = 5.0) -> None:
    """ConfigError when the run's Ray (``ray_address``) is not an address ``ray.init`` takes (``local``,
    ``auto``, ``host:port``, ``scheme://...``), or is a ``host:port`` or ``ray://host:port`` that nothing
    answers on within ``timeout_s``: ``ray.init`` would fail or retry for minutes, after scoring. Other
    schemes' addresses and a Ray already initialised here are not checked."""
    address = ray_address(cfg.ray.address)
    if address in ("local", "auto") or ray.is_initialized():
        return
    source = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    scheme, has_scheme, rest = address.rpartition("://")
    host, sep, port = rest.rpartition(":")
    if not has_scheme and not (sep and host and port.isdigit()):
        raise ConfigError(f"{source} {address!r}: not a Ray address; give host:port (a `ray start --head` node, e.g. "
                          "127.0.0.1:6379), ray://host:port (Ray Client), auto (the cluster on this machine) or "
                          "local (a new Ray in this process)")
    if (has_scheme and scheme != "ray") or not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"{source} {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); start "
                          "the cluster (`ray start --head`) or fix the address (the ray_address parameter, "
                          "--ray-address, ray.address or RAY_ADDRESS)") from None


def check_local_gpus(cfg: PoclConfig) -> None:
    """Before any work: with ray.use_gpu on a local Ray (``ray_is_local``), a machine with fewer CUDA
    devices than training's workers need (one each; one in local mode) is a ConfigError. Without it,
    scoring in this process would fall back to the CPU with a warning and training would be refused
    only after it. A cluster's GPUs are checked when its jobs start (``check_gpus``)."""
    if not cfg.ray.use_gpu or not ray_is_local(cfg.ray.address):
        return
    needed, found = max(1, cfg.ray.num_workers), torch.cuda.device_count()
    if found < needed:
        raise ConfigError(f"ray.use_gpu is true and training with ray.num_workers={cfg.ray.num_workers} needs "
                          f"{needed} GPU(s) on this machine's local Ray, but CUDA sees {found}: set "
                          "ray.use_gpu=false, fewer workers, or ray.address of a GPU cluster")


def worker_runtime_env(cfg: RayConfig) -> dict:
    """The runtime environment of this run's Ray workers: their niceness (``ray.worker_niceness``)."""
    if cfg.worker_niceness is None:
        return {}
    return {"env_vars": {"RAY_worker_niceness": str(cfg.worker_niceness)}}  # read by the raylet at spawn


def pin_cpus(cfg: PoclConfig) -> bool:
    """Whether this run's CPU training workers pin themselves to their share of the cores
    (``ray.cpu_affinity``; ``auto``: only on a fresh local Ray, see ``ray_is_local``). Never in local mode,
    where the loop runs in this process."""
    if cfg.ray.use_gpu or cfg.ray.num_workers == 0 or cfg.ray.cpu_affinity == "none":
        return False
    return cfg.ray.cpu_affinity == "spread" or ray_is_local(cfg.ray.address)


@task(name="distill")
def distill(cfg: PoclConfig, data: DatasetSplits, partition_path: str, teacher_cache_dir: str | None = None) -> str:
    """Train (or resume) the curriculum and return the final student's folder.

    ``teacher_cache_dir``: the scoring pass's top-k teacher cache, used when train.use_teacher_cache.
    """
    log = task_logger()
    paths = RunPaths.of(cfg.run_dir, cfg.storage)
    key = training_key(cfg, data, partition_path, teacher_cache_dir)
    provenance_file = paths.student_provenance
    if provenance_file.is_file() and json.loads(provenance_file.read_text()).get("train_key") == key:
        log.info("reusing the trained student in %s", paths.student)
        return str(paths.student)

    foreign = foreign_checkpoints(paths.root, key)
    if foreign:
        raise StaleOutputError(
            f"{paths.train_storage} holds {len(foreign)} checkpoint(s) of another training config or other inputs "
            f"(e.g. {foreign[0].name}; this run's training key is {key}): resuming them would mix two trainings. "
            "Use a new run_name to train with the new settings")

    # ray.num_workers=0 is Ray Train's local mode: the loop runs in this process and needs no cluster.
    # Ray Train then keeps only a reference to each reported checkpoint, so the loop writes them
    # straight into the experiment folder (where resume looks for them).
    local_mode = cfg.ray.num_workers == 0
    if not local_mode:
        ensure_ray(cfg.ray.address)
        check_gpus(cfg, cfg.ray.num_workers, f"training with ray.num_workers={cfg.ray.num_workers}")
    trainer = TorchTrainer(
        distill_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "train_path": for_workers(paths.locate(data.train_path)),
            "partition_path": for_workers(paths.locate(partition_path)),
            "metrics_path": for_workers(paths.train_metrics),
            "train_key": key,
            "run_dir": for_workers(paths.root),
            "fault": fault_injection(),
            "teacher_cache_dir": for_workers(paths.locate(teacher_cache_dir)) if teacher_cache_dir else None,
            "checkpoints_in_place": for_workers(paths.train_storage / EXPERIMENT_NAME) if local_mode else None,
            "pin_cpus": pin_cpus(cfg),
            "in_process": local_mode,
        },
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu),
        torch_config=torch_config(cfg.ray),
        run_config=train_run_config(cfg, paths),
    )
    log.info("distilling with %d Ray Train worker(s), storage %s", cfg.ray.num_workers, paths.train_storage)
    # read from this process's environment by fit(), which passes them on to Ray Train's controller
    fit_env = {} if local_mode else \
        {**RAY_TRAIN_ENV_DEFAULTS, **(LOCAL_RAY_TRAIN_ENV_DEFAULTS if ray_is_local(cfg.ray.address) else {})}
    with environment_defaults(fit_env), MetricsFollower(paths.train_metrics, planned_steps(cfg, partition_path)):
        trainer.fit()
    # The newest valid checkpoint in storage, not only those Ray Train registered (result.checkpoint):
    # a run killed right after its final report leaves a complete checkpoint that Ray registers only
    # at its next poll; the retry resumes there, has no step left, and reports nothing more.
    # From an object store the checkpoint is downloaded once, verified in the local copy and saved from it.
    with tempfile.TemporaryDirectory(prefix="pocl-ckpt-") as tmp:
        found = newest_verified_copy(list(reversed(list_checkpoints(paths.root))),
                                     lambda: Path(tempfile.mkdtemp(dir=tmp)))
        if found is None:
            raise RuntimeError(f"distillation finished without a valid checkpoint in {paths.train_storage}")
        newest, local = found
        with named_as_stored(local, newest):
            save_student(cfg, str(local), paths.student, key, verified=True)
    log.info("final student saved to %s", paths.student)
    try:
        removed = prune_checkpoints(paths.root, newest, cfg.train.keep_checkpoints)
    except (OSError, ValueError) as exc:  # housekeeping: the student is saved, the run succeeded
        log.warning("could not prune the checkpoints in %s: %s", paths.train_storage, exc)
        removed = []
    if removed:
        log.info("removed %d checkpoint folder(s) beyond train.keep_checkpoints=%s or left by interrupted writes: %s",
                 len(removed), cfg.train.keep_checkpoints,
                 ", ".join(p.name for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
    return str(paths.student)


def torch_config(cfg: RayConfig) -> TorchConfig:
    """Ray Train's process-group settings for the run: the backend Ray Train picks (NCCL on GPUs, gloo
    on CPUs) and the collectives' time-out, ``ray.collective_timeout_s``."""
    return TorchConfig(timeout_s=cfg.collective_timeout_s)


def train_run_config(cfg: PoclConfig, paths: RunPaths) -> RunConfig:
    """Ray Train's RunConfig for the run: its storage (the run folder's ``train/``), checkpoints kept,
    worker-group restarts, the workers' runtime environment and Ray Train's console log level."""
    storage_path, storage_fs = ray_storage(paths.train_storage)
    return RunConfig(
        name=EXPERIMENT_NAME,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        worker_runtime_env=worker_runtime_env(cfg.ray),
        logging_config=LoggingConfig(log_level=cfg.ray.train_log_level),
    )


def planned_steps(cfg: PoclConfig, partition_path: str) -> int:
    """Optimizer steps of the whole schedule for this partition (every stage, all epochs)."""
    n = read_table(location(partition_path, cfg.storage)).num_rows
    plans = plan_stages(cfg.curriculum, bucket_sizes(n, cfg.curriculum.num_stages), cfg.optim.global_batch_size)
    return sum(p.num_steps for p in plans)


def save_student(cfg: PoclConfig, checkpoint_dir: str, out: Location, train_key: str, verified: bool = False) -> None:
    """Load a checkpoint's weights into the student architecture and save_pretrained it atomically.

    The checkpoint must be local, finished (its position past the last stage) and of ``train_key``;
    its checksums are verified unless ``verified`` says the caller just did.

    A local ``out`` is written beside itself and renamed into place; a remote one is built in a local
    temporary folder and uploaded, the provenance file last (``storage.write_dir_atomic``).
    """
    model = load_causal_lm(cfg.models.student, "float32", cfg.models.trust_remote_code)
    position = load_checkpoint(checkpoint_dir, model=model, verify=not verified)
    if position.stage < num_trained_stages(cfg.curriculum):
        raise RuntimeError(f"checkpoint {checkpoint_dir} is at stage {position.stage}, not finished")
    found = json.loads((Path(checkpoint_dir) / "position.json").read_text()).get("train_key")
    if found != train_key:
        raise RuntimeError(f"checkpoint {checkpoint_dir} has training key {found}, not this run's {train_key}")
    tokenizer = load_tokenizer(cfg.models.tokenizer_source, cfg.models.trust_remote_code)
    def build(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        # the weights' digest makes the provenance name these exact weights: a cached local copy of a
        # remote student (storage.fetch_dir) is reused only while the provenance bytes match
        provenance = {"train_key": train_key, "position": position.__dict__, "weights": weights_digest(folder)}
        (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))

    write_dir_atomic(out, build, last=PROVENANCE_FILE)

"""The POCL distillation flow: load → score → partition → distill (Ray Train) → evaluate → report.

Run it with ``pocl run --config configs/tiny.yaml [key=value ...]`` or
``python -m flows.pipeline --config configs/tiny.yaml [key=value ...]``. Starting it again with the
same run name reuses every finished step and resumes training from its newest checkpoint.

Parameters a person fills in the Prefect UI (see docs/operations.md): ``config_path``, ``overrides``
(dotted ``key=value`` strings), ``run_name``, ``ray_address`` (the override ``ray.address``) and
``resume`` (False refuses to start when the run folder already exists, unless this flow run created
it: a Retry re-runs the flow with the same parameters). A bad parameter (a ConfigError or DataError)
is logged as one message and re-raised without the library traceback; so is a rerun refused as
stale (StaleOutputError), with the settings that differ from the run's config.yaml named.

The run folder may be an ``s3://bucket/prefix`` URI (``runs_root``, with the ``storage`` section or
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` naming an S3-compatible endpoint): every task reads and
writes it through its pyarrow filesystem, and Ray Train keeps its checkpoints there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.logging.handlers import APILogHandler
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

from pocl_core.config import ConfigError, PoclConfig, load_config
from pocl_core.contracts import RunPaths, StaleOutputError, dotted_differences, write_text_atomic
from pocl_core.data import DataError, check_data_paths
from pocl_core.gc_setup import freeze_once
from pocl_core.model_checks import check_model_folders
from pocl_core.run_lock import RunLock, run_folder_lock
from pocl_core.storage import Location, ObjectPath, is_remote, location, remove_tree
from tasks.distill import check_local_gpus, check_ray_address, distill
from tasks.evaluate import evaluate
from tasks.load_data import load_dataset, read_splits
from tasks.partition import partition
from tasks.report import report
from tasks.score import score_difficulty


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    student: str
    report: str
    metrics: str


def resolve_config(config_path: Optional[str], overrides: Optional[list[str]], run_name: Optional[str],
                   ray_address: Optional[str] = None, resume: bool = True, verify_inputs: bool = True) -> PoclConfig:
    """The config file plus overrides; ``run_name`` and ``ray_address`` (when given) win over both.

    Both are quoted as YAML strings, so a name like ``007`` or an address like ``10.0.0.5:6379`` stays
    text. A run folder another live run holds (``run_lock``) is a RunFolderBusy (a ConfigError) naming
    that run. With ``resume=False`` an existing run folder is a ConfigError naming it, unless this flow run
    created it (a Retry of the flow run re-runs it from the top with ``resume=False``); for an ``s3://``
    run folder, a missing bucket or an unreachable store is a ConfigError too; so is a model folder
    or data file that is not there, and a data file a new run cannot use is a DataError
    (``check_data``; unless ``verify_inputs`` is False: the config alone is checked).
    """
    extra = list(overrides or [])
    if run_name:
        extra.append(f"run_name={json.dumps(expand_run_name(run_name))}")
    if ray_address:
        extra.append(f"ray.address={json.dumps(ray_address)}")
    cfg = load_config(config_path, extra).with_absolute_paths()
    run_dir = location(cfg.run_dir, cfg.storage)
    if isinstance(run_dir, ObjectPath):
        _check_bucket(run_dir, cfg)
    RunLock(RunPaths(run_dir), current_flow_run_id()).check()  # another live run writes that folder
    if not resume and run_dir.exists() and not started_by_this_flow_run(RunPaths(run_dir)):
        raise ConfigError(f"run folder {cfg.run_dir} already exists and resume is false: choose a new "
                          f"run_name (e.g. {cfg.run_name}-2), or set resume=true to continue that run")
    if verify_inputs:
        check_inputs(cfg)
        check_data(cfg)
    return cfg


def check_data(cfg: PoclConfig) -> None:
    """DataError for data files a new run cannot use (a bad row, an empty split, held-out samples that
    are also training samples), read as the run reads them, before any engine starts; skipped once
    the run folder holds its loaded data (the load step then reuses it or refuses changed files)."""
    if RunPaths.of(cfg.run_dir, cfg.storage).train_data.exists():
        return
    read_splits(cfg)  # kept for the load step of a flow in this process: the files are read once


SCHEDULED = "{scheduled}"


def expand_run_name(run_name: str) -> str:
    """``run_name`` with ``{scheduled}`` replaced by the flow run's scheduled start, UTC ``YYYYMMDD-HHMM``
    (outside a flow run: now). A schedule whose runs pass ``run_name: nightly-{scheduled}`` gives each
    run its own folder, and a Retry of one of them (same scheduled start) resumes that folder."""
    if SCHEDULED not in run_name:
        return run_name
    when = flow_run.scheduled_start_time
    return run_name.replace(SCHEDULED, when.astimezone(timezone.utc).strftime("%Y%m%d-%H%M"))


def current_flow_run_id() -> Optional[str]:
    """The id of the Prefect flow run this code runs in; None outside one (a ``.fn`` call)."""
    return flow_run.id


def started_by_this_flow_run(paths: RunPaths) -> bool:
    """True when the run folder records the current flow run as the one that created it."""
    current = current_flow_run_id()
    if current is None:
        return False
    try:
        return paths.flow_run_id.read_text().strip() == current
    except OSError:
        return False


def record_flow_run(paths: RunPaths, new: Optional[bool] = None) -> bool:
    """Record the current flow run's id in a run folder it creates (nothing outside a flow run), so a
    Retry of that flow run with ``resume=False`` accepts the folder; True when it recorded it.
    ``new``: whether this flow run made the folder (default: the folder does not exist yet)."""
    current = current_flow_run_id()
    new = not paths.root.exists() if new is None else new
    if current is None or not new:
        return False
    write_text_atomic(paths.flow_run_id, current + "\n")
    return True


def check_inputs(cfg: PoclConfig) -> None:
    """ConfigError for a model folder or data file that is not there (or a model folder the run cannot
    use, ``model_checks.check_model_folders``), a data path that is a URI
    (data files are read from the local disk; a model may be a hub id), a runs_root that is a file or
    where a new run folder cannot be created, GPUs a local Ray lacks (``check_local_gpus``), or a Ray
    address that is malformed or that nothing answers on (``check_ray_address``)."""
    check_local_gpus(cfg)
    check_ray_address(cfg)
    if not is_remote(cfg.runs_root):
        root = Path(cfg.runs_root)
        for folder in (root, *root.parents):  # the nearest one that exists must be a folder
            if folder.exists():
                if not folder.is_dir():
                    raise ConfigError(f"runs_root {root}: {folder} is a file, not a folder; runs are written under it")
                if not Path(cfg.run_dir).exists() and not os.access(folder, os.W_OK | os.X_OK):
                    raise ConfigError(f"runs_root {root}: cannot create the run folder {cfg.run_dir}, as {folder} is "
                                      "not writable; choose a runs_root you can write to")
                break
    check_model_folders(cfg, ("teacher", "student", "tokenizer"))
    check_data_paths(cfg.data)


def changed_settings(paths: RunPaths, cfg: PoclConfig) -> list[str]:
    """The settings of ``cfg`` that differ from the run folder's config.yaml (empty when it has none)."""
    try:
        ran = yaml.safe_load(paths.config.read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [f"{key}: {a!r} → {b!r}" for key, a, b in dotted_differences(ran, cfg.model_dump(mode="json"))]


def stale_hint(cfg: PoclConfig) -> str:
    """What to add to a StaleOutputError of ``cfg``'s run folder: the settings that differ from its config.yaml."""
    paths = RunPaths.of(cfg.run_dir, cfg.storage)
    changed = changed_settings(paths, cfg)
    if changed:
        return f". Settings that differ from {paths.config}: {', '.join(changed)}"
    if paths.config.is_file():
        return (f". No setting differs from {paths.config} (a changed input file, or a folder made by an earlier "
                "version)")
    return ""


@contextmanager
def removed_on_failure(folder: Location, new: Optional[bool] = None,
                       before_removal: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Remove ``folder`` when the block fails and the folder is ``new`` (default: it did not exist before
    the block), so a failed start leaves nothing behind; a failing removal is a warning (the block's
    error is the one to report). ``before_removal`` runs first (stopping the lock's renewals, which
    would otherwise write into the folder being removed)."""
    new = not folder.exists() if new is None else new
    try:
        yield
    except BaseException:
        if new:
            if before_removal is not None:
                before_removal()
            try:
                remove_tree(folder)
            except OSError as cleanup:
                logging.getLogger("pocl").warning("could not remove the new folder %s: %s", folder, cleanup)
        raise


def _check_bucket(run_dir: ObjectPath, cfg: PoclConfig) -> None:
    """ConfigError unless the run folder's bucket exists and answers."""
    bucket = run_dir.key.split("/")[0]
    where = cfg.storage.endpoint_url or "the endpoint of AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or AWS)"
    try:
        found = ObjectPath(run_dir.fs, bucket, run_dir.scheme).exists()
    except OSError as exc:
        raise ConfigError(f"runs_root {cfg.runs_root}: cannot reach the object store at {where} ({exc}); check "
                          f"storage.endpoint_url / AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the AWS "
                          "credentials") from None
    if not found:
        raise ConfigError(f"runs_root {cfg.runs_root}: bucket '{bucket}' not found at {where}; create it or "
                          f"fix runs_root / storage.endpoint_url")


@contextmanager
def parameter_errors_logged() -> Iterator[None]:
    """Turn a ConfigError/DataError into one error line in the run's logs and a short exception.

    The exception keeps its type (the ``pocl`` CLI prints it as ``error: ...``) but drops the chain
    and the library frames, so the UI shows the message rather than a traceback wall.
    """
    try:
        yield
    except (ConfigError, DataError, StaleOutputError) as exc:
        flow_logger().error(str(exc))
        raise type(exc)(str(exc)) from None


@contextmanager
def library_logs_in_run() -> Iterator[None]:
    """For the block, the ``pocl`` logger's records (warnings of the library and the tasks: dropped rows,
    skipped checkpoints, a taken-over run lock) also go to the flow run's logs in the Prefect UI, as
    Prefect's PREFECT_LOGGING_EXTRA_LOGGERS=pocl would (which is read only when Prefect starts)."""
    if FlowRunContext.get() is None:  # a `.fn` call: no run to send them to
        yield
        return
    pocl = logging.getLogger("pocl")
    added = [h for h in logging.getLogger("prefect.extra").handlers
             if isinstance(h, APILogHandler) and h not in pocl.handlers]
    for handler in added:
        pocl.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            pocl.removeHandler(handler)


def flow_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (shown in the UI), or a module logger outside a run (``pocl_distill.fn``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@flow(name="pocl-distill", log_prints=True)
def pocl_distill(config_path: str = "configs/tiny.yaml", overrides: Optional[list[str]] = None,
                 run_name: Optional[str] = None, ray_address: Optional[str] = None,
                 resume: bool = True) -> RunSummary:
    """Distil the configured teacher into the student with the POCL curriculum; returns the run's paths.

    config_path: YAML config (relative to the working directory). overrides: dotted ``key=value``
    strings. run_name: the run folder's name under runs_root (default: the config's); ``{scheduled}``
    in it becomes the flow run's scheduled start (``expand_run_name``). ray_address:
    an existing Ray cluster (default: RAY_ADDRESS, else a local Ray). resume: continue the run when
    its folder exists (False: refuse to start).
    """
    freeze_once()  # the imports' objects: later full collections (one at exit too) skip them
    with parameter_errors_logged():
        cfg = resolve_config(config_path, overrides, run_name, ray_address, resume)
        paths = RunPaths.of(cfg.run_dir, cfg.storage)
        fresh = not paths.root.exists()
        with library_logs_in_run(), run_folder_lock(paths, current_flow_run_id(), logger=flow_logger()) as lock:
            try:
                # nothing of the run exists before its data loaded: leave no folder that blocks a new run of that name
                with removed_on_failure(paths.root, new=fresh, before_removal=lock.stop_renewing):
                    record_flow_run(paths, new=fresh)  # after the lock: a start refused leaves the record alone
                    data = load_dataset(cfg)
                # config.yaml says what ran: a new run folder gets it once its data loaded; a rerun with
                # changed settings replaces it only after it passed every stale-output check and finished.
                if not paths.config.is_file():
                    write_text_atomic(paths.config, cfg.to_yaml())
                scores = score_difficulty(cfg, data)
                partition_path = partition(cfg, scores)
                student = distill(cfg, data, partition_path, scores.teacher_cache_dir)
                metrics = evaluate(cfg, data, student)
                report_path = report(cfg, metrics, partition_path)
            except StaleOutputError as exc:
                raise StaleOutputError(f"{exc}{stale_hint(cfg)}") from None
            if paths.config.read_text() != cfg.to_yaml():
                write_text_atomic(paths.config, cfg.to_yaml())
    return RunSummary(run_dir=str(paths.root), student=student, report=report_path, metrics=metrics)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))

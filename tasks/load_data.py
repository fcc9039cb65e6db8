"""Task: read the configured data files into the run folder's train/eval Parquet splits."""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefect import task

from pocl_core.config import PoclConfig
from pocl_core.contracts import SAMPLES_SCHEMA, RunPaths, check_provenance, read_metadata, write_table_atomic
from pocl_core.data import DataError, Splits, dataset_fingerprint, load_splits, samples_to_table
from pocl_core.fingerprints import path_fingerprint
from pocl_core.models import load_tokenizer, tokenizer_fingerprint
from tasks.common import task_logger


@dataclass(frozen=True)
class DatasetSplits:
    """Paths of the normalised splits and their fingerprints."""

    train_path: str
    eval_path: str
    train_fingerprint: str
    eval_fingerprint: str
    num_train: int
    num_eval: int


def _source_provenance(cfg: PoclConfig) -> dict:
    """What the loaded splits depend on: the data settings, the data files' contents, and the
    tokenizer when it decides which prompts are dropped (``data.long_prompts: drop``)."""
    files = {"train": _file_fingerprint(cfg.data.train_path)}
    if cfg.data.eval_path:
        files["eval"] = _file_fingerprint(cfg.data.eval_path)
    # the data settings without their paths (the files enter by content): a moved checkout still matches
    settings = cfg.data.model_dump(mode="json", exclude={"train_path", "eval_path"})
    provenance = {"source": settings, "source_files": files}
    if cfg.data.long_prompts == "drop":
        provenance["tokenizer"] = tokenizer_fingerprint(cfg.models.tokenizer_source)
    return provenance


def _file_fingerprint(path: str) -> str:
    try:
        return path_fingerprint(path)
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None


_last_read: tuple[str, Splits] | None = None  # this process's last read_splits: (its key, the splits)


def read_splits(cfg: PoclConfig) -> Splits:
    """The config's data files read as a new run reads them (``load_splits``: DataError for a bad row,
    an empty split, held-out samples that are also training samples).

    The last result is kept in this process, keyed by the data settings, the files' contents and
    (with ``data.long_prompts: drop``) the tokenizer, so a check before the run (``pocl run``, the
    flow) and the load step parse and tokenize the files once, and warn about dropped rows once.
    """
    global _last_read
    key = json.dumps(_source_provenance(cfg), sort_keys=True)
    if _last_read is not None and _last_read[0] == key:
        return _last_read[1]
    splits = load_splits(cfg.data, lambda: load_tokenizer(cfg.models.tokenizer_source, cfg.models.trust_remote_code))
    _last_read = (key, splits)
    return splits


@task(name="load-dataset")
def load_dataset(cfg: PoclConfig) -> DatasetSplits:
    """Write ``data/train.parquet`` and ``data/eval.parquet``; reuse them when the data config, the data
    files and (when it drops long prompts) the tokenizer are unchanged. Changed inputs under an existing
    run folder raise StaleOutputError: the run's later steps were built from the old data."""
    log = task_logger()
    paths = RunPaths.of(cfg.run_dir, cfg.storage)
    expected = _source_provenance(cfg)
    if check_provenance(paths.train_data, expected) and check_provenance(paths.eval_data, expected):
        meta_t, meta_e = read_metadata(paths.train_data), read_metadata(paths.eval_data)
        log.info("reusing loaded data in %s", paths.train_data.parent)
        return DatasetSplits(str(paths.train_data), str(paths.eval_data), meta_t["dataset_fingerprint"],
                             meta_e["dataset_fingerprint"], meta_t["num_samples"], meta_e["num_samples"])
    splits = read_splits(cfg)
    train, held = splits.train, splits.held
    if cfg.data.long_prompts == "drop":
        log.info("dropped %d train / %d held-out samples whose prompt exceeds data.max_prompt_length=%d tokens",
                 splits.long_train, splits.long_held, cfg.data.max_prompt_length)
    out = []
    for split, rows, path in (("train", train, paths.train_data), ("eval", held, paths.eval_data)):
        fp = dataset_fingerprint(rows)
        write_table_atomic(samples_to_table(rows), path, SAMPLES_SCHEMA,
                           {**expected, "dataset_fingerprint": fp, "num_samples": len(rows), "split": split})
        out.append(fp)
    log.info("loaded %d train / %d held-out samples (%d bad rows dropped)", len(train), len(held),
             splits.bad_rows)
    return DatasetSplits(str(paths.train_data), str(paths.eval_data), out[0], out[1], len(train), len(held))

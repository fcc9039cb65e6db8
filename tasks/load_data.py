"""Task: read the configured data files into the run folder's train/eval Parquet splits."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task

from pocl_core.config import PoclConfig
from pocl_core.contracts import SAMPLES_SCHEMA, RunPaths, check_provenance, read_metadata, write_table_atomic
from pocl_core.data import (DataError, cap_samples, dataset_fingerprint, drop_long_prompts, load_samples,
                            samples_to_table, shared_samples, split_holdout)
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


def _empty_split(cfg: PoclConfig, split: str, path: str, read: int, in_split: int, long_dropped: int) -> DataError:
    """The DataError for a split left without samples: the file, what was read and where it went."""
    what = "training" if split == "train" else "held-out"
    counts = [f"{read} samples read"]
    if not cfg.data.eval_path:
        counts.append(f"{in_split} of them in the {what} split (data.eval_fraction={cfg.data.eval_fraction})")
    if cfg.data.long_prompts == "drop" and in_split:
        counts.append(f"{long_dropped} of those dropped by data.long_prompts=drop (templated prompt longer than "
                      f"data.max_prompt_length={cfg.data.max_prompt_length} tokens)")
    if long_dropped:
        fix = "raise data.max_prompt_length or set data.long_prompts=truncate"
    elif split == "train":
        fix = "lower data.eval_fraction, or give the held-out samples their own file in data.eval_path"
    else:
        fix = "raise data.eval_fraction, or give the held-out samples their own file in data.eval_path"
    return DataError(f"{path}: no {what} samples left ({', '.join(counts)}); {fix}")


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
    samples, dropped = load_samples(cfg.data.train_path, cfg.data.on_bad_rows)
    if cfg.data.eval_path:
        train = samples
        held, dropped_eval = load_samples(cfg.data.eval_path, cfg.data.on_bad_rows)
        dropped += dropped_eval
        both = shared_samples(train, held)
        if both:
            raise DataError(f"{cfg.data.eval_path}: {len(both)} of its {len(held)} held-out samples are also in "
                            f"{cfg.data.train_path} (same prompt and response; the first is id {both[0].sample_id!r}): "
                            "a held-out score would include trained samples; remove them from one of the files")
        read_held = len(held)
    else:
        train, held = split_holdout(samples, cfg.data.eval_fraction)
        read_held = len(samples)
    split_train, split_held = len(train), len(held)
    long_train = long_held = 0
    if cfg.data.long_prompts == "drop":
        tokenizer = load_tokenizer(cfg.models.tokenizer_source, cfg.models.trust_remote_code)
        args = (tokenizer, cfg.data.prompt_template, cfg.data.max_prompt_length)
        (train, long_train), (held, long_held) = drop_long_prompts(train, *args), drop_long_prompts(held, *args)
        log.info("dropped %d train / %d held-out samples whose prompt exceeds data.max_prompt_length=%d tokens",
                 long_train, long_held, cfg.data.max_prompt_length)
    # the caps (> 0) never empty a split: an empty one lost its samples to the split or the long prompts
    train = cap_samples(train, cfg.data.max_train_samples)
    held = cap_samples(held, cfg.data.max_eval_samples)
    if not train:
        raise _empty_split(cfg, "train", cfg.data.train_path, len(samples), split_train, long_train)
    if not held:
        raise _empty_split(cfg, "eval", cfg.data.eval_path or cfg.data.train_path, read_held, split_held, long_held)
    out = []
    for split, rows, path in (("train", train, paths.train_data), ("eval", held, paths.eval_data)):
        fp = dataset_fingerprint(rows)
        write_table_atomic(samples_to_table(rows), path, SAMPLES_SCHEMA,
                           {**expected, "dataset_fingerprint": fp, "num_samples": len(rows), "split": split})
        out.append(fp)
    log.info("loaded %d train / %d held-out samples (%d bad rows dropped)", len(train), len(held), dropped)
    return DatasetSplits(str(paths.train_data), str(paths.eval_data), out[0], out[1], len(train), len(held))

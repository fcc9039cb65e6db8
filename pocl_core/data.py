"""Instruction data: loading records into samples, stable ids, the splits a run uses (tokenization and
batching: ``pocl_core.encoding``).

A sample is ``(sample_id, prompt, response)``. Loaders accept Dolly (``instruction``, ``context``,
``response``), Alpaca (``instruction``, ``input``, ``output``) and plain (``prompt``, ``response``)
records from JSONL, Parquet, or a Hugging Face dataset folder (``Dataset.save_to_disk``); an ``id`` or
``sample_id`` field is kept as the id (``sample_id`` first; a null one defers to ``id``), otherwise
the id is a hash of prompt + response. Bad rows
(unparseable, missing or non-string fields, empty texts, duplicate ids) name their file and row and
are either an error or dropped and counted (``on_bad_rows``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

BadRowPolicy = Literal["error", "drop"]
CHAT_TEMPLATE = "chat"
DROPPED_ROWS_SHOWN = 3  # dropped rows named in the warning of load_samples


class DataError(ValueError):
    """A data file or record is unusable; the message names the file and row."""


@dataclass(frozen=True)
class Sample:
    sample_id: str
    prompt: str
    response: str


def stable_sample_id(prompt: str, response: str) -> str:
    """A 16-hex-digit id from the content, stable across runs and machines."""
    return hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()[:16]


def _unicode_text(value: str, where: str, field: str) -> str:
    """``value`` if it encodes as UTF-8; JSON escapes can decode to lone surrogates (``"\\ud83d"``,
    half of an emoji cut by a scraper), which no UTF-8 writer accepts later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: field '{field}' is not valid Unicode text: a lone surrogate "
                        f"{value[exc.start]!r} at character {exc.start}") from None
    return value


def _record_to_sample(rec: Any, where: str) -> Sample:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record is not an object")

    def text(field: str, required: bool) -> str:
        value = rec.get(field)
        if value is None:
            if required:
                raise DataError(f"{where}: {'null' if field in rec else 'missing'} field '{field}'")
            return ""
        if isinstance(value, bytes):  # Parquet / Arrow binary columns
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: field '{field}' is not valid UTF-8 ({exc.reason})") from None
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        return _unicode_text(value, where, field)

    if "instruction" in rec and ("output" in rec or "input" in rec):  # Alpaca
        prompt, extra, response = text("instruction", True), text("input", False), text("output", True)
    elif "instruction" in rec:  # Dolly
        prompt, extra, response = text("instruction", True), text("context", False), text("response", True)
    elif "prompt" in rec:
        prompt, extra, response = text("prompt", True), "", text("response", True)
    else:
        raise DataError(
            f"{where}: no known fields (expected Dolly instruction/context/response, Alpaca "
            f"instruction/input/output, or prompt/response); found {sorted(rec)}"
        )
    if not prompt.strip():
        raise DataError(f"{where}: empty prompt/instruction")
    if not response.strip():
        raise DataError(f"{where}: empty response")
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    id_field = "sample_id" if rec.get("sample_id") is not None else "id"  # a null sample_id defers to id
    raw_id = rec.get(id_field)
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise DataError(f"{where}: id must be a string or integer, got {type(raw_id).__name__}")
    if isinstance(raw_id, str):
        _unicode_text(raw_id, where, id_field)
    sample_id = str(raw_id) if raw_id is not None else stable_sample_id(prompt, response)
    return Sample(sample_id, prompt, response)


def _is_hf_dataset_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _iter_hf_dataset(path: Path) -> Iterable[tuple[str, Any]]:
    """Rows of a ``datasets.Dataset.save_to_disk`` folder (``datasets`` is imported only here)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path}: a DatasetDict with splits {splits}; point the path at one split's folder "
                        f"(e.g. {path / (splits[0] if splits else 'train')})")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face dataset folder needs the 'datasets' package "
                        "(pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # corrupt or foreign folder: name it
        raise DataError(f"{path}: cannot read the Hugging Face dataset folder ({exc})") from None
    for i, rec in enumerate(ds):
        yield f"{path}: row {i}", rec


def _iter_records(path: Path) -> Iterable[tuple[str, Any]]:
    """(where, record) pairs; an unparseable row comes as a DataError record (the caller decides)."""
    if _is_hf_dataset_folder(path):
        yield from _iter_hf_dataset(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{path}:{lineno}"
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark some editors write
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    yield where, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    yield where, DataError(f"{where}: not valid UTF-8 ({exc.reason})")
                except json.JSONDecodeError as exc:
                    yield where, DataError(f"{where}: not valid JSON ({exc.msg})")
    elif suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read the Parquet file ({exc})") from None
        for i, rec in enumerate(table.to_pylist()):
            yield f"{path}: row {i}", rec
    elif path.is_dir():
        raise DataError(f"{path}: a folder but not a Hugging Face dataset folder (no dataset_info.json or "
                        "state.json from Dataset.save_to_disk)")
    else:
        raise DataError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .parquet or a folder "
                        "saved with datasets.Dataset.save_to_disk)")


def load_samples(path: str | Path, on_bad_rows: BadRowPolicy = "error") -> tuple[list[Sample], int]:
    """Read a JSONL file, Parquet file or Hugging Face dataset folder into samples.

    Returns (samples, number of dropped rows). With ``on_bad_rows='error'`` the first bad row raises
    DataError naming file and row; with ``'drop'`` bad rows are skipped, counted and the first few
    named in a warning (logger ``pocl``). Duplicate ids are bad rows (the first occurrence is kept).
    Zero usable samples is always an error; after dropping, it says why the first row was dropped.
    """
    if on_bad_rows not in ("error", "drop"):
        raise ValueError(f"on_bad_rows must be 'error' or 'drop', got {on_bad_rows!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    reasons: list[str] = []  # the first DROPPED_ROWS_SHOWN dropped rows' errors
    dropped = 0
    for where, rec in _iter_records(path):
        try:
            if isinstance(rec, DataError):
                raise rec
            sample = _record_to_sample(rec, where)
            if sample.sample_id in seen:
                raise DataError(f"{where}: duplicate sample id '{sample.sample_id}' (first at {seen[sample.sample_id]})")
        except DataError as exc:
            if on_bad_rows == "error":
                raise
            dropped += 1
            if len(reasons) < DROPPED_ROWS_SHOWN:
                reasons.append(str(exc))
            continue
        seen[sample.sample_id] = where
        samples.append(sample)
    if not samples:
        if not dropped:
            raise DataError(f"{path}: the file holds no rows")
        first = f"; the first: {reasons[0]}" if reasons else ""
        raise DataError(f"{path}: no usable samples ({dropped} bad rows dropped{first})")
    if dropped:
        more = f"; and {dropped - len(reasons)} more" if dropped > len(reasons) else ""
        logging.getLogger("pocl").warning("%s: dropped %d bad row(s) (data.on_bad_rows=drop): %s%s", path, dropped,
                                          "; ".join(reasons), more)
    return samples, dropped


def _unit_hash(sample_id: str) -> float:
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:12], 16) / float(16**12)


def split_holdout(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Split by a hash of the id (stable under reordering): returns (train, held_out)."""
    train = [s for s in samples if _unit_hash(s.sample_id) >= fraction]
    held = [s for s in samples if _unit_hash(s.sample_id) < fraction]
    return train, held


def relative_path_note(value: str) -> str:
    """Where a relative path was looked for (config paths start at the current directory, not at the
    config file); empty for an absolute path."""
    path = Path(value).expanduser()
    return "" if path.is_absolute() else f" (looked for {path.resolve()}: relative paths start at the current " \
        f"directory {Path.cwd()}, not at the config file; run from the repository root)"


def check_data_paths(data: Any) -> None:
    """ConfigError for a ``data.train_path`` / ``data.eval_path`` (of a ``DataConfig``) that is a URI
    (data files are read from the local disk) or is not there."""
    from pocl_core.config import ConfigError

    for key in ("train_path", "eval_path"):
        value = getattr(data, key)
        if value is not None and "://" in value:
            raise ConfigError(f"data.{key}: {value} is a URI, but data.{key} must be a local file path (JSONL, "
                              "Parquet or a saved dataset folder): copy the file to this machine and give its path")
        if value is not None and not Path(value).exists():
            raise ConfigError(f"data.{key}: {value} not found{relative_path_note(value)}")


def shared_samples(train: Sequence[Sample], held: Sequence[Sample]) -> list[Sample]:
    """The samples of ``held`` whose prompt and response both equal a sample's in ``train`` (ids aside:
    two files may number their rows alike)."""
    seen = {(s.prompt, s.response) for s in train}
    return [s for s in held if (s.prompt, s.response) in seen]


def cap_samples(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """Keep at most ``limit`` samples, chosen by id hash (independent of file order)."""
    if limit is None or len(samples) <= limit:
        return list(samples)
    return sorted(samples, key=lambda s: _unit_hash(s.sample_id))[:limit]


@dataclass(frozen=True)
class Splits:
    """The samples a run trains and evaluates on, and how many were dropped on the way."""

    train: list[Sample]
    held: list[Sample]
    bad_rows: int  # rows dropped by on_bad_rows=drop, both files together
    long_train: int  # training samples dropped by long_prompts=drop
    long_held: int  # held-out samples dropped by long_prompts=drop


def _empty_split(data: Any, split: str, path: str, read: int, in_split: int, long_dropped: int) -> DataError:
    """The DataError for a split left without samples: the file, what was read and where it went."""
    what = "training" if split == "train" else "held-out"
    counts = [f"{read} samples read"]
    if not data.eval_path:
        counts.append(f"{in_split} of them in the {what} split (data.eval_fraction={data.eval_fraction})")
    if data.long_prompts == "drop" and in_split:
        counts.append(f"{long_dropped} of those dropped by data.long_prompts=drop (templated prompt longer than "
                      f"data.max_prompt_length={data.max_prompt_length} tokens)")
    if long_dropped:
        fix = "raise data.max_prompt_length or set data.long_prompts=truncate"
    elif split == "train":
        fix = "lower data.eval_fraction, or give the held-out samples their own file in data.eval_path"
    else:
        fix = "raise data.eval_fraction, or give the held-out samples their own file in data.eval_path"
    return DataError(f"{path}: no {what} samples left ({', '.join(counts)}); {fix}")


def load_splits(data: Any, tokenizer: Callable[[], Any]) -> Splits:
    """The training and held-out samples of a ``DataConfig``, as a run uses them.

    Reads ``train_path`` and ``eval_path`` (without one, holds out ``eval_fraction`` of the training
    file by id hash), refuses held-out samples that are also training samples, drops over-long
    prompts with ``long_prompts: drop`` (``tokenizer()`` is called only then) and applies the caps.
    DataError for a split left empty, naming the file, the counts and the setting to change.
    """
    samples, bad_rows = load_samples(data.train_path, data.on_bad_rows)
    if data.eval_path:
        train = samples
        held, bad_eval = load_samples(data.eval_path, data.on_bad_rows)
        bad_rows += bad_eval
        both = shared_samples(train, held)
        if both:
            raise DataError(f"{data.eval_path}: {len(both)} of its {len(held)} held-out samples are also in "
                            f"{data.train_path} (same prompt and response; the first is id {both[0].sample_id!r}): "
                            "a held-out score would include trained samples; remove them from one of the files")
        read_held = len(held)
    else:
        train, held = split_holdout(samples, data.eval_fraction)
        read_held = len(samples)
    split_train, split_held = len(train), len(held)
    long_train = long_held = 0
    if data.long_prompts == "drop":
        args = (tokenizer(), data.prompt_template, data.max_prompt_length)
        (train, long_train), (held, long_held) = drop_long_prompts(train, *args), drop_long_prompts(held, *args)
    # the caps (> 0) never empty a split: an empty one lost its samples to the split or the long prompts
    train = cap_samples(train, data.max_train_samples)
    held = cap_samples(held, data.max_eval_samples)
    if not train:
        raise _empty_split(data, "train", data.train_path, len(samples), split_train, long_train)
    if not held:
        raise _empty_split(data, "eval", data.eval_path or data.train_path, read_held, split_held, long_held)
    return Splits(train, held, bad_rows, long_train, long_held)


def samples_to_table(samples: Sequence[Sample]) -> pa.Table:
    return pa.table(
        {
            "sample_id": [s.sample_id for s in samples],
            "prompt": [s.prompt for s in samples],
            "response": [s.response for s in samples],
        }
    )


def table_to_samples(table: pa.Table) -> list[Sample]:
    cols = table.to_pydict()
    return [Sample(i, p, r) for i, p, r in zip(cols["sample_id"], cols["prompt"], cols["response"])]


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 (16 hex digits) of the samples' ids and texts in id order."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.sample_id):
        h.update(f"{s.sample_id}\x00{s.prompt}\x00{s.response}\x01".encode())
    return h.hexdigest()[:16]


def drop_long_prompts(samples: Sequence[Sample], tokenizer: Any, template: str,
                      max_prompt_length: int) -> tuple[list[Sample], int]:
    """Remove samples whose templated prompt has more than ``max_prompt_length`` tokens.

    Returns (kept samples in their order, number dropped). For ``data.long_prompts: drop``; the
    default ``truncate`` keeps every sample and left-truncates in ``encode_prompt``.
    """
    from pocl_core.encoding import prompt_ids  # encoding imports this module

    kept = [s for s in samples if len(prompt_ids(tokenizer, s.prompt, template)) <= max_prompt_length]
    return kept, len(samples) - len(kept)

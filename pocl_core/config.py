"""The one typed run configuration, loaded from YAML and overridden with dotted ``key=value`` pairs.

Every knob of a run lives here, grouped by the part of the pipeline that reads it. Unknown keys and
out-of-range values are rejected with the dotted name of the offending key (``ConfigError``).
The section models live in ``pocl_core/config_sections.py`` and ``config_training.py`` and are
re-exported here; the YAML dialect of files and override values (duplicate keys refused, YAML 1.2
numbers) in ``config_yaml.py``.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import re
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pocl_core import storage as run_storage
from pocl_core.config_sections import (  # noqa: F401  (re-exported: the config's public names)
    DataConfig,
    Dtype,
    EvalConfig,
    ModelsConfig,
    SamplingConfig,
    Seed,
    ScoringConfig,
    ScoringGenerationConfig,
    StorageConfig,
    _Section,
)
from pocl_core.config_training import (  # noqa: F401  (re-exported)
    CurriculumConfig,
    LossConfig,
    OptimConfig,
    RayConfig,
    TrainConfig,
)
from pocl_core.config_yaml import read_yaml, unshared


# A run's (or a comparison's) folder name under runs_root.
FOLDER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class PoclConfig(_Section):
    """A whole run. The run folder is ``<runs_root>/<run_name>``.

    run_name: the run folder's name. runs_root: a local folder (a ``file:///abs/path`` URI becomes
    its plain path), or ``s3://bucket/prefix`` for storage shared by every node (then the ``storage``
    section gives the endpoint and region; see docs/operations.md). seed: the training seed: torch's
    RNG on every worker when training starts (dropout) and the GKD on-policy draws (which steps are
    on-policy, the student's sampled generations); ``pocl compare --seeds`` sets it per variant, with
    ``curriculum.shuffle_seed``.
    """

    run_name: str = Field("pocl-run", min_length=1, pattern=FOLDER_NAME)
    runs_root: str = Field("runs", min_length=1)
    seed: Seed = 10
    models: ModelsConfig
    data: DataConfig
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check(self) -> "PoclConfig":
        workers = max(self.ray.num_workers, 1)
        per_worker = self.optim.global_batch_size // workers
        if self.optim.global_batch_size % workers:
            raise ValueError(
                f"optim.global_batch_size ({self.optim.global_batch_size}) must be a multiple of "
                f"ray.num_workers ({self.ray.num_workers})"
            )
        if per_worker % self.optim.micro_batch_size:
            raise ValueError(
                f"optim.global_batch_size / ray.num_workers ({per_worker}) must be a multiple of "
                f"optim.micro_batch_size ({self.optim.micro_batch_size})"
            )
        return self

    @model_validator(mode="after")
    def _check_parallel(self) -> "PoclConfig":
        if self.train.parallel_strategy == "fsdp" and self.ray.num_workers == 0:
            raise ValueError("train.parallel_strategy=fsdp shards the student across Ray Train workers, but "
                             "ray.num_workers=0 trains in this process without any: set ray.num_workers >= 1 "
                             "or train.parallel_strategy=ddp")
        if self.train.parallel_strategy == "fsdp" and self.train.autocast_dtype == "float16":
            raise ValueError("train.autocast_dtype=float16 needs loss scaling, which is implemented for "
                             "train.parallel_strategy=ddp only: use train.autocast_dtype=bfloat16 with fsdp")
        return self

    @model_validator(mode="after")
    def _check_cache(self) -> "PoclConfig":
        if self.train.use_teacher_cache and not self.scoring.teacher_cache_topk:
            raise ValueError("train.use_teacher_cache needs the scoring pass to write the cache: set "
                             "scoring.teacher_cache_topk > 0 (e.g. 50)")
        return self

    @field_validator("runs_root")
    @classmethod
    def _local_file_uri(cls, value: str) -> str:
        """A ``file://`` URI names a local folder: keep its path (``file:///abs/dir`` -> ``/abs/dir``)."""
        if not value.startswith("file://"):
            return value
        uri = urlsplit(value)
        if uri.netloc not in ("", "localhost") or not uri.path.startswith("/") or uri.query or uri.fragment:
            raise ValueError(f"runs_root {value}: a file:// URI must name an absolute local folder "
                             "(file:///abs/path); or give the plain path")
        return unquote(uri.path)

    @model_validator(mode="after")
    def _check_runs_root(self) -> "PoclConfig":
        if run_storage.is_remote(self.runs_root):
            try:
                run_storage.split_uri(self.runs_root)
            except ValueError as exc:
                raise ValueError(f"runs_root: {exc}") from None
        elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)", self.runs_root):
            scheme, _, rest = self.runs_root.partition(":/")
            fixed = f"{scheme}:///{rest}" if scheme.lower() == "file" else f"{scheme}://{rest}"  # file: no host
            raise ValueError(f"runs_root {self.runs_root}: a URI needs two slashes ({fixed}); a local "
                             "folder name has no ':/'")
        return self

    @model_validator(mode="after")
    def _check_on_policy(self) -> "PoclConfig":
        if not self.loss.on_policy_fraction:
            return self
        if self.train.parallel_strategy == "fsdp":
            raise ValueError(
                f"loss.on_policy_fraction ({self.loss.on_policy_fraction}) samples from the whole student on each "
                "worker, which train.parallel_strategy=fsdp shards: use parallel_strategy=ddp with on-policy mixing")
        if self.train.use_teacher_cache:
            raise ValueError(
                f"loss.on_policy_fraction ({self.loss.on_policy_fraction}) needs the live teacher on the "
                "student's generations, but train.use_teacher_cache only has the teacher's logits on the "
                "dataset's responses: set train.use_teacher_cache=false or loss.on_policy_fraction=0")
        per_worker = self.optim.global_batch_size // max(self.ray.num_workers, 1)
        if self.loss.replay_buffer_size and self.loss.replay_buffer_size < per_worker:
            raise ValueError(
                f"loss.replay_buffer_size ({self.loss.replay_buffer_size}) must hold at least one per-worker "
                f"batch (optim.global_batch_size / ray.num_workers = {per_worker}), or be 0")
        return self

    @property
    def run_dir(self) -> str:
        """The run folder, ``<runs_root>/<run_name>`` (a local path or an ``s3://`` URI)."""
        return run_storage.join(self.runs_root, self.run_name)

    def with_absolute_paths(self, base: str | Path | None = None) -> "PoclConfig":
        """A copy whose local paths are absolute (Ray workers run in another directory).

        Model fields change only when the path exists locally (otherwise they are hub names);
        data paths, runs_root and storage.model_cache_dir always do, unless they are URIs (``scheme://``).
        """
        root = Path(base) if base is not None else Path.cwd()

        def absolute(value: str | None, must_exist: bool) -> str | None:
            if value is None or "://" in value:
                return value
            p = Path(value).expanduser()
            if not p.is_absolute():
                p = root / p
            return str(p.resolve()) if (p.exists() or not must_exist) else value

        data = self.model_dump()
        for key in ("teacher", "student", "tokenizer"):
            data["models"][key] = absolute(data["models"][key], must_exist=True)
        for key in ("train_path", "eval_path"):
            data["data"][key] = absolute(data["data"][key], must_exist=False)
        data["runs_root"] = absolute(data["runs_root"], must_exist=False)
        data["storage"]["model_cache_dir"] = absolute(data["storage"]["model_cache_dir"], must_exist=False)
        return PoclConfig.model_validate(data)

    def fingerprint(self, *sections: str) -> str:
        """A short sha256 of the named sections (all when none), for provenance checks."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":  # a cross-field check: its message names the keys itself
            msg = str(e.get("ctx", {}).get("error", msg.removeprefix("Value error, ")))
            key = ""
        elif e["type"] == "string_pattern_mismatch" and key == "run_name":
            msg = (f"{e.get('input')!r} is not a folder name: use letters, digits, '.', '_' and '-', starting with "
                   "a letter or digit, at most 128 characters")
            if "{scheduled}" in str(e.get("input")):
                msg += ("; {scheduled} is expanded only in `pocl run --run-name` and the flow's run_name parameter "
                        "(a deployment's), not in the config or an override")
        elif e["type"] == "string_type" and e.get("input") is None:
            msg += ": null here (null, ~ or None); quote it for the text, e.g. 'None'"
        elif e["type"] == "string_type" and isinstance(e.get("input"), (bool, int, float, datetime.date)):
            value = e["input"]
            shown = value.isoformat() if isinstance(value, datetime.date) else repr(value)
            last = e["loc"][-1]
            if isinstance(last, str) and last != "[key]":  # the setting itself
                hint = f"e.g. {last}: \"...\""
            else:  # an item of a list, or a key of a mapping: name the setting that holds it
                names = [i for i, p in enumerate(e["loc"]) if isinstance(p, str) and p != "[key]"]
                field = ".".join(str(p) for p in e["loc"][:names[-1] + 1]) if names else key
                hint = f"in {field}, write \"{shown}\""
            msg += f": YAML read the unquoted value as {type(value).__name__} {shown}; quote it to keep the text, {hint}"
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    old = node.get(parts[-1])
    if isinstance(value, dict) and isinstance(old, dict) and _is_section(dotted):
        _merge_section(old, value, dotted)  # ``optim={lr: 1e-3}`` keeps the section's other settings
    else:
        node[parts[-1]] = value


def _merge_section(node: dict[str, Any], value: dict[str, Any], dotted: str) -> None:
    """Set ``value``'s keys in the section ``node`` (named ``dotted``), recursing into sub-sections;
    free-form mappings such as ``loss.params`` are replaced, not merged."""
    for key, item in value.items():
        sub = f"{dotted}.{key}"
        if isinstance(item, dict) and isinstance(node.get(key), dict) and _is_section(sub):
            _merge_section(node[key], item, sub)
        else:
            node[key] = item


def _field(dotted: str) -> Any:
    """The pydantic field ``dotted`` names in PoclConfig (``optim.lr``), or None for an unknown key."""
    model: Any = PoclConfig
    field = None
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        model = field.annotation
    return field


def _is_section(dotted: str) -> bool:
    """True when ``dotted`` names a section of settings (``optim``, ``scoring.generation``)."""
    field = _field(dotted)
    return field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def _empty_sections_as_defaults(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``tree`` with every section left empty in YAML (``storage:`` with nothing under it, or all of its
    keys commented out: null) as an empty mapping, i.e. the section's defaults."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if value is None and isinstance(key, str) and _is_section(dotted):
            value = {}
        elif isinstance(value, dict) and isinstance(key, str) and _is_section(dotted):
            value = _empty_sections_as_defaults(value, f"{dotted}.")
        out[key] = value
    return out


def _is_text_field(dotted: str) -> bool:
    """True when ``dotted`` names a plain-text setting (``run_name``, ``models.teacher``, ...)."""
    field = _field(dotted)
    annotation = field.annotation if field is not None else None
    if get_origin(annotation) in (Union, UnionType):  # Optional[str]
        return [a for a in get_args(annotation) if a is not type(None)] == [str]
    return annotation is str


NULL_WORDS = ("null", "Null", "NULL", "~", "None")  # an override value that means null (Python's None too)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML scalars/lists (``3``, ``true``, ``[1,2]``),
    except for text settings (``run_name=007`` stays ``"007"``); a whole value of ``NULL_WORDS``
    (``null``, ``~``, ``None``) is None for every setting (quote it for the text: ``run_name='None'``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. curriculum.num_stages=3)")
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"override '{item}': the key '{key}' has an empty part; write sections and keys as "
                              "section.key (e.g. curriculum.num_stages=3)")
        if raw.strip() in NULL_WORDS:
            parsed.append((key, None))
            continue
        if _is_text_field(key) and not raw.strip()[:1] in ("'", '"'):
            parsed.append((key, raw.strip()))
            continue
        try:
            value = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value '{raw}': {exc}") from None
        parsed.append((key, value))
    return parsed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> PoclConfig:
    """Load a YAML config (or start from ``base``), apply dotted overrides, and validate.

    Raises ConfigError naming the file and the offending key.
    """
    tree: dict[str, Any] = copy.deepcopy(base or {})
    source = "<defaults>"
    if path is not None:
        source = str(path)
        if not str(path).strip():
            raise ConfigError("the config path is empty; give a YAML file (e.g. configs/tiny.yaml)")
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config {p} is a folder; give a YAML file (e.g. configs/tiny.yaml)")
        if p.exists() and not p.is_file():
            raise ConfigError(f"config {p} is not a regular file (a device or pipe); give a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = read_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            where = str(exc).replace('"<unicode string>"', f'"{p}"')  # the marks name the text, not the file
            raise ConfigError(f"{p}: not valid YAML: {where}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason}); a config is a YAML file") from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        try:
            tree.update(_empty_sections_as_defaults(unshared(loaded)))
        except ValueError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
        source += f" + {key}"
    return validate_config(tree, source)


def validate_config(tree: dict[str, Any], source: str = "<config>") -> PoclConfig:
    """``PoclConfig`` from a plain dict, or ConfigError naming ``source`` and the offending keys."""
    try:
        return PoclConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None

"""Compare POCL variants on one data set with one shared scoring pass.

    pocl compare --config configs/quickstart.yaml --strategies curriculum none --losses fkl rkl srkl \\
        --seeds 10 20 30 [key=value ...]

Layout under ``<runs_root>/<compare_name>/``: ``shared/`` holds the loaded data, the difficulty
scores (and teacher cache) and the evaluation of the teacher and the initial student, computed
once; each variant ``<strategy>-<loss>-s<seed>/`` holds its partition, training run, final student
and evaluation. ``comparison.md`` (also a Prefect artifact) tabulates mean ± std over seeds. Each
folder's ``config.yaml`` says what ran there: a rerun with other settings replaces it only once that
folder finished (one refused as stale leaves it as it was).
``runs_root`` may be an ``s3://`` URI, as for a single run.

Errors behave as in the single-run flow: a ConfigError or DataError is one logged message without the
library traceback; a rerun refused as stale names the settings that differ from the refused folder's
config.yaml; a comparison folder this call created is removed again when its data fails to load.
"""

from __future__ import annotations

import re
import shlex
import statistics
from dataclasses import dataclass
from typing import Any, Optional

from prefect import flow

from flows.pipeline import (check_data, check_inputs, current_flow_run_id, flow_logger, library_logs_in_run,
                            parameter_errors_logged, removed_on_failure, stale_hint)
from pocl_core.config import FOLDER_NAME, ConfigError, PoclConfig, load_config, parse_overrides, validate_config
from pocl_core.contracts import RunPaths, StaleOutputError, read_table, write_text_atomic
from pocl_core.losses.registry import LOSS_NAMES
from pocl_core.run_lock import RunLock, run_folder_lock
from pocl_core.storage import join, location
from tasks.common import publish_markdown, publish_table
from tasks.distill import distill
from tasks.evaluate import evaluate
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.score import score_difficulty


@dataclass(frozen=True)
class Variant:
    strategy: str
    loss: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.loss}-s{self.seed}"


def variant_config(base: PoclConfig, root: str, variant: Variant) -> PoclConfig:
    """The base config with the variant's strategy, loss and seed (model init and data order)."""
    data = base.model_dump()
    data.update(runs_root=str(root), run_name=variant.name, seed=variant.seed)
    data["curriculum"].update(strategy=variant.strategy, shuffle_seed=variant.seed)
    if variant.loss != base.loss.name:  # the base loss's params belong to it; other loss settings carry over
        data["loss"].update(name=variant.loss, params={})
    return validate_config(data, f"variant {variant.name}")


# Settings each variant sets itself, so an override of them would be silently replaced.
VARIANT_SETTINGS = {"run_name": "--name", "curriculum.strategy": "--strategies", "curriculum.shuffle_seed": "--seeds"}
COMPARE_NAME = re.compile(FOLDER_NAME)


def _dotted_keys(key: str, value: Any) -> list[str]:
    """The settings an override sets: ``key``, or for a mapping every dotted key beneath it."""
    if not isinstance(value, dict) or not value:
        return [key]
    return [k for sub, item in value.items() for k in _dotted_keys(f"{key}.{sub}", item)]


def check_compare_request(overrides: list[str], strategies: Optional[list[str]], losses: Optional[list[str]],
                          seeds: Optional[list[int]], compare_name: str) -> None:
    """ConfigError for what a comparison would otherwise ignore or misplace: an override of a setting
    the variants set (``VARIANT_SETTINGS``; ``seed`` too when ``seeds`` are given), a value listed
    twice, an unknown loss, a seed out of range, or a name that is not one folder."""
    for item in overrides:
        for key in _dotted_keys(*parse_overrides([item])[0]):  # curriculum={strategy: anti} sets one too
            if key in VARIANT_SETTINGS or (key == "seed" and seeds):
                raise ConfigError(f"override {item!r}: each variant sets {key} itself; use "
                                  f"{VARIANT_SETTINGS.get(key, '--seeds')}")
    for option, values in (("--strategies", strategies), ("--losses", losses), ("--seeds", seeds)):
        repeated = [v for i, v in enumerate(values or []) if v in (values or [])[:i]]
        if repeated:
            raise ConfigError(f"{option} lists {repeated[0]} more than once")
    unknown = [name for name in losses or [] if name not in LOSS_NAMES]
    if unknown:
        raise ConfigError(f"--losses {unknown[0]}: unknown KD loss; valid names: {', '.join(LOSS_NAMES)}")
    bad_seeds = [s for s in seeds or [] if not 0 <= s <= 2 ** 63 - 1]
    if bad_seeds:
        raise ConfigError(f"--seeds {bad_seeds[0]}: a seed is a whole number from 0 to 2^63 - 1")
    if not COMPARE_NAME.fullmatch(compare_name):  # fullmatch: `$` alone would let a final newline through
        raise ConfigError(f"comparison name {compare_name!r}: one folder name under runs_root, letters, digits, "
                          "'.', '_' and '-', starting with a letter or digit, at most 128 characters")


def check_shared_inputs(base: PoclConfig, compare_name: str) -> PoclConfig:
    """The config of the comparison's shared folder (``<runs_root>/<compare_name>/shared``: data, scores,
    reference evaluation), after the checks a run makes before any engine starts: no other live
    comparison holds the folder (``run_lock``), model folders, data
    files, GPUs and the Ray address (``check_inputs``), and for a new comparison what the data files hold
    (``check_data``)."""
    shared = PoclConfig.model_validate({**base.model_dump(), "runs_root": join(base.runs_root, compare_name),
                                        "run_name": "shared"})
    RunLock(RunPaths.of(shared.runs_root, base.storage), current_flow_run_id()).check()  # another live comparison
    check_inputs(shared)
    check_data(shared)
    return shared


def plan_variants(base: PoclConfig, strategies: Optional[list[str]], losses: Optional[list[str]],
                  seeds: Optional[list[int]]) -> list[Variant]:
    """Every (strategy × loss × seed) variant, each validated (ConfigError before any compute)."""
    variants = [Variant(s, loss, seed) for loss in (losses or [base.loss.name])
                for s in (strategies or ["curriculum", "none"]) for seed in (seeds or [base.seed])]
    for v in variants:
        variant_config(base, base.runs_root, v)
    return variants


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for one value); None when any value is missing."""
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds of final ROUGE-L (sampled, and greedy when present) and NLL, per (strategy, loss)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["loss"]), []).append(r)
    out = []
    for (strategy, loss), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rouge = _mean_std([r["rouge_l"] for r in rs])
        greedy = _mean_std([r.get("rouge_l_greedy") for r in rs])
        nll = _mean_std([r["nll"] for r in rs])
        out.append({"loss": loss, "strategy": strategy, "seeds": len(rs),
                    "rouge_l_mean": rouge[0], "rouge_l_std": rouge[1],
                    "rouge_l_greedy_mean": greedy[0], "rouge_l_greedy_std": greedy[1],
                    "nll_mean": nll[0], "nll_std": nll[1]})
    return out


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    return "–" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def compare_command(config_path: str, overrides: list[str], strategies: list[str], losses: list[str],
                    seeds: list[int], compare_name: str) -> str:
    """The ``pocl compare`` command line of a comparison, quoted for a shell (``'loss.params={alpha: 2}'``)."""
    return shlex.join(["pocl", "compare", "--config", config_path, "--strategies", *strategies, "--losses", *losses,
                       "--seeds", *map(str, seeds), "--name", compare_name, *overrides])


def render_comparison(name: str, reference: list[dict], summary: list[dict], command: str) -> str:
    """comparison.md: the command, the reference models, and mean ± std over seeds per (loss, strategy)."""
    lines = [f"# POCL comparison: `{name}`", "", f"Command: `{command}`", "", "## Reference models", "",
             "| model | ROUGE-L | greedy ROUGE-L | NLL |", "|---|---:|---:|---:|"]
    lines += [f"| {m['model']} | {m['rouge_l']:.2f} | {_num(m.get('rouge_l_greedy'))} | "
              f"{m['nll']:.3f} |" for m in reference]
    lines += ["", "## Final students (mean ± std over seeds)", "",
              "| loss | strategy | seeds | ROUGE-L (sampled) | greedy ROUGE-L | NLL |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {s['loss']} | {s['strategy']} | {s['seeds']} | {_pm(s['rouge_l_mean'], s['rouge_l_std'])} | "
              f"{_pm(s['rouge_l_greedy_mean'], s['rouge_l_greedy_std'])} | {_pm(s['nll_mean'], s['nll_std'], 3)} |"
              for s in summary]
    return "\n".join(lines) + "\n"


def record_config(cfg: PoclConfig, finished: bool = False) -> None:
    """Keep a folder's config.yaml saying what ran, as the single-run flow does: a folder without one
    gets it when its work starts (``shared/`` once its data loaded); a rerun with other settings
    replaces it only once that folder ``finished`` (so a rerun refused as stale leaves the settings
    that did run)."""
    path = RunPaths.of(cfg.run_dir, cfg.storage).config
    text = cfg.to_yaml()
    if not path.is_file() or (finished and path.read_text() != text):
        write_text_atomic(path, text)


@flow(name="pocl-compare", log_prints=True)
def pocl_compare(config_path: str = "configs/quickstart.yaml", overrides: Optional[list[str]] = None,
                 strategies: Optional[list[str]] = None, losses: Optional[list[str]] = None,
                 seeds: Optional[list[int]] = None, compare_name: str = "compare") -> str:
    """Train every (strategy × loss × seed) variant over one shared scoring pass; returns comparison.md.

    Each variant sets its run name, strategy, loss and seed (``seed`` and ``curriculum.shuffle_seed``);
    the config's ``seed`` and loss are the defaults of ``seeds`` and ``losses``; overriding the others
    is a ConfigError (see ``check_compare_request``)."""
    with parameter_errors_logged():
        check_compare_request(list(overrides or []), strategies, losses, seeds, compare_name)
        base = load_config(config_path, list(overrides or [])).with_absolute_paths()
        variants = plan_variants(base, strategies, losses, seeds)
        strategies, losses, seeds = ([*dict.fromkeys(getattr(v, f) for v in variants)]
                                     for f in ("strategy", "loss", "seed"))
        root = join(base.runs_root, compare_name)
        shared = check_shared_inputs(base, compare_name)
        current = shared  # the config of the folder being worked on
        root_paths = RunPaths.of(root, base.storage)
        shared_root = RunPaths.of(shared.run_dir, shared.storage).root
        fresh_root, fresh_shared = not root_paths.root.exists(), not shared_root.exists()
        with library_logs_in_run(), run_folder_lock(root_paths, current_flow_run_id(), logger=flow_logger()) as lock:
            try:
                # nothing of a new comparison exists before its data loaded: a data error leaves no new folder
                with removed_on_failure(root_paths.root, new=fresh_root, before_removal=lock.stop_renewing), \
                        removed_on_failure(shared_root, new=fresh_shared):
                    data = load_dataset(shared)
                record_config(shared)
                scores = score_difficulty(shared, data)
                reference_path = evaluate(shared, data, None, models={"teacher": base.models.teacher,
                                                                      "initial_student": base.models.student})
                record_config(shared, finished=True)
                rows = []
                for v in variants:
                    current = cfg = variant_config(base, root, v)
                    record_config(cfg)
                    student = distill(cfg, data, partition(cfg, scores), scores.teacher_cache_dir)
                    metrics_path = evaluate(cfg, data, student, models={"final_student": student})
                    record_config(cfg, finished=True)
                    metrics = read_table(location(metrics_path, cfg.storage)).to_pylist()[0]
                    rows.append({"strategy": v.strategy, "loss": v.loss, "seed": v.seed,
                                 "rouge_l": metrics["rouge_l"], "rouge_l_greedy": metrics["rouge_l_greedy"],
                                 "nll": metrics["nll"]})
            except StaleOutputError as exc:
                raise StaleOutputError(f"{exc}{stale_hint(current)}") from None
            summary = summarize(rows)
            command = compare_command(config_path, list(overrides or []), strategies, losses, seeds, compare_name)
            reference = read_table(location(reference_path, base.storage)).to_pylist()
            text = render_comparison(compare_name, reference, summary, command)
            out = write_text_atomic(location(join(root, "comparison.md"), base.storage), text)
            publish_markdown("pocl-comparison", text, f"POCL comparison {compare_name}")
            publish_table("pocl-comparison-runs", rows, "final ROUGE-L and NLL of every variant")
    return str(out)

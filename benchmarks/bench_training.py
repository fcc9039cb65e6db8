"""Training-loop benchmarks, measured side by side in one run (see BENCHMARKS.md).

1. curriculum vs plain KD (strategy ``none``) for the same number of optimizer steps: time per step
   and fit wall time, repeats interleaved (curriculum, plain, curriculum, plain, ...), medians;
2. 2 Ray Train workers vs 1 (CPU, one torch thread per worker): training throughput, on the
   quickstart workload (SmolLM2-135M-Instruct teacher's cached top-50 logits, 4-layer student cut
   from it) and on the toy models of 1;
3. cached teacher (the scoring pass's top-k logits, no teacher in memory) vs the live 135M teacher:
   time per step, for a 4-layer (the quickstart's) and a 2-layer student cut from the teacher; the
   four variants alternate, so each ratio's two sides ran at the same time.

2 and 3 need ``make quickstart-models`` (skipped with a message when the models are missing); the
2-layer student is cut into the benchmark's temporary folder.

Times per step are the loop's own compute (the ``seconds`` of train/metrics.jsonl: batches, forward,
backward, optimizer), which leaves out Ray Train's fixed start-up and the checkpoint writes; each
fit()'s wall time (start-up, checkpoints and shutdown included) is reported beside it. Toy models: a
4-layer/256-wide Llama teacher and a 2-layer/128-wide student built from config on the tiny data set.
Every variant of a comparison reuses one scoring pass and partition, so only the training differs.

Run: ``make bench-training`` (or ``python -m benchmarks.bench_training [--repeats N] [--json F]``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402

from pocl_core.config import load_config  # noqa: E402
from pocl_core.data import load_samples  # noqa: E402
from pocl_core.model_prep import build_layer_subset_student  # noqa: E402
from pocl_core.tiny import build_tiny_models  # noqa: E402
from tasks.distill import distill, job_runtime_env  # noqa: E402
from tasks.load_data import load_dataset  # noqa: E402
from tasks.partition import partition  # noqa: E402
from tasks.score import score_difficulty  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tiny" / "instructions.jsonl"
QUICKSTART_MODELS = REPO / ".cache" / "models"
TEACHER_135M = QUICKSTART_MODELS / "smollm2-135m-instruct"
STUDENT_4L = QUICKSTART_MODELS / "smollm2-4l-student"


class Workload:
    """One config, scored and partitioned once; ``fit`` trains a named variant of it."""

    def __init__(self, config: Path, root: Path, name: str, *overrides: str) -> None:
        self.config, self.root, self.name, self.overrides = config, root, name, list(overrides)
        cfg = self._cfg(f"{name}-scoring")
        self.data = load_dataset.fn(cfg)
        scores = score_difficulty.fn(cfg, self.data)
        self.partition = partition.fn(cfg, scores)
        self.cache_dir = scores.teacher_cache_dir

    def _cfg(self, run_name: str, *extra: str):
        # keep_checkpoints=1: a quickstart checkpoint is ~0.5 GB, and every variant writes several
        return load_config(self.config, [f"runs_root={self.root}", f"run_name={run_name}", "train.log_every_steps=1",
                                         "train.keep_checkpoints=1", *self.overrides, *extra]).with_absolute_paths()

    def fit(self, variant: str, *extra: str) -> dict:
        """Train ``variant`` (a fresh run folder each call); returns its step count and timings."""
        run_name = f"{self.name}-{variant}-{time.monotonic_ns()}"
        cfg = self._cfg(run_name, *extra)
        t0 = time.perf_counter()
        distill.fn(cfg, self.data, self.partition, self.cache_dir)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(cfg.run_dir) / "train" / "metrics.jsonl").read_text().splitlines()]
        steps = max(r["global_step"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        return {"variant": f"{self.name}/{variant}", "steps": steps, "loop_s": seconds, "fit_wall_s": wall,
                "s_per_step": seconds / steps, "median_step_s": statistics.median(r["seconds"] for r in rows),
                "response_tokens": round(sum(r["tokens_per_s"] * r["seconds"] for r in rows)),
                "samples_per_s": max(r["samples_seen"] for r in rows) / seconds, "load_avg": os.getloadavg()[0],
                "run_dir": cfg.run_dir}


def interleaved(pairs: list[tuple[Workload, str, tuple[str, ...]]], repeats: int) -> list[list[dict]]:
    """Run each (workload, variant, overrides) ``repeats`` times, alternating; results per pair."""
    results: list[list[dict]] = [[] for _ in pairs]
    for rep in range(repeats):
        for i, (workload, variant, extra) in enumerate(pairs):
            r = workload.fit(variant, *extra)
            r["repeat"] = rep + 1
            print(f"  {r['variant']:<28} repeat {rep + 1}: {r['steps']} steps, {r['s_per_step']:.4f} s/step, "
                  f"fit {r['fit_wall_s']:.1f} s (load {r['load_avg']:.1f})", flush=True)
            results[i].append(r)
    return results


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant (default 3)")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (deleted at the end otherwise)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="pocl-bench-train-"))
    samples, _ = load_samples(DATA)
    texts = [f"### Instruction:\n{s.prompt}\n\n### Response:\n{s.response}" for s in samples]
    toy_models = build_tiny_models(root / "models", texts, vocab_size=2048, teacher_layers=4, teacher_hidden=256,
                                   student_layers=2, student_hidden=128, teacher_warmup_steps=20)
    have_quickstart = all((m / "config.json").is_file() for m in (TEACHER_135M, STUDENT_4L))
    # the workers a flow's fresh local Ray starts (its env and set-up hook, ensure_ray), without their console lines
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=job_runtime_env())
    ratios: list[tuple[str, float, str, bool]] = []
    report: dict = {"repeats": args.repeats}
    try:
        toy = Workload(REPO / "configs" / "tiny.yaml", root, "toy", f"models.teacher={toy_models.teacher}",
                       f"models.student={toy_models.student}", f"data.train_path={DATA}", "curriculum.num_stages=4",
                       "curriculum.epochs_per_stage=2", "optim.global_batch_size=16", "optim.micro_batch_size=8")
        print("1. curriculum vs plain KD, toy models, 1 worker", flush=True)
        cur, plain = interleaved([(toy, "curriculum-1w", ("ray.num_workers=1",)),
                                  (toy, "plain-kd-1w", ("ray.num_workers=1", "curriculum.strategy=none"))], args.repeats)
        assert cur[0]["steps"] == plain[0]["steps"], "the baseline must run the same number of steps"
        per_step = median(cur, "s_per_step") / median(plain, "s_per_step")
        wall = median(cur, "fit_wall_s") / median(plain, "fit_wall_s")
        # The two schedules draw different samples, so a step need not carry the same number of tokens.
        per_token = statistics.median(r["loop_s"] / r["response_tokens"] for r in cur) / \
            statistics.median(r["loop_s"] / r["response_tokens"] for r in plain)
        ratios += [("curriculum / plain KD, time per step (median)", per_step, "<= 1.03", per_step <= 1.03),
                   ("curriculum / plain KD, fit wall time (median)", wall, "<= 1.03", wall <= 1.03),
                   ("curriculum / plain KD, time per response token (median)", per_token, "<= 1.03", per_token <= 1.03)]
        report["curriculum_vs_plain"] = {"curriculum": cur, "plain": plain}

        print("2. 2 workers vs 1, toy models", flush=True)
        toy2, = interleaved([(toy, "curriculum-2w", ("ray.num_workers=2",))], 1)
        toy_scaling = toy2[0]["samples_per_s"] / median(cur, "samples_per_s")
        ratios.append(("2 / 1 workers throughput, toy models (0.1 s steps)", toy_scaling, ">= 1.6", toy_scaling >= 1.6))
        report["toy_two_workers"] = toy2
        if have_quickstart:
            quick = Workload(REPO / "configs" / "quickstart.yaml", root, "quickstart", "data.max_train_samples=128",
                             "curriculum.num_stages=2", "train.use_teacher_cache=true")
            print("2. 2 workers vs 1, quickstart workload (135M teacher's cache, 4-layer student)", flush=True)
            one, two = interleaved([(quick, "cached-1w", ("ray.num_workers=1",)),
                                    (quick, "cached-2w", ("ray.num_workers=2",))], max(1, args.repeats - 1))
            scaling = median(two, "samples_per_s") / median(one, "samples_per_s")
            ratios.append(("2 / 1 workers throughput, quickstart workload", scaling, ">= 1.6", scaling >= 1.6))

            print("3. cached vs live 135M teacher, 1 worker", flush=True)
            student_2l = build_layer_subset_student(TEACHER_135M, root / "models" / "smollm2-2l-student", 2)
            # the 4-layer cached run again, interleaved with its live counterpart (section 2 ran earlier)
            cached_4l, live, cached_2l, live_2l = interleaved([
                (quick, "cached-4l", ("ray.num_workers=1",)),
                (quick, "live-4l", ("ray.num_workers=1", "train.use_teacher_cache=false")),
                (quick, "cached-2l", ("ray.num_workers=1", f"models.student={student_2l}")),
                (quick, "live-2l", ("ray.num_workers=1", f"models.student={student_2l}",
                                    "train.use_teacher_cache=false")),
            ], max(1, args.repeats - 1))
            for label, c, lv in (("4-layer (quickstart) student", cached_4l, live), ("2-layer student", cached_2l, live_2l)):
                r = median(lv, "s_per_step") / median(c, "s_per_step")
                ratios.append((f"live / cached teacher time per step, {label}", r, ">= 3", r >= 3.0))
            report["quickstart"] = {"cached_1w": one, "cached_2w": two, "cached_4l": cached_4l, "live_4l": live,
                                    "cached_2l": cached_2l,
                                    "live_2l": live_2l}
        else:
            print(f"quickstart models not found under {QUICKSTART_MODELS}: run `make quickstart-models` for the "
                  "quickstart-workload and cached-vs-live teacher benchmarks")
    finally:
        ray.shutdown()
        if args.keep:
            print(f"run folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'variant':<28} {'runs':>4} {'steps':>6} {'resp. tokens':>12} {'s/step (median)':>16} "
          f"{'fit wall s (median)':>20} {'samples/s':>10}")
    for runs in _all_runs(report):
        print(f"{runs[0]['variant']:<28} {len(runs):>4} {runs[0]['steps']:>6} {runs[0]['response_tokens']:>12} "
              f"{median(runs, 's_per_step'):>16.4f} {median(runs, 'fit_wall_s'):>20.1f} "
              f"{median(runs, 'samples_per_s'):>10.1f}")
    print()
    for label, value, goal, met in ratios:
        print(f"{label:<62} {value:6.3f}x  goal {goal}x  {'met' if met else 'NOT met'}")
    if args.json:
        report["ratios"] = [{"ratio": label, "value": value, "goal": goal, "met": met}
                            for label, value, goal, met in ratios]
        args.json.write_text(json.dumps(report, indent=2))


def _all_runs(report: dict) -> list[list[dict]]:
    groups: list[list[dict]] = []
    for value in report.values():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            groups.append(value)
        elif isinstance(value, dict):
            groups += [v for v in value.values() if isinstance(v, list) and v]
    return groups


if __name__ == "__main__":
    main()

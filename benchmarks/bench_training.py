"""Training-loop benchmarks, measured side by side in one run (see BENCHMARKS.md).

1. curriculum vs plain KD (strategy ``none``) for the same number of optimizer steps: time per step;
2. 2 Ray Train workers vs 1 (CPU, one torch thread per worker): training throughput;
3. cached teacher (the scoring pass's top-k logits, no teacher in memory) vs the live teacher, with
   the quickstart's SmolLM2-135M-Instruct teacher and 4-layer student: time per step (needs
   ``make quickstart-models``; skipped with a message when the models are missing).

Times are the loop's own compute time (the ``seconds`` of train/metrics.jsonl: batches, forward,
backward, optimizer), which excludes Ray Train's fixed start-up cost; the wall time of each fit()
is printed too. Models: a 4-layer/256-wide Llama teacher and a 2-layer/128-wide student built from
config on the tiny data set (random init, briefly trained teacher), so compute dominates; for 3, the
quickstart config on 64 WordNet pairs, 1 worker.

Run: ``make bench-training`` (or ``python -m benchmarks.bench_training``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402

from pocl_core.config import load_config  # noqa: E402
from pocl_core.data import load_samples  # noqa: E402
from pocl_core.tiny import build_tiny_models  # noqa: E402
from tasks.distill import distill  # noqa: E402
from tasks.load_data import load_dataset  # noqa: E402
from tasks.partition import partition  # noqa: E402
from tasks.score import score_difficulty  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tiny" / "instructions.jsonl"


def run(models, root: Path, name: str, *overrides: str) -> dict:
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"models.teacher={models.teacher}", f"models.student={models.student}", f"data.train_path={DATA}",
        f"runs_root={root}", f"run_name={name}", "curriculum.num_stages=4", "curriculum.epochs_per_stage=2",
        "optim.global_batch_size=16", "optim.micro_batch_size=8", "train.log_every_steps=1", *overrides,
    ]).with_absolute_paths()
    data = load_dataset.fn(cfg)
    part = partition.fn(cfg, score_difficulty.fn(cfg, data))
    t0 = time.perf_counter()
    distill.fn(cfg, data, part)
    return _summarize(name, cfg.run_dir, time.perf_counter() - t0)


QUICKSTART_MODELS = REPO / ".cache" / "models"


def run_quickstart(root: Path, name: str, *overrides: str) -> dict:
    """The quickstart config, shrunk to a few steps, 1 worker; returns the same fields as ``run``."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"runs_root={root}", f"run_name={name}", "data.max_train_samples=64", "curriculum.num_stages=2",
        "ray.num_workers=1", "train.log_every_steps=1", *overrides,
    ]).with_absolute_paths()
    data = load_dataset.fn(cfg)
    scores = score_difficulty.fn(cfg, data)
    part = partition.fn(cfg, scores)
    t0 = time.perf_counter()
    distill.fn(cfg, data, part, scores.teacher_cache_dir)
    wall = time.perf_counter() - t0
    return _summarize(name, cfg.run_dir, wall)


def _summarize(name: str, run_dir: str, wall: float) -> dict:
    rows = [json.loads(line) for line in (Path(run_dir) / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["global_step"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    samples = max(r["samples_seen"] for r in rows)
    return {"name": name, "steps": steps, "loop_s": seconds, "fit_wall_s": wall, "s_per_step": seconds / steps,
            "samples_per_s": samples / seconds}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="pocl-bench-train-"))
    samples, _ = load_samples(DATA)
    texts = [f"### Instruction:\n{s.prompt}\n\n### Response:\n{s.response}" for s in samples]
    models = build_tiny_models(root / "models", texts, vocab_size=2048, teacher_layers=4, teacher_hidden=256,
                               student_layers=2, student_hidden=128, teacher_warmup_steps=20)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = [
            run(models, root, "curriculum-1w", "ray.num_workers=1"),
            run(models, root, "plain-kd-1w", "ray.num_workers=1", "curriculum.strategy=none"),
            run(models, root, "curriculum-2w", "ray.num_workers=2"),
        ]
        have_quickstart = all((QUICKSTART_MODELS / m / "config.json").is_file()
                              for m in ("smollm2-135m-instruct", "smollm2-4l-student"))
        if have_quickstart:
            results += [run_quickstart(root, "135m-cached", "train.use_teacher_cache=true"),
                        run_quickstart(root, "135m-live", "train.use_teacher_cache=false")]
        else:
            print(f"quickstart models not found under {QUICKSTART_MODELS}: run `make quickstart-models` for the "
                  "cached-vs-live teacher benchmark")
    finally:
        ray.shutdown()
    print(f"{'run':<16} {'steps':>6} {'loop s':>8} {'fit wall s':>11} {'s/step':>8} {'samples/s':>10}")
    for r in results:
        print(f"{r['name']:<16} {r['steps']:>6} {r['loop_s']:>8.2f} {r['fit_wall_s']:>11.2f} {r['s_per_step']:>8.4f} "
              f"{r['samples_per_s']:>10.1f}")
    cur, plain, two = results[:3]
    assert cur["steps"] == plain["steps"], "the baseline must run the same number of steps"
    print(f"\ncurriculum / plain KD time per step: {cur['s_per_step'] / plain['s_per_step']:.3f}x (goal <= 1.03x)")
    print(f"2 workers / 1 worker throughput:     {two['samples_per_s'] / cur['samples_per_s']:.2f}x (goal >= 1.6x)")
    if len(results) == 5:
        cached, live = results[3:]
        print(f"live / cached teacher time per step: {live['s_per_step'] / cached['s_per_step']:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()

"""A training worker's set-up with the cyclic garbage collector as Python leaves it vs paused.

Each repeat starts two fresh processes, in alternating order, that do what a Ray Train worker of the
tiny flow does before its first step: import the training loop (``tasks.distill_loop``: torch, Ray
Train, transformers), load the tokenizer, the student and the teacher, encode the training data, and
exit. One runs it as Python leaves the collector; the other inside ``pocl_core.gc_setup.gc_paused``
(what the distill loop's set-up in a Ray Train worker and the ``pocl`` CLI's imports run under: the collector off, then one
collection and ``gc.freeze`` at the end). Per process: wall time from spawn to exit (interpreter
teardown included), CPU time, and the seconds spent in the collector (``gc.callbacks``) before exit.

Run: ``make bench-gc-setup`` (or ``python -m benchmarks.bench_gc_setup [--repeats N] [--config FILE]
[--json FILE]``; the default ``configs/tiny.yaml`` needs ``make tiny-models``). Every process runs with
``OMP_NUM_THREADS=1``, as a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("as is", "gc_paused")

CHILD = r"""
import gc, json, sys, time
spent = [0.0]
started = {}
def watch(phase, info):
    if phase == "start":
        started[info["generation"]] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - started.pop(info["generation"])
gc.callbacks.append(watch)
import contextlib
from pocl_core.gc_setup import gc_paused
with (gc_paused() if sys.argv[1] == "gc_paused" else contextlib.nullcontext()):
    import tasks.distill_loop
    from pocl_core.config import load_config
    from pocl_core.data import load_samples
    from pocl_core.encoding import encode_sample
    from pocl_core.models import load_causal_lm, load_tokenizer
    cfg = load_config(sys.argv[2])
    tokenizer = load_tokenizer(cfg.models.tokenizer_source, False)
    student = load_causal_lm(cfg.models.student, "float32", False)
    teacher = load_causal_lm(cfg.models.teacher, "float32", False)
    d = cfg.data
    encoded = [encode_sample(tokenizer, s, d.prompt_template, d.max_prompt_length, d.max_length)
               for s in load_samples(d.train_path)[0]]
print(json.dumps({"gc_s": spent[0], "frozen": gc.get_freeze_count(), "samples": len(encoded)}))
"""


def run_once(mode: str, config: Path) -> dict:
    """One fresh process of ``mode``: wall (spawn → exit), CPU (user + system) and collector seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(config)], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"mode": mode, "wall_s": wall, "cpu_s": cpu, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml",
                        help="its models and training data are loaded")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    if args.config == REPO / "configs" / "tiny.yaml" and not (REPO / ".cache" / "tiny" / "teacher").is_dir():
        sys.exit("no tiny models: run `make tiny-models`")
    rows = []
    for r in range(args.repeats):
        order = MODES if r % 2 == 0 else MODES[::-1]  # alternate, so a drift of the machine hits both alike
        for mode in order:
            rows.append({"repeat": r + 1, **run_once(mode, args.config)})
            last = rows[-1]
            print(f"repeat {r + 1:2d}  {mode:<10} wall {last['wall_s']:5.2f} s  cpu {last['cpu_s']:5.2f} s  "
                  f"collector {last['gc_s']:4.2f} s", flush=True)
    print(f"\nmedians over {args.repeats} repeats (load average now {os.getloadavg()[0]:.1f}):")
    med = {m: {k: statistics.median(x[k] for x in rows if x["mode"] == m) for k in ("wall_s", "cpu_s", "gc_s")}
           for m in MODES}
    for m in MODES:
        print(f"  {m:<10} wall {med[m]['wall_s']:5.2f} s  cpu {med[m]['cpu_s']:5.2f} s  "
              f"collector {med[m]['gc_s']:4.2f} s")
    base, paused = med["as is"], med["gc_paused"]
    print(f"  saved: wall {base['wall_s'] - paused['wall_s']:+.2f} s ({base['wall_s'] / paused['wall_s']:.3f}×), "
          f"cpu {base['cpu_s'] - paused['cpu_s']:+.2f} s, collector {base['gc_s'] - paused['gc_s']:+.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "medians": med}, indent=1))


if __name__ == "__main__":
    main()

"""The ``pocl`` command line.

    pocl run --config configs/tiny.yaml [key=value ...]   run the flow (overrides are dotted keys)
    pocl build-tiny --out .cache/tiny                      build the tiny teacher/student pair
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from pocl_core.config import ConfigError, load_config
from pocl_core.data import DataError


def _cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import pocl_distill

    load_config(args.config, args.overrides)  # fail fast, before any engine starts
    summary = pocl_distill(config_path=args.config, overrides=args.overrides)
    import pyarrow.parquet as pq

    print()
    print(f"run folder:     {summary.run_dir}")
    print(f"final student:  {summary.student}")
    print(f"report:         {summary.report}")
    print()
    print(f"{'model':<16} {'ROUGE-L':>8} {'NLL':>8}")
    for row in pq.read_table(summary.metrics).to_pylist():
        print(f"{row['model']:<16} {row['rouge_l']:>8.2f} {row['nll']:>8.3f}")
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from pocl_core.data import load_samples
    from pocl_core.tiny import build_tiny_models

    out = Path(args.out)
    if (out / "teacher" / "config.json").is_file() and (out / "student" / "config.json").is_file() and not args.force:
        print(f"tiny models already in {out} (use --force to rebuild)")
        return 0
    samples, _ = load_samples(args.data)
    texts = [f"### Instruction:\n{s.prompt}\n\n### Response:\n{s.response}" for s in samples]
    paths = build_tiny_models(out, texts, teacher_warmup_steps=args.warmup_steps)
    print(f"teacher: {paths.teacher}\nstudent: {paths.student}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pocl", description="POCL curriculum distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the distillation flow")
    run.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. curriculum.num_stages=3")
    run.set_defaults(func=_cmd_run)
    tiny = sub.add_parser("build-tiny", help="build the tiny teacher/student pair used by configs/tiny.yaml")
    tiny.add_argument("--out", default=".cache/tiny")
    tiny.add_argument("--data", default="data/tiny/instructions.jsonl")
    tiny.add_argument("--warmup-steps", type=int, default=150, help="teacher pre-training steps on the data")
    tiny.add_argument("--force", action="store_true")
    tiny.set_defaults(func=_cmd_build_tiny)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Prefect's temporary server may need more than its 20 s default on a busy small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

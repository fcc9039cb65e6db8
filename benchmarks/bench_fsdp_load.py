"""Host memory of setting up an FSDP student: every rank reading the weights vs rank 0 alone.

Two CPU processes (gloo) shard one model with ``parallel.shard_fsdp``, in two ways, each in fresh
processes:

- ``every rank loads``: each rank reads the whole float32 model (``load_causal_lm``), then shards it;
- ``rank 0 loads`` (what the distill loop does): rank 0 reads it, the other rank builds it on the meta
  device (``causal_lm_skeleton``), and ``materialize_from_rank0`` sends each rank its shard.

Per rank it prints the peak resident set (``ru_maxrss``, the kernel's high-water mark) above the
process's RSS before loading (torch, transformers and the process group imported and set up), the
RSS after setup, and the setup's wall time; then checks that both ways give the same weights (the
full state gathered from the shards, bit for bit).

Run: ``make bench-fsdp-load`` (or ``python -m benchmarks.bench_fsdp_load [--model DIR]``; default the
quickstart teacher, SmolLM2-135M-Instruct: ``make quickstart-models``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from devtools.processes import free_port

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct"


def _rss_mib() -> float:
    """This process's current resident set, MiB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(rank: int, port: int, model_dir: str, rank0_only: bool, out: str) -> None:
    from pocl_core.models import causal_lm_skeleton, load_causal_lm
    from pocl_core.parallel import full_state, materialize_from_rank0, shard_fsdp, transformer_blocks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        causal_lm_skeleton(model_dir)  # the libraries' first use, outside the measured part
        dist.barrier()
        before, t0 = _rss_mib(), time.perf_counter()
        device = torch.device("cpu")
        if rank0_only:
            model = load_causal_lm(model_dir) if rank == 0 else causal_lm_skeleton(model_dir)
            weights = {k: v.detach() for k, v in model.state_dict().items()} if rank == 0 else None
            shard_fsdp(model, transformer_blocks(model), device)
            materialize_from_rank0(model, weights, device)
            del weights
        else:
            model = load_causal_lm(model_dir)
            shard_fsdp(model, transformer_blocks(model), device)
        dist.barrier()
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        row = {"rank": rank, "before_mib": before, "peak_above_mib": peak - before, "after_mib": _rss_mib(),
               "seconds": seconds}
        full, _ = full_state(model, None, rank)
        if rank == 0:
            torch.save(full, f"{out}.weights.pt")
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def run(model_dir: Path) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = {}
        for name, rank0_only in (("every rank loads", False), ("rank 0 loads", True)):
            out = str(Path(tmp) / name.replace(" ", "-"))
            mp.spawn(_worker, args=(free_port(), str(model_dir), rank0_only, out), nprocs=2, join=True)
            for rank in (0, 1):
                rows.append({"variant": name, **json.loads(Path(f"{out}.rank{rank}.json").read_text())})
            weights[name] = torch.load(f"{out}.weights.pt", weights_only=True)
        a, b = weights.values()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    params = sum(v.numel() for k, v in a.items())
    print(f"model {model_dir.name}: {params / 1e6:.1f} M values in its state dict "
          f"({params * 4 / 2**20:.0f} MiB in float32); 2 ranks, CPU, gloo")
    print("| variant | rank | RSS before (MiB) | peak above it (MiB) | RSS after (MiB) | setup (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['rank']} | {r['before_mib']:.0f} | {r['peak_above_mib']:.0f} | "
              f"{r['after_mib']:.0f} | {r['seconds']:.2f} |")
    by = {(r["variant"], r["rank"]): r for r in rows}
    for rank in (0, 1):
        old, new = by[("every rank loads", rank)], by[("rank 0 loads", rank)]
        print(f"rank {rank}: peak above start, rank 0 loads / every rank loads = "
              f"{new['peak_above_mib'] / max(old['peak_above_mib'], 1e-9):.2f}")
    print(f"same weights both ways: {same}")
    if not same:
        raise SystemExit("the two ways gave different weights")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a save_pretrained causal LM folder")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no model folder (make quickstart-models builds the default)")
    run(args.model)


if __name__ == "__main__":
    main()

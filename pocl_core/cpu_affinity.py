"""CPU affinity for CPU training workers: each worker on a node keeps to its own share of the cores.

With as many single-threaded DDP workers as cores, the kernel still moves them between cores and
runs the node's other processes (Ray's own) on whichever core is free, and a synchronous step waits
for the slowest worker. Pinning each worker to a disjoint share of the cores the process may use
(``os.sched_getaffinity``) keeps its caches warm and leaves the preemptions to land elsewhere; on the
2-core test machine two workers ran 5–17% more samples/s that way, within that machine's noise
(BENCHMARKS.md, "CPU affinity").

``cpu_share`` is the pure rule; ``pin_to_share`` applies it to the calling thread and the threads it
starts (Linux only).
"""

from __future__ import annotations

import os
from typing import Sequence


def cpu_share(cores: Sequence[int], local_rank: int, local_world_size: int) -> list[int]:
    """The cores of worker ``local_rank`` among ``local_world_size`` workers on one node.

    ``cores`` (the node's usable core ids, any order) are split into contiguous, disjoint shares as
    equal as they go (the first ``len(cores) % local_world_size`` shares one core larger); with more
    workers than cores, worker r gets core ``r mod len(cores)`` (shares then overlap).
    """
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local_rank {local_rank} is outside 0..{local_world_size - 1}")
    ordered = sorted(cores)
    if not ordered:
        raise ValueError("no cores to share")
    n = len(ordered)
    if local_world_size >= n:
        return [ordered[local_rank % n]]
    base, extra = divmod(n, local_world_size)
    start = local_rank * base + min(local_rank, extra)
    return ordered[start:start + base + (1 if local_rank < extra else 0)]


def pin_to_share(local_rank: int, local_world_size: int) -> list[int] | None:
    """Restrict the calling thread, and the threads it starts afterwards, to its ``cpu_share`` of the
    cores it may use now; returns them, or None where the platform has no ``sched_setaffinity`` or
    refuses it (nothing is changed then: pinning is a speed hint, never a reason to fail training).

    Linux applies an affinity to one thread. Called from a Ray Train worker's training loop, which
    runs in a thread of its own, it pins the loop and the threads the loop starts, and leaves the
    threads started before it (the process group's communication threads, Ray's own) free to run on
    any core: pinning every thread of the process instead ran 6% slower in one A/B run
    (BENCHMARKS.md, "CPU affinity").
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        share = cpu_share(sorted(os.sched_getaffinity(0)), local_rank, local_world_size)
        os.sched_setaffinity(0, share)
    except OSError:
        return None
    return share

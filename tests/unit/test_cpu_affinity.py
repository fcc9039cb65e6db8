"""The CPU share of each training worker on a node, and pinning a process to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pocl_core.cpu_affinity import cpu_share


@pytest.mark.parametrize("cores,world", [(range(2), 2), (range(8), 3), (range(16), 16), ([2, 5, 7, 9, 11], 2),
                                         (range(7), 1), ([3, 1, 0, 2], 4)])
def test_shares_are_disjoint_cover_every_core_and_differ_by_at_most_one(cores, world):
    shares = [cpu_share(list(cores), r, world) for r in range(world)]
    flat = [c for share in shares for c in share]
    assert sorted(flat) == sorted(cores) and len(flat) == len(set(flat))  # a partition of the cores
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_hand_made_examples():
    assert [cpu_share([0, 1], r, 2) for r in range(2)] == [[0], [1]]
    assert [cpu_share(range(8), r, 3) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert cpu_share([9, 2, 5, 7], 1, 2) == [7, 9]  # contiguous in sorted order
    # more workers than cores: each gets one core, round robin
    assert [cpu_share([0, 1], r, 5) for r in range(5)] == [[0], [1], [0], [1], [0]]


def test_bad_ranks_and_empty_core_lists_are_refused():
    with pytest.raises(ValueError, match="local_rank 2"):
        cpu_share([0, 1], 2, 2)
    with pytest.raises(ValueError, match="no cores"):
        cpu_share([], 0, 1)


# Pins from a second thread, as in a Ray Train worker (its training loop runs in a thread of its own),
# while a third thread waits; prints the share and the cores of each thread, and of one the loop starts.
PIN_FROM_A_THREAD = """
import json, os, threading
from pocl_core.cpu_affinity import pin_to_share
done = threading.Event()
idle = threading.Thread(target=done.wait)
idle.start()
result = {}
def training_loop():
    result.update(share=pin_to_share(1, 2), loop=sorted(os.sched_getaffinity(0)))
    child = threading.Thread(target=lambda: result.update(child=sorted(os.sched_getaffinity(0))))
    child.start(); child.join()
loop = threading.Thread(target=training_loop)
loop.start(); loop.join()
result.update(main=sorted(os.sched_getaffinity(0)), idle=sorted(os.sched_getaffinity(idle.native_id)))
done.set(); idle.join()
print(json.dumps(result))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity on this platform")
def test_pin_to_share_restricts_the_calling_thread_and_what_it_starts_only():
    usable = sorted(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", PIN_FROM_A_THREAD], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    result = json.loads(out.stdout)
    assert result["share"] == cpu_share(usable, 1, 2)
    assert result["loop"] == result["share"] == result["child"]
    assert result["main"] == result["idle"] == usable  # the process's other threads keep every core
    assert sorted(os.sched_getaffinity(0)) == usable  # this process is untouched


def test_a_refused_pin_changes_nothing_and_does_not_raise(monkeypatch):
    from pocl_core import cpu_affinity

    def refuse(pid, cores):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(cpu_affinity.os, "sched_setaffinity", refuse, raising=False)
    monkeypatch.setattr(cpu_affinity.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_affinity.pin_to_share(0, 2) is None
    monkeypatch.delattr(cpu_affinity.os, "sched_setaffinity")
    assert cpu_affinity.pin_to_share(0, 2) is None

"""The cyclic garbage collector during a process's set-up: paused, then the survivors frozen.

Imports, tokenizers and models make a few hundred thousand container objects that live as long as
the process. Each time the collector's thresholds are crossed during set-up it walks them again, and
every later full collection (one at interpreter exit too) walks them once more: on the tiny flow's
2-core machine, 1–1.7 s of collector time in the driver and about 1 s in each training worker.
``gc_paused`` holds the collector off for a set-up phase; at its end one collection frees the phase's
cycles and ``gc.freeze`` moves what is left out of the collector's sight for good. Reference counting
frees memory as usual throughout; only cycles wait for the phase's end, and cycles among frozen
objects are not collected later (objects meant to live as long as the process).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


def freeze_survivors() -> int:
    """Collect once, then freeze every object still tracked; returns how many are frozen in all."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def freeze_once() -> bool:
    """``freeze_survivors`` unless this process has frozen objects already (an earlier call, or a
    ``gc_paused`` such as the ``pocl`` CLI's around the flow's imports); True when it froze. For an entry
    point that a long-lived process may call many times (a flow run in a notebook, a comparison's
    subflows): the imports' objects are frozen once, not each call's leftovers again."""
    if gc.get_freeze_count():
        return False
    freeze_survivors()
    return True


@contextmanager
def gc_paused() -> Iterator[None]:
    """Hold the cyclic collector off for the block; at its end (also when it raises) collect and freeze
    (``freeze_survivors``) and turn the collector back on. Where the collector is already off (an outer
    ``gc_paused`` or the caller's own ``gc.disable()``) the block runs as it is and nothing changes."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        freeze_survivors()
        gc.enable()

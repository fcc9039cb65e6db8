"""The collector paused for a set-up phase: off inside, survivors frozen and the collector back on after."""

from __future__ import annotations

import gc
import weakref

import pytest

from pocl_core.gc_setup import freeze_once, freeze_survivors, gc_paused


class Node:
    """A container object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def collector_restored():
    """Each test starts with the collector on and nothing frozen, and leaves it so."""
    was = gc.isenabled()
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    (gc.enable if was else gc.disable)()


def _cycle() -> weakref.ref:
    """A two-node reference cycle no name holds; a weak reference to one of its nodes."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_off_inside_then_cycles_collected_survivors_frozen_and_on_again():
    with gc_paused():
        assert not gc.isenabled()
        garbage = _cycle()
        gc.collect(0)  # an explicit young collection still runs; thresholds alone would not start one
        kept = Node()
        kept.other = Node()
        kept.other.other = kept
        garbage_late = _cycle()
        assert garbage_late() is not None  # reference counting cannot free a cycle: it waits for the end
    assert gc.isenabled()
    assert garbage() is None and garbage_late() is None  # the end's collection freed the phase's cycles
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # moved out of the collector's generations
    gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())


def test_the_block_raising_still_freezes_and_turns_the_collector_back_on():
    garbage = None
    with pytest.raises(KeyError, match="boom"):
        with gc_paused():
            garbage = _cycle()
            raise KeyError("boom")
    assert gc.isenabled() and garbage() is None and gc.get_freeze_count() > 0


def test_nested_or_caller_disabled_changes_nothing():
    with gc_paused():
        with gc_paused():
            inner = _cycle()
        assert not gc.isenabled() and gc.get_freeze_count() == 0  # the inner block left the outer's pause alone
        assert inner() is not None
    assert gc.isenabled() and inner() is None

    gc.unfreeze()
    gc.disable()
    with gc_paused():
        left = _cycle()
    assert not gc.isenabled() and gc.get_freeze_count() == 0 and left() is not None  # the caller's choice stands
    gc.enable()
    gc.collect()
    assert left() is None


def test_freeze_survivors_collects_first_and_counts_the_frozen():
    gc.disable()
    garbage = _cycle()
    kept = Node()
    count = freeze_survivors()
    # other threads of the process may free frozen objects meanwhile: the count only shrinks
    assert garbage() is None and count >= gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # frozen
    assert not gc.isenabled()  # it collects and freezes; whether the collector runs is not its business


def test_freeze_once_freezes_only_where_nothing_is_frozen_yet():
    garbage = _cycle()  # the fixture left nothing frozen
    assert freeze_once() is True and garbage() is None
    frozen = gc.get_freeze_count()
    gc.disable()  # nothing collects behind the second call's back
    later = _cycle()
    kept = Node()
    assert freeze_once() is False
    assert gc.get_freeze_count() <= frozen and later() is not None  # nothing collected, nothing more frozen
    assert any(o is kept for o in gc.get_objects())

    gc.enable()
    gc.unfreeze()
    with gc_paused():  # what the CLI does around the flow's imports
        pass
    gc.disable()
    paused_later = _cycle()
    assert freeze_once() is False and paused_later() is not None

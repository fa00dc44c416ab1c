"""The daemon's collector settings once it runs (gatewayd.app.settle_collector)."""

from __future__ import annotations

import gc

from gatewayd.app import GC_YOUNG_THRESHOLD, settle_collector


def test_settling_freezes_what_was_built_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    built = [object() for _ in range(10)]
    try:
        settle_collector()
        assert gc.get_freeze_count() >= len(built)
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert before[0] < GC_YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

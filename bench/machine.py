"""This machine's speed right now, measured the way the issue's goals are stated.

`python -m timeit -p "sum(range(1000))"` (process time, so other load on a shared machine counts
less): about 7.8 µs on the 2-core build machine when quiet. Benchmarks print their costs divided
by it, so figures compare across machines and across busy and quiet moments.
"""

from __future__ import annotations

import time
import timeit


def reference_us() -> float:
    """µs of CPU per `sum(range(1000))`, the best of five timeit rounds."""
    timer = timeit.Timer("sum(range(1000))", timer=time.process_time)
    loops, _ = timer.autorange()
    return min(timer.repeat(5, loops)) / loops * 1e6

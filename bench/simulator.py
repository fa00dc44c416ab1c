"""The simulator's own CPU per frame: 1,000 sensors' frames made as the daemon makes them.

    .venv/bin/python bench/simulator.py [--sensors 1000] [--seconds 60] [--rounds 5]

The room bench/daemon.py runs (every athlete with an HR strap, BLE and ANT+ alternating, a power
meter and a speed/cadence sensor) emits a gathered batch every WAKE_S of a manual clock, which
the bench takes from the queue and drops, as the pipeline would. Only that loop is timed, with
the process's CPU clock, so other load on a shared machine counts less; the collector is set up
as the daemon sets it. Prints the median µs per frame of the rounds and its ratio to the machine
reference (bench/machine.py). In the daemon this cost is part of bench/daemon.py's per frame.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import reference_us

from gatewayd.app import settle_collector
from gatewayd.clock import ManualClock
from gatewayd.config import SimulatorConfig
from gatewayd.pipeline import FrameQueue
from gatewayd.sources.simulator import WAKE_S, SimulatorSource


def one_round(sensors: int, seconds: float) -> tuple[int, float]:
    """(frames, CPU seconds) of `seconds` of simulation, the room built beforehand."""
    clock = ManualClock()
    config = SimulatorConfig(
        enabled=True, athletes=max(1, sensors // 3), bike_fraction=1.0, hr_straps="mixed"
    )
    sim = SimulatorSource(config, clock)
    queue = FrameQueue(maxsize=10**8)
    emit_due, take_all, advance = sim.emit_due, queue.take_all, clock.advance
    settle_collector()
    frames = 0
    elapsed = 0.0
    started = time.process_time()
    while elapsed < seconds:
        elapsed += WAKE_S
        advance(WAKE_S)
        emit_due(elapsed, queue)
        frames += len(take_all())
    cpu = time.process_time() - started
    gc.unfreeze()
    return frames, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated seconds a round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    reference = reference_us()
    per_frame = []
    frames = 0
    for _ in range(args.rounds):
        frames, cpu = one_round(args.sensors, args.seconds)
        per_frame.append(cpu / frames * 1e6)
    reference = min(reference, reference_us())
    median = statistics.median(per_frame)
    print(f"sensors            {args.sensors // 3 * 3}")
    print(f"frames a round     {frames} ({frames / args.seconds:,.0f} a simulated second)")
    print(f"us per frame       {median:.3f} (median of {args.rounds} rounds; ", end="")
    print(f"{min(per_frame):.3f}-{max(per_frame):.3f})")
    print(f"reference          {reference:.2f} us (timeit sum(range(1000)), best of two)")
    print(f"per frame / ref    {median / reference:.3f}x")


if __name__ == "__main__":
    main()

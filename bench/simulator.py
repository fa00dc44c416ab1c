"""The simulator's own CPU per frame: 1,000 sensors' frames made as the daemon makes them.

    .venv/bin/python bench/simulator.py [--sensors 1000] [--seconds 30] [--rounds 7]
                                        [--against OTHER/gatewayd/sources/simulator.py]

The room bench/daemon.py runs (every athlete with an HR strap, BLE and ANT+ alternating, a power
meter and a speed/cadence sensor) emits a gathered batch every WAKE_S of a manual clock, which
the bench takes from the queue and drops, as the pipeline would. Only that loop is timed, with
the process's CPU clock, so other load on a shared machine counts less; the collector is set up
as the daemon sets it. Prints the median µs per frame of the rounds and its ratio to the machine
reference (bench/machine.py). In the daemon this cost is part of bench/daemon.py's per frame.

--against loads another version of simulator.py (e.g. main's, from `git show`) beside this one
and alternates their rounds in this process, so both meet the same load: an A/B on a shared
machine. It must produce the same frames (checked).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import reference_us

from gatewayd.app import settle_collector
from gatewayd.clock import ManualClock
from gatewayd.config import SimulatorConfig
from gatewayd.pipeline import FrameQueue
from gatewayd.sources import simulator


def one_round(module: ModuleType, sensors: int, seconds: float) -> tuple[int, float, int]:
    """(frames, CPU seconds, a hash of the frames) of `seconds` of simulation, the room built
    beforehand."""
    clock = ManualClock()
    config = SimulatorConfig(
        enabled=True, athletes=max(1, sensors // 3), bike_fraction=1.0, hr_straps="mixed"
    )
    sim = module.SimulatorSource(config, clock)
    queue = FrameQueue(maxsize=10**8)
    emit_due, take_all, advance = sim.emit_due, queue.take_all, clock.advance
    wake_s = module.WAKE_S
    last: list = []
    settle_collector()
    frames = 0
    elapsed = 0.0
    started = time.process_time()
    while elapsed < seconds:
        elapsed += wake_s
        advance(wake_s)
        emit_due(elapsed, queue)
        last = take_all()
        frames += len(last)
    cpu = time.process_time() - started
    gc.unfreeze()
    return frames, cpu, hash(tuple(last))


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("simulator_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0, help="simulated seconds a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--against", help="another simulator.py to A/B against, round by round")
    args = parser.parse_args()

    versions = {"this": simulator}
    if args.against:
        versions["against"] = load(args.against)
    reference = reference_us()
    per_frame: dict[str, list[float]] = {name: [] for name in versions}
    frames = 0
    for _ in range(args.rounds):
        hashes = set()
        for name, module in versions.items():
            frames, cpu, last = one_round(module, args.sensors, args.seconds)
            per_frame[name].append(cpu / frames * 1e6)
            hashes.add((frames, last))
        if len(hashes) > 1:
            sys.exit("the two simulators made different frames")
    reference = min(reference, reference_us())
    print(f"sensors            {args.sensors // 3 * 3}")
    print(f"frames a round     {frames} ({frames / args.seconds:,.0f} a simulated second)")
    print(f"reference          {reference:.2f} us (timeit sum(range(1000)), best of two)")
    for name, values in per_frame.items():
        median = statistics.median(values)
        print(
            f"us per frame       {median:.3f} = {median / reference:.3f}x the reference"
            f" ({name}: median of {args.rounds} rounds, {min(values):.3f}-{max(values):.3f})"
        )
    if args.against:
        ratios = [a / b for a, b in zip(per_frame["this"], per_frame["against"], strict=True)]
        print(f"this / against     {statistics.median(ratios):.3f} (median of the rounds' ratios)")


if __name__ == "__main__":
    main()

"""Decode + aggregate throughput on one core: 1,000 simulated sensors' frames, as fast as possible.

    .venv/bin/python bench/pipeline.py [--sensors 1000] [--seconds 30]

Frames are generated first (by the simulator's real encoders), then timed through
Pipeline.process_all (the daemon's loop over each batch the queue gives) and the ticks. Prints
frames/s, microseconds per frame and peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import reference_us

from gatewayd.clock import ManualClock
from gatewayd.config import PipelineConfig, SimulatorConfig
from gatewayd.hub import Hub
from gatewayd.pipeline import FrameQueue, Pipeline
from gatewayd.roster import Roster
from gatewayd.sources.simulator import SimulatorSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0, help="simulated seconds")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # rate-limited warnings are part of the cost, not the output

    # bike_fraction 1.0: every athlete has HR + power + speed/cadence, i.e. 3 sensors
    clock = ManualClock()
    sim = SimulatorSource(
        SimulatorConfig(enabled=True, athletes=max(1, args.sensors // 3), bike_fraction=1.0), clock
    )
    queue = FrameQueue(maxsize=10**8)
    steps: list[list] = []
    step = 0.05
    elapsed = 0.0
    while elapsed < args.seconds:
        elapsed += step
        clock.advance(step)
        sim.emit_due(elapsed, queue)
        steps.append(queue.take_all())
    frames = sum(len(s) for s in steps)

    replay_clock = ManualClock()
    hub = Hub()
    sink = hub.subscribe("bench", 10**8)
    pipeline = Pipeline(FrameQueue(), hub, Roster([], {}), PipelineConfig(), replay_clock)
    pipeline.tick()
    process_all = pipeline.process_all
    reference = reference_us()
    started = time.process_time()
    for batch in steps:
        replay_clock.advance(step)
        process_all(batch)
        pipeline.tick()
    cpu = time.process_time() - started
    reference = min(reference, reference_us())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"sensors            {sim.device_count()}")
    print(f"frames             {frames}")
    print(f"samples            {len(sink)}")
    print(f"decode errors      {sum(pipeline.decode_errors.values())}")
    print(f"frames/s           {frames / cpu:,.0f}")
    print(f"us per frame       {cpu / frames * 1e6:.2f}")
    print(f"reference          {reference:.2f} us (timeit sum(range(1000)), best of two)")
    print(f"per frame / ref    {cpu / frames * 1e6 / reference:.2f}x (goal <= 0.64x)")
    print(f"peak RSS           {peak_kib / 1024:.1f} MiB")


if __name__ == "__main__":
    main()

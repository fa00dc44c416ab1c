"""CPU per athlete-second of the CALORIES and zone-minutes core (gatewayd/energy.py).

Run: python bench/energy.py [--athletes N] [--seconds N]
Prints the median of five runs of process CPU time, so load from other processes matters less.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.energy import EnergyMeter
from gatewayd.model import DataType, Sample
from gatewayd.roster import AthleteInfo

START = 1_800_000_000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--athletes", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=100)
    args = parser.parse_args()
    roster = {
        f"a{i}": AthleteInfo(f"a{i}", "x", 190, 2.1, age=30, weight_kg=70.0, sex="male")
        for i in range(args.athletes)
    }
    meter = EnergyMeter(zone4_pct=80)
    runs = []
    for run in range(5):
        # Half the athletes ride with a power meter: both paths of the formula are measured.
        batches = [
            [
                Sample(uid, DataType.HEART_RATE, START + run * args.seconds + s, val=150.0)
                for uid in roster
            ]
            + [
                Sample(uid, DataType.POWER, START + run * args.seconds + s, val=200.0)
                for uid in list(roster)[: args.athletes // 2]
            ]
            for s in range(args.seconds)
        ]
        start = time.process_time()
        for batch in batches:
            meter.observe(batch, roster.get)
        runs.append((time.process_time() - start) / (args.seconds * args.athletes) * 1e6)
    median = statistics.median(runs)
    print(f"{args.athletes} athletes: {median:.2f} µs CPU per athlete-second (median of 5)")
    print(f"= {median * args.athletes / 1e4:.2f} % of one core for the whole room")


if __name__ == "__main__":
    main()

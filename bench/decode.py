"""Microseconds per frame for every decode profile (decode alone, and decode + Deriver).

CPU time of this process (best of 5 runs), so load from other processes matters less.

Run: python bench/decode.py [--frames N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.decode import DECODERS, PROFILES, Decoder
from gatewayd.decode.counters import Deriver

# A typical, fully populated frame per profile (mostly the reference file's vectors).
SAMPLES = {
    "hrm": "163C1104",
    "body-location": "01",
    "battery": "5A",
    "csc": "036D010000FC7E2C01F87E",
    "cps": "230016002CB8003C42",
    "rsc": "038002B4550010270000",
    "ftms-bike": "5408E2067E00BB00004D000000",
    "ftms-treadmill": "0201E204B0049B",
    "ftms-rower": "2C02394100D007007D00B4009B",
    "polar-adv": "3B1B5452",
    "ant-frame": "A40E4E0284FFA5E2A5E6CA3C8052627871D6",
    "ant-hr": "84FFA5E2A5E6CA3C",
    "ant-power": "10F0FFFF80794B00",
    "ant-sc": "00FC2C01FC7E6D01",
    "ant-cadence": "80FFFFFF00FC2C01",
    "ant-speed": "80FFFFFF00FC6D01",
    "ant-sdm": "0164050A33802108",
    "ant-fe": "101900000000FF24",
}


def _decode_only(decoder: Decoder, data: bytes, n: int) -> None:
    for _ in range(n):
        decoder(data)


def _decode_derive(decoder: Decoder, data: bytes, n: int) -> None:
    deriver = Deriver()
    mono = 0.0
    for _ in range(n):
        mono += 0.25
        for reading in decoder(data):
            deriver.derive(reading, mono)


def _per_frame_us(run: Callable[[Decoder, bytes, int], None], decoder: Decoder, data: bytes,
                  n: int) -> float:  # fmt: skip
    best = float("inf")
    for _ in range(5):  # best of 5: the least disturbed run
        start = time.process_time()
        run(decoder, data, n)
        best = min(best, time.process_time() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=20_000, help="frames per timing run")
    args = parser.parse_args()
    print(f"{'profile':<16}{'decode us':>11}{'+derive us':>12}  readings")
    total_decode = total_both = 0.0
    for profile, kind in PROFILES.items():
        decoder = DECODERS[kind]
        data = bytes.fromhex(SAMPLES[profile])
        readings = decoder(data)
        us = _per_frame_us(_decode_only, decoder, data, args.frames)
        both = _per_frame_us(_decode_derive, decoder, data, args.frames)
        total_decode += us
        total_both += both
        print(f"{profile:<16}{us:>11.2f}{both:>12.2f}  {len(readings)}")
    count = len(PROFILES)
    print(f"{'mean':<16}{total_decode / count:>11.2f}{total_both / count:>12.2f}")


if __name__ == "__main__":
    main()

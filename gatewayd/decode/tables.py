"""Readings built once, for the decoders of the frames a gym hears most.

A Reading is a NamedTuple, and building one costs about four times a plain tuple (tuple.__new__
on a subclass allocates three times). Readings are immutable, so a reading that carries only a
measure and a small whole value (a heart rate in bpm, a cadence in rpm, a flag) is taken from a
table instead: the same Reading, equal in every field, without building it per frame.
"""

from __future__ import annotations

from gatewayd.model import Measure, Reading


def whole_values(measure: Measure, count: int = 256) -> tuple[Reading, ...]:
    """Reading(measure, value=float(v)) for v in range(count): index it with the wire value."""
    return tuple(Reading(measure, value=float(v)) for v in range(count))

from __future__ import annotations

import pytest

from gatewayd.model import DataType, Sample, format_ts, parse_ts


def test_timestamps_are_rfc3339_utc_with_milliseconds_and_z():
    assert format_ts(1_795_000_000.0) == "2026-11-18T11:06:40.000Z"
    assert format_ts(1_795_000_000.1234) == "2026-11-18T11:06:40.123Z"
    assert parse_ts("2026-11-18T11:06:40.000Z") == 1_795_000_000.0
    assert parse_ts("2026-11-18T12:06:40+01:00") == 1_795_000_000.0


def test_a_timestamp_without_offset_is_refused():
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_ts("2026-11-18T11:06:40")


def test_sample_payload_is_val_or_d():
    assert Sample("a", DataType.HEART_RATE, 0.0, val=71).payload() == {
        "ts": "1970-01-01T00:00:00.000Z",
        "val": 71,
    }
    assert Sample("a", DataType.RR_INTERVAL, 0.0, d=(800.0, 790.0)).payload()["d"] == [800.0, 790.0]


def test_data_types_carry_terras_names():
    assert {t.value for t in DataType} >= {
        "HEART_RATE", "RR_INTERVAL", "POWER", "BIKE_CADENCE", "SPEED", "DISTANCE", "STEPS",
        "STEPS_CADENCE", "CALORIES",
    }  # fmt: skip

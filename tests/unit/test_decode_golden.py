"""The reference file's test vectors (tests/data/decode_vectors.json), through the registry."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from gatewayd.decode import DECODERS, PROFILES
from gatewayd.decode.antplus import parse_frame
from gatewayd.decode.counters import Derived, Deriver
from gatewayd.errors import DecodeError
from gatewayd.model import Reading

VECTORS = json.loads((Path(__file__).parent.parent / "data" / "decode_vectors.json").read_text())


def _close(got: object, want: object) -> bool:
    if isinstance(want, list):
        return (
            isinstance(got, tuple | list)
            and len(got) == len(want)
            and all(_close(g, w) for g, w in zip(got, want, strict=True))
        )
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return got == want
    assert isinstance(want, int | float) and isinstance(got, int | float)
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)


def _check_readings(got: list[Reading], want: list[dict[str, Any]]) -> None:
    assert [r.measure.value for r in got] == [w["measure"] for w in want]
    for reading, expected in zip(got, want, strict=True):
        for key, value in expected.items():
            if key != "measure":
                assert _close(getattr(reading, key), value), (reading, key, value)


def _check_derived(got: list[Derived], want: list[dict[str, Any]]) -> None:
    assert [d.t.value for d in got] == [w["t"] for w in want]
    for derived, expected in zip(got, want, strict=True):
        for key in ("val", "d"):
            if key in expected:
                assert _close(getattr(derived, key), expected[key]), (derived, expected)


def _decode(profile: str, text: str) -> list[Reading]:
    return DECODERS[PROFILES[profile]](bytes.fromhex(text))


@pytest.mark.parametrize("vector", VECTORS["frames"], ids=lambda v: f"{v['profile']}-{v['hex']}")
def test_frame_vector(vector: dict[str, Any]) -> None:
    _check_readings(_decode(vector["profile"], vector["hex"]), vector["readings"])


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS["frames"] if "message" in v], ids=lambda v: v["hex"]
)
def test_ant_message_vector(vector: dict[str, Any]) -> None:
    message = parse_frame(bytes.fromhex(vector["hex"]))
    for key, want in vector["message"].items():
        got = message.describe() if key == "describe" else getattr(message, key)
        if isinstance(got, bytes):
            assert got.hex() == want.lower(), key
        else:
            assert got == want, (key, got, want)


@pytest.mark.parametrize("vector", VECTORS["sequences"], ids=lambda v: v["profile"])
def test_sequence_vector(vector: dict[str, Any]) -> None:
    deriver = Deriver()
    for index, (text, want) in enumerate(zip(vector["hex"], vector["derived"], strict=True)):
        got = [d for r in _decode(vector["profile"], text) for d in deriver.derive(r, index / 4)]
        _check_derived(got, want)


@pytest.mark.parametrize("vector", VECTORS["errors"], ids=lambda v: f"{v['profile']}-{v['hex']}")
def test_error_vector(vector: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as caught:
        _decode(vector["profile"], vector["hex"])
    error = caught.value
    assert error.profile == vector["profile"]
    assert vector["reason"] in error.reason
    assert error.payload == bytes.fromhex(vector["hex"])
    assert (vector["hex"].lower() or "<empty>") in str(error)


def test_every_reference_profile_is_registered_with_help() -> None:
    names = {"hrm", "csc", "cps", "rsc", "ftms-bike", "ftms-treadmill", "ftms-rower", "battery",
             "body-location", "polar-adv", "ant-frame", "ant-hr", "ant-power", "ant-sc",
             "ant-speed", "ant-cadence", "ant-sdm", "ant-fe"}  # fmt: skip
    assert set(PROFILES) == names
    for kind in PROFILES.values():
        doc = DECODERS[kind].__doc__
        assert doc is not None and "\n" not in doc.strip()

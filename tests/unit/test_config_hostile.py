"""check-config = run: every file-path key and every numeric key of the config model, walked from
the model itself (so a new key is covered the day it is added), plus hostile config files."""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gatewayd import config as config_module
from gatewayd.app import preflight
from gatewayd.config import Config, ConfigError

# What a key's section needs besides the key to be switched on (so `run` would read the file).
ENABLERS: dict[str, dict[str, Any]] = {
    "sources.replay": {},
    "outputs.upstream": {"outputs": {"upstream": {"enabled": True, "token": "upstream-token"}}},
    "outputs.mqtt.tls": {"outputs": {"mqtt": {"enabled": True, "tls": {"enabled": True}}}},
    "outputs.mqtt": {"outputs": {"mqtt": {"enabled": True}}},
    "outputs.local_broker.tls": {},
    "outputs.local_broker.developers": {},
}
# Required fields of list items, so an item can exist to carry the key under test.
ITEM_MINIMUM: dict[str, dict[str, Any]] = {
    "athletes": {"id": "a1"},
    "athletes.0.devices": {"source": "ble", "id": "AA:BB"},
    "outputs.local_broker.producer_tokens": {"token": "producer-token"},
    "outputs.local_broker.developers": {"dev_id": "gym"},
}
PAIRS = {  # keys that only make sense with a partner: the partner is set to a real file
    "outputs.mqtt.tls.cert_file": "key_file",
    "outputs.mqtt.tls.key_file": "cert_file",
    "outputs.local_broker.tls.cert_file": "key_file",
    "outputs.local_broker.tls.key_file": "cert_file",
    "outputs.upstream.tls_client_key": "tls_client_cert",
}


def _unwrap(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def walk(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, type) for every leaf of the model; list items appear as index 0."""
    out: list[tuple[str, Any]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        for kind in _unwrap(field.annotation):
            origin = typing.get_origin(kind)
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out.extend(walk(kind, f"{key}."))
            elif origin is list:
                (item,) = typing.get_args(kind)
                if isinstance(item, type) and issubclass(item, BaseModel):
                    out.extend(walk(item, f"{key}.0."))
                else:
                    out.append((key, kind))
            else:
                out.append((key, kind))
    return out


def put(data: dict[str, Any], key: str, value: Any) -> None:
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if part == "0":
            continue
        nxt = parts[i + 1]
        if nxt == "0":
            node = node.setdefault(part, [dict(ITEM_MINIMUM.get(here, {}))])[0]
        else:
            node = node.setdefault(part, {})
    node[parts[-1]] = value


def merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict):
            merge(into.setdefault(k, {}), v)
        else:
            into.setdefault(k, v)


def build(data: dict[str, Any]) -> Config:
    config_module._PENDING_YAML.clear()
    config_module._PENDING_YAML.update(data)
    try:
        return Config()
    except Exception as exc:  # the same translation load() applies
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise config_module._config_error(exc, None) from None
        raise
    finally:
        config_module._PENDING_YAML.clear()


FILE_KEYS = [k for k, t in walk(Config) if t is Path and k not in config_module.DIRECTORY_KEYS]
NUMBER_KEYS = [k for k, t in walk(Config) if t in (int, float)]


def test_the_walk_finds_the_keys_it_should() -> None:
    assert "sources.replay.file" in FILE_KEYS
    assert "outputs.mqtt.tls.ca_file" in FILE_KEYS
    assert "outputs.local_broker.tls.cert_file" in FILE_KEYS
    assert "pipeline.lost_after_s" in NUMBER_KEYS
    assert "athletes.0.max_hr" in NUMBER_KEYS
    assert len(NUMBER_KEYS) > 50


@pytest.mark.parametrize("key", FILE_KEYS)
def test_every_file_key_naming_a_missing_file_is_refused_naming_it(
    key: str, tmp_path: Path
) -> None:
    section = key.rsplit(".", 1)[0]
    data: dict[str, Any] = {}
    enabler = next(
        (ENABLERS[s] for s in sorted(ENABLERS, key=len, reverse=True) if section.startswith(s)),
        None,
    )
    assert enabler is not None or section.count(".") == 0, (
        f"{key}: add its section's switch to ENABLERS so this test turns it on"
    )
    merge(data, enabler or {})
    put(data, key, str(tmp_path / "missing.file"))
    if key in PAIRS:
        partner = tmp_path / "partner.pem"
        partner.write_text("x")
        put(data, f"{section}.{PAIRS[key]}", str(partner))
    with pytest.raises(ConfigError) as info:
        preflight(build(data))
    assert info.value.key == key, info.value
    assert "missing.file" in str(info.value)


@pytest.mark.parametrize("key", NUMBER_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e300, -1e300])
def test_every_numeric_key_refuses_what_is_not_finite_or_in_range(key: str, value: float) -> None:
    data: dict[str, Any] = {}
    put(data, key, value)
    with pytest.raises(ConfigError) as info:
        build(data)
    assert key in str(info.value), info.value


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "gatewayd.yaml"
    path.write_bytes(content)
    return path


def test_a_duplicate_key_is_an_error_not_last_wins(tmp_path: Path) -> None:
    path = write(tmp_path, b"pipeline:\n  lost_after_s: 5\n  lost_after_s: 50\n")
    with pytest.raises(ConfigError) as info:
        config_module.load(path)
    assert "lost_after_s" in str(info.value) and "twice" in str(info.value)
    assert "lines 2 and 3" in str(info.value)


def test_a_file_that_is_not_utf8_gets_a_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, b"hub:\n  name: \xff\xfe\x00binary\n")
    with pytest.raises(ConfigError) as info:
        config_module.load(path)
    assert "not UTF-8" in str(info.value)


@pytest.mark.parametrize("content", [b"[" * 5000, b"{a: " * 5000, b"- " * 5000 + b"x"])
def test_a_file_nested_too_deep_gets_a_clear_message(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(ConfigError) as info:
        config_module.load(write(tmp_path, content))
    assert "nested" in str(info.value) or "mapping of sections" in str(info.value)


def test_the_shipped_example_still_loads_and_passes_preflight() -> None:
    root = Path(__file__).resolve().parents[2]
    preflight(config_module.load(root / "config" / "gatewayd.yaml"))

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd import config
from gatewayd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch):
    monkeypatch.delenv("GATEWAYD_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", Path("/nonexistent/gatewayd.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(text)
    return path


def test_no_file_means_defaults_that_run_the_simulator():
    cfg = config.load(None)
    assert cfg.sources.simulator.enabled
    assert cfg.hub.id == "hub"


def test_the_shipped_example_is_valid_and_complete():
    cfg = config.load(ROOT / "config" / "gatewayd.yaml")
    assert cfg.athletes, "the example should show how athletes and their devices are listed"
    assert cfg.athletes[0].devices


def test_file_from_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAYD_CONFIG", str(write(tmp_path, "hub: {id: gym-7}\n")))
    assert config.load(None).hub.id == "gym-7"


def test_environment_overrides_every_key(tmp_path, monkeypatch):
    path = write(tmp_path, "hub: {id: gym-7, name: Gym}\noutputs: {mqtt: {port: 1883}}\n")
    monkeypatch.setenv("GATEWAYD_HUB__NAME", "Other")
    monkeypatch.setenv("GATEWAYD_OUTPUTS__MQTT__PORT", "2883")
    cfg = config.load(path)
    assert (cfg.hub.id, cfg.hub.name, cfg.outputs.mqtt.port) == ("gym-7", "Other", 2883)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("outputs: {mqtt: {port: 99999}}", "outputs.mqtt.port", "99999"),
        ("outputs: {mqtt: {prot: 1}}", "outputs.mqtt.prot", "unknown key"),
        ("hub: {id: 'has space'}", "hub.id", "has space"),
        ("athletes: [{id: a, max_hr: 20}]", "athletes.0.max_hr", "20"),
        (
            "athletes: [{id: a, devices: [{source: zigbee, id: x}]}]",
            "athletes.0.devices.0.source",
            "zigbee",
        ),
        ("sources: {simulator: {athletes: -1}}", "sources.simulator.athletes", "-1"),
        ("pipeline: {grace_s: 2}", "pipeline.grace_s", "less than 1"),
    ],
)
def test_a_bad_value_names_its_key_and_the_value(tmp_path, text, key, fragment):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert caught.value.key == key
    assert key in str(caught.value) and fragment in str(caught.value)


def test_a_device_listed_for_two_athletes_is_refused(tmp_path):
    text = """
athletes:
  - {id: a, devices: [{source: ant, id: "120:1"}]}
  - {id: b, devices: [{source: ant, id: "120:1"}]}
"""
    with pytest.raises(ConfigError, match="belongs to one athlete"):
        config.load(write(tmp_path, text))


def test_broken_yaml_says_where(tmp_path):
    with pytest.raises(ConfigError, match="line 2"):
        config.load(write(tmp_path, "hub:\n  id: [unclosed\n"))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_roster_maps_devices_and_names_unknown_ones(tmp_path):
    text = """
athletes:
  - id: alice
    age: 40
    devices: [{source: ble, id: "c0:ff:ee:00:00:01"}, {source: ant, id: "120:12345"}]
"""
    roster = config.load(write(tmp_path, text)).roster()
    assert roster.uid_for("ble", "C0:FF:EE:00:00:01") == "alice"
    assert roster.uid_for("ant", "120:12345") == "alice"
    assert roster.uid_for("ant", "120:999") == "ant:120:999"
    assert roster.athlete("alice").max_hr == 180


def test_unknown_devices_can_be_ignored(tmp_path):
    roster = config.load(write(tmp_path, "hub: {unknown_devices: ignore}\n")).roster()
    assert roster.uid_for("ble", "AA:BB:CC:DD:EE:FF") is None


def run_cli(
    *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_config_exits_78_naming_the_key(tmp_path):
    result = run_cli("check-config", str(write(tmp_path, "outputs: {mqtt: {port: x}}\n")))
    assert result.returncode == 78
    assert "outputs.mqtt.port" in result.stderr and "'x'" in result.stderr


def test_run_with_a_bad_config_never_starts(tmp_path):
    result = run_cli("run", "--config", str(write(tmp_path, "hub: {idd: x}\n")), "--seconds", "5")
    assert result.returncode == 78
    assert "hub.idd: unknown key" in result.stderr


def test_check_config_accepts_a_good_file(tmp_path):
    result = run_cli("check-config", str(write(tmp_path, "hub: {id: ok}\n")))
    assert result.returncode == 0 and "OK" in result.stdout

"""Topic names, payloads and the MQTT config section, without a broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatewayd import config as config_module
from gatewayd.config import MqttConfig
from gatewayd.errors import ConfigError
from gatewayd.hub import Hub
from gatewayd.model import DataType, Sample, format_ts
from gatewayd.sinks.mqtt import (
    SENSORS,
    MqttSink,
    Topics,
    athlete_payload,
    discovery_payload,
    level,
    object_id,
    sample_payload,
)


def test_a_topic_level_never_holds_separators_or_wildcards() -> None:
    assert level("C0:FF:EE:00:00:01") == "C0:FF:EE:00:00:01"
    assert level("a/b+c#d") == "a_b_c_d"
    assert level("") == "_"


def test_object_ids_are_home_assistant_safe_and_never_collide() -> None:
    assert object_id("anna") == "anna"
    lossy = object_id("ble:C0:FF:EE:00:00:09")
    assert lossy.startswith("ble_c0_ff_ee_00_00_09_")
    assert len(lossy) == len("ble_c0_ff_ee_00_00_09_") + 6
    assert object_id("a.b") != object_id("a_b")
    assert all(c.isalnum() or c in "_-" for c in object_id("Zoë @ gym.1"))


def test_topics_and_the_uid_inside_a_state_topic() -> None:
    topics = Topics("gym/floor1", "hub-7", "homeassistant")
    assert topics.status == "gym/floor1/hub-7/status"
    assert topics.sample("anna", DataType.POWER) == "gym/floor1/hub-7/athletes/anna/POWER"
    assert topics.device("ant", "120:12345") == "gym/floor1/hub-7/devices/ant/120:12345"
    assert topics.discovery("anna", DataType.HEART_RATE) == (
        "homeassistant/sensor/gatewayd_hub-7/anna_heart_rate/config"
    )
    assert topics.uid_level_of(topics.sample("ble:C0:FF", DataType.SPEED)) == "ble:C0:FF"
    assert topics.uid_level_of("other/hub-7/athletes/anna/POWER") is None
    assert topics.uid_level_of("gym/floor1/hub-7/athletes/anna") is None


def test_sample_payload_is_the_terra_object_plus_device_and_source() -> None:
    sample = Sample(
        "anna", DataType.HEART_RATE, 1_800_000_000.0, val=71.0, device_id="X", source="ble"
    )
    assert json.loads(sample_payload(sample)) == {
        "ts": "2027-01-15T08:00:00.000Z",
        "val": 71.0,
        "device": "X",
        "source": "ble",
    }


@pytest.mark.parametrize("t", list(DataType))
def test_every_data_type_has_a_well_formed_sensor(t: DataType) -> None:
    topics = Topics("gatewayd", "hub", "homeassistant")
    config = json.loads(discovery_payload(topics, "anna", "Anna", t, qos=1, expire_after_s=60))
    assert t in SENSORS
    assert config["state_topic"] == topics.sample("anna", t)
    assert config["unit_of_measurement"]
    assert config["state_class"] in {"measurement", "total_increasing"}
    assert config["value_template"].startswith("{{ value_json.")
    assert config["expire_after"] == 60
    assert config["unique_id"] == f"gatewayd_hub_anna_{t.lower()}"
    assert ("device_class" in config) != ("icon" in config)


def write(tmp_path: Path, mqtt: str) -> Path:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(f"outputs:\n  mqtt:\n{mqtt}")
    return path


def test_config_reads_both_protocol_spellings(tmp_path: Path) -> None:
    assert config_module.load(write(tmp_path, "    protocol: 5\n")).outputs.mqtt.protocol == "5"
    loaded = config_module.load(write(tmp_path, "    protocol: 3.1.1\n")).outputs.mqtt
    assert loaded.protocol == "3.1.1" and loaded.qos == 1 and loaded.clean_session is False


@pytest.mark.parametrize(
    ("yaml_lines", "key", "hint"),
    [
        ("    prefix: gym/#\n", "outputs.mqtt.prefix", "pattern"),
        ("    qos: 3\n", "outputs.mqtt.qos", "0, 1 or 2"),
        ("    password_file: /x\n    password_env: MQTT_PW\n", "outputs.mqtt", "not both"),
        ("    tls: {enabled: true, cert_file: /c.pem}\n", "outputs.mqtt.tls", "go together"),
        ("    offline_queue: 0\n", "outputs.mqtt.offline_queue", "greater than or equal"),
        ("    passwd: x\n", "outputs.mqtt.passwd", "unknown key"),
    ],
)
def test_bad_mqtt_config_names_the_key(
    tmp_path: Path, yaml_lines: str, key: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_module.load(write(tmp_path, yaml_lines))
    assert caught.value.key == key
    assert hint in str(caught.value)


PAYLOAD_CASES = [
    Sample("a", DataType.POWER, 1_800_000_000.0, val=212.5, device_id="11:7", source="ant"),
    Sample("a", DataType.HEART_RATE, 1_800_000_001.0, val=71, device_id="X", source="ble"),
    Sample("a", DataType.SPEED, 1_800_000_002.0, val=1e-7, device_id='é"\\', source="s"),
    Sample("a", DataType.CALORIES, 1_800_000_003.0, val=None, device_id="", source=""),
    Sample("a", DataType.RR_INTERVAL, 1_800_000_004.0, d=(812.0, 790.5), device_id="Z"),
    Sample("a", DataType.POWER, 1_800_000_005.0, val=float("nan"), device_id="n"),
    Sample("a", DataType.POWER, 1_800_000_005.0, val=float("inf"), device_id="n"),
    Sample("a", DataType.POWER, 1_800_000_005.0, val=-0.0, device_id="m", source="ant"),
    Sample("b/+#", DataType.BATTERY, 1_800_000_005.0, val=87.0, device_id="n", source="ble"),
]


def reference_payload(sample: Sample) -> bytes:
    """The standard library's encoder on the same record."""
    record = sample.payload()
    record["device"] = sample.device_id
    record["source"] = sample.source
    return json.dumps(record, separators=(",", ":")).encode()


@pytest.mark.parametrize("sample", PAYLOAD_CASES)
def test_sample_payload_is_byte_for_byte_what_json_dumps_writes(sample: Sample) -> None:
    expected = reference_payload(sample)
    assert sample_payload(sample) == expected
    assert sample_payload(sample, format_ts(sample.ts)) == expected


async def test_the_sinks_batch_path_writes_sample_payloads_bytes_on_their_topics() -> None:
    """MqttSink._samples caches parts of the payload per second and per device; what it queues
    (offline: no broker) is still json.dumps's bytes, device changes on a topic included."""
    hub = Hub()
    sink = MqttSink(hub.subscribe("mqtt"), MqttConfig(enabled=True), hub_id="gym")
    batch = [*PAYLOAD_CASES, *PAYLOAD_CASES[::-1]]
    sink._handle_batch(list(batch))
    topics = Topics("gatewayd", "gym", "homeassistant")
    assert list(sink._queue) == [(topics.sample(s.uid, s.t), reference_payload(s)) for s in batch]
    # the battery sample's device state, retained and apart
    device = topics.device("ble", "n")
    assert json.loads(sink._retained[device].payload)["battery"] == 87.0
    assert sink._retained[device].qos == 1


async def test_values_from_the_shared_text_cache_are_json_dumps_bytes() -> None:
    """The value texts come from a cache all outputs share (model.FLOAT_TEXT): values equal in
    Python but written differently (71 and 71.0, 0.0 and -0.0) never take each other's text."""
    sink = MqttSink(Hub().subscribe("mqtt"), MqttConfig(enabled=True), hub_id="gym")
    values = [71.0, 71, 0.0, -0.0, 1.0, True, 2.5, float("nan"), None, 1e16]
    batch = [
        Sample("a", DataType.POWER, 1_800_000_005.0, val=v, device_id="n", source="ant")
        for v in [*values, *values[::-1]]
    ]
    sink._handle_batch(list(batch))
    assert [payload for _, payload in sink._queue] == [reference_payload(s) for s in batch]


def test_athlete_payload_holds_every_type_of_the_second() -> None:
    ts = 1_800_000_000.0
    samples = [
        Sample("anna", DataType.HEART_RATE, ts, val=71.0),
        Sample("anna", DataType.RR_INTERVAL, ts, d=(812.0, 790.5)),
        Sample("anna", DataType.POWER, ts, val=212.5),
    ]
    assert json.loads(athlete_payload(samples, format_ts(ts))) == {
        "ts": "2027-01-15T08:00:00.000Z",
        "HEART_RATE": 71.0,
        "RR_INTERVAL": [812.0, 790.5],
        "POWER": 212.5,
    }
    assert Topics("gatewayd", "hub", "ha").athlete("a/b") == "gatewayd/hub/athletes/a_b"


def test_per_athlete_messages_and_discovery_do_not_go_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config_module.load(write(tmp_path, "    per_athlete: true\n    discovery: true\n"))
    assert caught.value.key == "outputs.mqtt"
    assert "discovery needs one topic per data type" in str(caught.value)

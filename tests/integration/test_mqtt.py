"""The MQTT sink against a real mosquitto on 127.0.0.1 (fixture: tests/integration/mosquitto.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import MqttConfig
from gatewayd.hub import Hub
from gatewayd.model import DataType, DeviceState, DeviceStatus, Sample
from gatewayd.roster import AthleteInfo, Roster
from gatewayd.sinks.mqtt import Link, MqttSink
from tests.integration.mosquitto import (
    WAIT_S,
    Mosquitto,
    Watcher,
    free_port,
    mosquitto,
    mosquitto_acl,
    mosquitto_auth,
    mosquitto_tls,
)

# fixtures, imported for pytest
__all__ = ["mosquitto", "mosquitto_acl", "mosquitto_auth", "mosquitto_tls"]

REPO = Path(__file__).resolve().parents[2]
TS = 1_800_000_000.0
HUB = "gym-1"


def config(broker: Mosquitto | None = None, **changes: Any) -> MqttConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": broker.port if broker else free_port(),
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
    }
    values.update(changes)
    return MqttConfig(**values)


def hr(uid: str, second: int, bpm: float = 71.0, device: str = "C0:FF:EE:00:00:01") -> Sample:
    return Sample(uid, DataType.HEART_RATE, TS + second, val=bpm, device_id=device, source="ble")


class Running:
    def __init__(self, sink: MqttSink, hub: Hub) -> None:
        self.sink = sink
        self.hub = hub


@contextlib.asynccontextmanager
async def running(
    cfg: MqttConfig, *, roster: Roster | None = None, connect: bool = True
) -> AsyncIterator[Running]:
    hub = Hub()
    sink = MqttSink(hub.subscribe("mqtt"), cfg, hub_id=HUB, roster=roster)
    task = asyncio.create_task(sink.run())
    try:
        if connect:
            await asyncio.wait_for(sink.wait_connected(), WAIT_S)
        yield Running(sink, hub)
    finally:
        await asyncio.wait_for(sink.close(), WAIT_S)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def payloads(watcher: Watcher, topic: str) -> list[Any]:
    return [json.loads(p) if p else None for p in watcher.on(topic)]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_samples_and_device_state_arrive_on_their_topics(
    mosquitto: Mosquitto, protocol: str
) -> None:
    watcher = await Watcher(mosquitto, [f"gatewayd/{HUB}/#"]).start()
    async with running(config(mosquitto, protocol=protocol)) as gw:
        gw.hub.publish(hr("anna", 0, 71))
        gw.hub.publish(
            Sample(
                "anna",
                DataType.RR_INTERVAL,
                TS + 0.25,
                val=812.0,
                device_id="C0:FF:EE:00:00:01",
                source="ble",
            )
        )
        gw.hub.publish(
            Sample(
                "ant:120:12345", DataType.POWER, TS + 1, val=250.0, device_id="11:777", source="ant"
            )
        )
        gw.hub.publish(
            DeviceStatus("anna", "C0:FF:EE:00:00:01", "ble", DeviceState.CONNECTED, TS, rssi=-61)
        )
        device_topic = f"gatewayd/{HUB}/devices/ble/C0:FF:EE:00:00:01"
        await watcher.wait_for(lambda _: watcher.on(device_topic))
        # Retained state keeps only the latest per device while it waits; the battery from a
        # BATTERY sample is merged into it.
        gw.hub.publish(
            Sample(
                "anna",
                DataType.BATTERY,
                TS + 2,
                val=87.0,
                device_id="C0:FF:EE:00:00:01",
                source="ble",
            )
        )
        gw.hub.publish(
            DeviceStatus(
                "anna",
                "C0:FF:EE:00:00:01",
                "ble",
                DeviceState.LOST,
                TS + 9,
                reason="silent for 5 s",
            )
        )
        await watcher.wait_for(
            lambda _: any(p and p["state"] == "lost" for p in payloads(watcher, device_topic))
        )
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
        assert gw.sink.stats()["published"] >= 6
    # a clean close says offline itself (a clean disconnect suppresses the will)
    base = f"gatewayd/{HUB}"
    await watcher.wait_for(lambda _: watcher.on(f"{base}/status")[-1:] == [b"offline"])
    watcher.stop()
    assert watcher.on(f"{base}/status")[0] == b"online"
    assert payloads(watcher, f"{base}/athletes/anna/HEART_RATE") == [
        {
            "ts": "2027-01-15T08:00:00.000Z",
            "val": 71.0,
            "device": "C0:FF:EE:00:00:01",
            "source": "ble",
        }
    ]
    assert payloads(watcher, f"{base}/athletes/anna/RR_INTERVAL") == [
        {
            "ts": "2027-01-15T08:00:00.250Z",
            "val": 812.0,
            "device": "C0:FF:EE:00:00:01",
            "source": "ble",
        }
    ]
    assert payloads(watcher, f"{base}/athletes/ant:120:12345/POWER") == [
        {"ts": "2027-01-15T08:00:01.000Z", "val": 250.0, "device": "11:777", "source": "ant"}
    ]
    states = payloads(watcher, device_topic)
    assert states[0]["state"] == "connected" and states[0]["rssi"] == -61
    # battery from the BATTERY sample, kept in later states; the lost state names its reason
    assert states[-1] == {
        "state": "lost",
        "uid": "anna",
        "ts": "2027-01-15T08:00:09.000Z",
        "reason": "silent for 5 s",
        "battery": 87.0,
        "rssi": -61,
        "source": "ble",
        "device": "C0:FF:EE:00:00:01",
    }


async def test_per_athlete_sends_one_message_per_athlete_and_second(mosquitto: Mosquitto) -> None:
    watcher = await Watcher(mosquitto, [f"gatewayd/{HUB}/athletes/#"]).start()
    async with running(config(mosquitto, per_athlete=True)) as gw:
        for second in (0, 1):
            gw.hub.publish(hr("anna", second, 71 + second))
            gw.hub.publish(Sample("anna", DataType.RR_INTERVAL, TS + second, d=(812.0, 790.5)))
            gw.hub.publish(Sample("anna", DataType.POWER, TS + second, val=250.0 + second))
            gw.hub.publish(hr("bob", second, 90))
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
        await watcher.wait_for(lambda messages: len(messages) >= 4)
    topics = sorted({topic for topic, _, _ in watcher.messages})
    assert topics == [f"gatewayd/{HUB}/athletes/anna", f"gatewayd/{HUB}/athletes/bob"]
    assert payloads(watcher, f"gatewayd/{HUB}/athletes/anna") == [
        {
            "ts": f"2027-01-15T08:00:0{second}.000Z",
            "HEART_RATE": 71.0 + second,
            "RR_INTERVAL": [812.0, 790.5],
            "POWER": 250.0 + second,
        }
        for second in (0, 1)
    ]
    assert len(watcher.on(f"gatewayd/{HUB}/athletes/bob")) == 2
    assert len(watcher.messages) == 4


async def test_retained_state_seen_by_mosquitto_sub(mosquitto: Mosquitto) -> None:
    async with running(config(mosquitto)) as gw:
        gw.hub.publish(
            DeviceStatus("bob", "120:4242", "ant", DeviceState.CONNECTED, TS, battery=55.0)
        )
        gw.hub.publish(hr("bob", 0, 90, device="120:4242"))
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
        # a late subscriber gets the retained status and device state, not the sample
        result = await asyncio.create_subprocess_exec(
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(mosquitto.port),
            "-t",
            f"gatewayd/{HUB}/#",
            "-F",
            "%r %t %p",
            "-C",
            "2",
            "-W",
            str(int(WAIT_S)),
            stdout=subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(result.communicate(), WAIT_S + 5)
    lines = sorted(out.decode().splitlines())
    assert lines[0].startswith(f"1 gatewayd/{HUB}/devices/ant/120:4242 ")
    assert json.loads(lines[0].split(" ", 2)[2])["battery"] == 55.0
    assert lines[1] == f"1 gatewayd/{HUB}/status online"


async def test_qos1_samples_survive_a_broker_restart(mosquitto: Mosquitto) -> None:
    topic = f"gatewayd/{HUB}/athletes/anna/HEART_RATE"
    watcher_id = f"watch-restart-{os.getpid()}"
    first = await Watcher(mosquitto, [topic], client_id=watcher_id, persistent=True).start()

    def seconds(messages: list[tuple[str, bytes, bool]]) -> set[int]:
        return {int(json.loads(p)["val"]) for t, p, _ in messages if t == topic}

    async with running(config(mosquitto, qos=1)) as gw:
        for second in range(10):
            gw.hub.publish(hr("anna", second, second))
        await first.wait_for(lambda m: seconds(m) >= set(range(10)))
        first.stop()  # offline, but its session (and QoS 1 subscription) stays at the broker

        for second in range(10, 20):
            gw.hub.publish(hr("anna", second, second))
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)  # acked: the broker holds them
        for second in range(20, 30):  # some may be on the wire when the broker goes
            gw.hub.publish(hr("anna", second, second))
        await asyncio.sleep(0)  # let the sink hand them to paho: the in-flight case
        mosquitto.stop()
        await asyncio.wait_for(
            gw.sink.wait_for_link(lambda s: s.link is not Link.CONNECTED), WAIT_S
        )
        for second in range(30, 40):  # broker down: queued by the sink
            gw.hub.publish(hr("anna", second, second))
        await asyncio.wait_for(gw.sink.wait_for_link(lambda s: s.failed_attempts > 0), WAIT_S)
        assert gw.sink.stats()["queued"] + gw.sink.stats()["in_flight"] >= 10
        mosquitto.start()
        await asyncio.wait_for(gw.sink.wait_connected(), WAIT_S)
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
        assert gw.sink.dropped == 0

        second_run = await Watcher(
            mosquitto, [topic], client_id=watcher_id, persistent=True
        ).start()
        await second_run.wait_for(lambda m: seconds(m) >= set(range(10, 40)))
        second_run.stop()


async def test_reconnects_back_off_on_the_loop_and_start_again_at_the_minimum(
    tmp_path: Path,
) -> None:
    """The event loop drives paho (gatewayd/sinks/mqtt_loop.py), no thread of paho's: failed
    attempts wait paho's backoff, doubling from reconnect_min_s up to reconnect_max_s, and a
    successful CONNACK resets it (paho's own bookkeeping, kept)."""
    mosquitto = Mosquitto(tmp_path / "mosquitto")  # its port, not started yet
    cfg = config(mosquitto, reconnect_min_s=0.02, reconnect_max_s=0.08)
    try:
        async with running(cfg, connect=False) as gw:
            ours = f"paho-mqtt-client-{gw.sink.client_id}"  # paho's name for its thread
            assert not [t for t in threading.enumerate() if t.name == ours]
            client = gw.sink._client
            delays: list[float | None] = []

            def failed_again(sink: MqttSink) -> bool:
                delays.append(client._reconnect_delay)
                return sink.failed_attempts >= 5

            await asyncio.wait_for(gw.sink.wait_for_link(failed_again), WAIT_S)
            assert gw.sink.link is Link.UNREACHABLE
            # seen as each failure is reported: the wait that follows it (None: no failure yet)
            assert delays == [None, 0.02, 0.04, 0.08, 0.08, 0.08]
            mosquitto.start()
            await asyncio.wait_for(gw.sink.wait_connected(), WAIT_S)
            assert client._reconnect_delay is None
            for second in range(5):
                gw.hub.publish(hr("anna", second))
            await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
            mosquitto.stop()
            await asyncio.wait_for(gw.sink.wait_for_link(lambda s: s.link is Link.LOST), WAIT_S)
            await asyncio.wait_for(gw.sink.wait_for_link(lambda s: s.failed_attempts >= 6), WAIT_S)
            # the minimum waited after the loss, then 0.04 after this failed attempt
            assert client._reconnect_delay == 0.04
            mosquitto.start()
            await asyncio.wait_for(gw.sink.wait_connected(), WAIT_S)
            await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
            assert gw.sink.published >= 7  # "online" twice and the samples
    finally:
        mosquitto.stop()
    assert gw.sink.link is Link.CLOSED


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_acks_in_bulk_count_every_message_and_refusals_apart(
    mosquitto_acl: Mosquitto, protocol: str
) -> None:
    """mosquitto answers, in one stream: Success (anna's heart rate has a subscriber), No
    matching subscribers (her power has none), Not authorized (bob may not publish). The first
    two go through the client's bulk path (gatewayd/sinks/mqtt_client.py), refusals through
    paho's own reader. MQTT 3.1.1 cannot refuse: mosquitto acknowledges and drops."""
    base = f"gatewayd/{HUB}/athletes"
    watcher = await Watcher(mosquitto_acl, [f"{base}/+/HEART_RATE"]).start()
    async with running(config(mosquitto_acl, protocol=protocol)) as gw:
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)  # "online" is out
        before = gw.sink.published
        for second in range(300):
            gw.hub.publish(hr("anna", second, second))
            gw.hub.publish(
                Sample(
                    "anna", DataType.POWER, TS + second, val=200.0, device_id="11:7", source="ant"
                )
            )
            if second % 3 == 0:
                gw.hub.publish(hr("bob", second, second, device="C0:FF:EE:00:00:02"))
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
        stats = gw.sink.stats()
        published = gw.sink.published - before
        fast = gw.sink._client.fast_acks
        await watcher.wait_for(lambda _: len(watcher.on(f"{base}/anna/HEART_RATE")) == 300)
    watcher.stop()
    assert stats["in_flight"] == stats["queued"] == 0
    if protocol == "5":
        assert (published, stats["rejected"]) == (600, 100)
        assert fast >= 600  # every accepted message (and "online")
    else:
        assert (published, stats["rejected"]) == (700, 0)
        assert fast >= 700
    assert [json.loads(p)["val"] for p in watcher.on(f"{base}/anna/HEART_RATE")] == [
        float(second) for second in range(300)
    ]
    assert watcher.on(f"{base}/bob/HEART_RATE") == []


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_qos0_samples_are_counted_when_written(mosquitto: Mosquitto, protocol: str) -> None:
    """QoS 0 messages reach the sink's counters through the client's bulk `written` report
    (gatewayd/sinks/mqtt_client.py), not one on_publish each."""
    topic = f"gatewayd/{HUB}/athletes/anna/HEART_RATE"
    watcher = await Watcher(mosquitto, [topic]).start()
    async with running(config(mosquitto, protocol=protocol, qos=0)) as gw:
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
        before = gw.sink.published
        for second in range(300):
            gw.hub.publish(hr("anna", second, second))
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
        assert gw.sink.published - before == 300
        assert gw.sink.stats()["in_flight"] == 0
        await watcher.wait_for(lambda _: len(watcher.on(topic)) == 300)
    watcher.stop()
    assert [json.loads(p)["val"] for p in watcher.on(topic)] == [float(s) for s in range(300)]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_wrong_credentials_log_once_and_recover_when_fixed(
    mosquitto_auth: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    caplog.set_level(logging.INFO, logger="gatewayd.sinks.mqtt")
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("not-the-password\n")
    cfg = config(mosquitto_auth, username="gym", password_file=password_file, protocol=protocol)
    async with running(cfg, connect=False) as gw:
        await asyncio.wait_for(gw.sink.wait_for_link(lambda s: s.failed_attempts >= 4), WAIT_S)
        assert gw.sink.link is Link.REFUSED
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        message = refusals[0].getMessage()
        assert refusals[0].levelno == logging.ERROR
        assert f"127.0.0.1:{mosquitto_auth.port}" in message
        assert "Bad user name or password" in message or "Not authorized" in message
        assert "outputs.mqtt.username" in message and str(password_file) in message

        gw.hub.publish(hr("anna", 0, 64))  # queued meanwhile
        password_file.write_text("s3cret-pass\n")
        await asyncio.wait_for(gw.sink.wait_connected(), WAIT_S)
        await asyncio.wait_for(gw.sink.wait_idle(), WAIT_S)
        assert gw.sink.published >= 2  # "online" and the queued sample
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "not-the-password" not in logged and "s3cret-pass" not in logged
    assert sum("MQTT connected" in r.getMessage() for r in caplog.records) == 1


async def test_password_from_the_environment(
    mosquitto_auth: Mosquitto, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    variable = f"GATEWAYD_TEST_MQTT_PASSWORD_{os.getpid()}"
    cfg = config(mosquitto_auth, username="gym", password_env=variable)
    async with running(cfg, connect=False) as gw:
        await asyncio.wait_for(gw.sink.wait_for_link(lambda s: s.failed_attempts >= 2), WAIT_S)
        unset = [r.getMessage() for r in caplog.records if variable in r.getMessage()]
        assert len(unset) == 1 and "is not set" in unset[0]
        assert gw.sink.link is Link.NO_PASSWORD
        monkeypatch.setenv(variable, "s3cret-pass")
        await asyncio.wait_for(gw.sink.wait_connected(), WAIT_S)


async def test_unreachable_broker_logs_once_and_bounds_its_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gatewayd.sinks.mqtt")
    async with running(config(None, offline_queue=10, qos=0), connect=False) as gw:
        for second in range(25):
            gw.hub.publish(hr("anna", second))
        await asyncio.wait_for(gw.sink.wait_for_link(lambda s: s.failed_attempts >= 4), WAIT_S)
        assert gw.sink.link is Link.UNREACHABLE
        assert gw.sink.dropped == 15
        assert gw.sink.stats()["queued"] == 10 + 0  # no retained state was produced
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    assert "Connection refused" in unreachable[0].getMessage()
    dropping = [r for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(dropping) == 1


def discovery_topic(uid_object: str, kind: str) -> str:
    return f"homeassistant/sensor/gatewayd_gym-1/{uid_object}_{kind}/config"


async def test_home_assistant_discovery_is_well_formed_and_follows_the_roster(
    mosquitto: Mosquitto,
) -> None:
    watcher = await Watcher(mosquitto, ["homeassistant/#"], retain_as_published=True).start()
    roster = Roster(
        [AthleteInfo("anna", "Anna K", 190, 2.1)], {("ble", "C0:FF:EE:00:00:01"): "anna"}
    )
    async with running(config(mosquitto, discovery=True), roster=roster) as gw:
        gw.hub.publish(hr("anna", 0))
        gw.hub.publish(
            Sample(
                "anna",
                DataType.RR_INTERVAL,
                TS,
                val=800.0,
                device_id="C0:FF:EE:00:00:01",
                source="ble",
            )
        )
        gw.hub.publish(
            Sample(
                "ble:C0:FF:EE:00:00:09",
                DataType.POWER,
                TS,
                val=200.0,
                device_id="C0:FF:EE:00:00:09",
                source="ble",
            )
        )
        hr_topic = discovery_topic("anna", "heart_rate")
        rr_topic = discovery_topic("anna", "rr_interval")
        await watcher.wait_for(lambda _: watcher.on(hr_topic) and watcher.on(rr_topic))
        await watcher.wait_for(lambda m: any(t.endswith("_power/config") for t, _, _ in m))
        guest = [t for t, _, _ in watcher.messages if t.endswith("_power/config")]

        config_hr = json.loads(watcher.on(hr_topic)[0])
        assert config_hr["state_topic"] == f"gatewayd/{HUB}/athletes/anna/HEART_RATE"
        assert config_hr["unit_of_measurement"] == "bpm"
        assert config_hr["state_class"] == "measurement"
        assert config_hr["value_template"] == "{{ value_json.val }}"
        assert config_hr["availability_topic"] == f"gatewayd/{HUB}/status"
        assert config_hr["device"]["name"] == "Anna K"
        assert config_hr["unique_id"] == "gatewayd_gym-1_anna_heart_rate"
        config_rr = json.loads(watcher.on(rr_topic)[0])
        assert config_rr["device_class"] == "duration" and config_rr["unit_of_measurement"] == "ms"
        assert config_rr["device"]["identifiers"] == config_hr["device"]["identifiers"]
        # an id that HA would not take as is gets a slug plus a hash, so ids never collide
        assert len(guest) == 1
        config_power = json.loads(watcher.on(guest[0])[0])
        assert (
            config_power["device_class"] == "power" and config_power["unit_of_measurement"] == "W"
        )
        assert config_power["state_topic"] == f"gatewayd/{HUB}/athletes/ble:C0:FF:EE:00:00:09/POWER"
        for topic in (hr_topic, rr_topic, guest[0]):
            assert all(r for t, _, r in watcher.messages if t == topic)  # retained

        # Anna leaves the roster (SIGHUP): her sensors are removed with empty retained configs.
        gw.sink.set_roster(Roster([], {}))
        await watcher.wait_for(
            lambda _: b"" in watcher.on(hr_topic) and b"" in watcher.on(rr_topic)
        )
        assert watcher.on(guest[0]).count(b"") == 0  # seen this run: kept until the next start
    watcher.stop()

    # The next start no longer knows the guest (not in the roster, not seen yet): removed.
    late = await Watcher(mosquitto, ["homeassistant/#"]).start()
    async with running(config(mosquitto, discovery=True), roster=Roster([], {})):
        await late.wait_for(lambda _: b"" in late.on(guest[0]))
    late.stop()
    assert late.on(hr_topic) == []  # already gone: nothing retained, nothing sent


# -- the daemon itself, in a subprocess ---------------------------------------------------------


@pytest.fixture
def daemon_config(tmp_path: Path, mosquitto: Mosquitto) -> Path:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(
        f"""
hub: {{id: {HUB}, state_dir: {tmp_path / "state"}}}
sources:
  simulator: {{enabled: true, athletes: 2, bike_fraction: 0.0}}
outputs:
  local_broker: {{enabled: false}}
  mqtt:
    enabled: true
    host: 127.0.0.1
    port: {mosquitto.port}
    reconnect_min_s: 0.05
    reconnect_max_s: 0.2
"""
    )
    return path


@pytest.fixture
def daemon(daemon_config: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "--config", str(daemon_config)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(WAIT_S)


async def test_last_will_says_offline_when_the_daemon_is_killed(
    mosquitto: Mosquitto, daemon: subprocess.Popen[bytes]
) -> None:
    status = f"gatewayd/{HUB}/status"
    watcher = await Watcher(mosquitto, [f"gatewayd/{HUB}/#"]).start()
    await watcher.wait_for(
        lambda m: watcher.on(status)[-1:] == [b"online"] and any("/athletes/" in t for t, _, _ in m)
    )
    daemon.send_signal(signal.SIGKILL)
    await watcher.wait_for(lambda _: watcher.on(status)[-1:] == [b"offline"])
    watcher.stop()
    # and it is retained: a later subscriber learns the hub is offline
    late = await Watcher(mosquitto, [status]).start()
    await late.wait_for(lambda m: m == [(status, b"offline", True)])
    late.stop()


async def test_sigterm_publishes_offline_and_exits_cleanly(
    mosquitto: Mosquitto, daemon: subprocess.Popen[bytes]
) -> None:
    status = f"gatewayd/{HUB}/status"
    watcher = await Watcher(mosquitto, [status]).start()
    await watcher.wait_for(lambda _: watcher.on(status)[-1:] == [b"online"])
    daemon.send_signal(signal.SIGTERM)
    await watcher.wait_for(lambda _: watcher.on(status)[-1:] == [b"offline"])
    watcher.stop()
    code = await asyncio.to_thread(daemon.wait, WAIT_S)
    assert code == 0
    assert daemon.stderr is not None
    log = daemon.stderr.read().decode()
    assert "MQTT connected" in log and "MQTT closed" in log


async def test_other_outputs_keep_working_while_the_broker_is_unreachable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(
        f"""
hub: {{id: {HUB}, state_dir: {tmp_path / "state"}}}
sources:
  simulator: {{enabled: true, athletes: 2, bike_fraction: 0.0}}
outputs:
  local_broker: {{enabled: false}}
  stdout: {{enabled: true}}
  mqtt: {{enabled: true, port: {free_port()}, reconnect_min_s: 0.05, reconnect_max_s: 0.1}}
"""
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "run",
        "--config",
        str(path),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        samples = 0
        while samples < 6:  # three seconds of two athletes' heart rate, while MQTT is down
            line = await asyncio.wait_for(process.stdout.readline(), WAIT_S)
            assert line, "the daemon exited"
            samples += '"t":"HEART_RATE"' in line.decode()
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), WAIT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = err.decode()
    assert process.returncode == 0
    # dozens of attempts in those seconds, one line about them
    assert log.count("unreachable") == 1, log
    assert "Connection refused" in log


async def test_tls_with_the_brokers_ca_and_a_clear_error_with_another(
    mosquitto_tls: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.integration.mosquitto import make_certificates

    assert mosquitto_tls.tls_port is not None
    topic = f"gatewayd/{HUB}/athletes/anna/HEART_RATE"
    watcher = await Watcher(mosquitto_tls, [topic]).start()  # on the plain listener
    tls = {"enabled": True, "ca_file": mosquitto_tls.ca_file}
    async with running(config(mosquitto_tls, port=mosquitto_tls.tls_port, tls=tls)) as gw:
        gw.hub.publish(hr("anna", 0, 66))
        await watcher.wait_for(lambda _: watcher.on(topic))
    watcher.stop()
    assert json.loads(watcher.on(topic)[0])["val"] == 66.0

    caplog.set_level(logging.INFO, logger="gatewayd.sinks.mqtt")
    other = tmp_path / "other-ca"
    other.mkdir()
    make_certificates(other, other / "ca.pem")
    tls = {"enabled": True, "ca_file": other / "ca.pem"}
    cfg = config(mosquitto_tls, port=mosquitto_tls.tls_port, tls=tls)
    async with running(cfg, connect=False) as gw:
        await asyncio.wait_for(gw.sink.wait_for_link(lambda s: s.failed_attempts >= 3), WAIT_S)
    failures = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(failures) == 1 and "CERTIFICATE_VERIFY_FAILED" in failures[0], failures


async def test_sighup_removes_the_sensors_of_an_athlete_gone_from_the_roster(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    anna = discovery_topic("anna", "heart_rate")
    seeded = {"state_topic": f"gatewayd/{HUB}/athletes/anna/HEART_RATE", "name": "Heart rate"}
    seed = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-q", "1", "-r",
        "-t", anna, "-m", json.dumps(seeded),
    )  # fmt: skip
    assert await asyncio.wait_for(seed.wait(), WAIT_S) == 0  # as if left by an earlier run

    def write_config(athletes: str) -> Path:
        path = tmp_path / "gatewayd.yaml"
        path.write_text(
            f"""
hub: {{id: {HUB}, state_dir: {tmp_path / "state"}}}
athletes: {athletes}
sources:
  simulator: {{enabled: true, athletes: 1, bike_fraction: 0.0}}
outputs:
  local_broker: {{enabled: false}}
  mqtt: {{enabled: true, port: {mosquitto.port}, discovery: true}}
"""
        )
        return path

    path = write_config("[{id: anna, name: Anna, devices: [{source: ble, id: C0:FF:EE:00:00:AA}]}]")
    watcher = await Watcher(mosquitto, ["homeassistant/#"]).start()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", "run", "--config", str(path),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        simulated = discovery_topic("sim-01", "heart_rate")
        await watcher.wait_for(lambda _: watcher.on(simulated))
        assert b"" not in watcher.on(anna)  # in the roster: kept although silent
        write_config("[]")
        process.send_signal(signal.SIGHUP)
        await watcher.wait_for(lambda _: b"" in watcher.on(anna))
        assert b"" not in watcher.on(simulated)
    finally:
        watcher.stop()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode == 0

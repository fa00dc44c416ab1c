"""The admin JSON API on the real daemon's broker, over loopback, with stdlib's HTTP client (not
our code) on one side: tokens, enrolment applied live, bodies bounded, the store across restarts."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from gatewayd import protocol as p
from tests.daemon import Daemon, daemon_env, daemon_process

CONSUMER = "admin-test-consumer"
CONFIG = (
    "sources: {simulator: {enabled: true, athletes: 2, bike_fraction: 0.0, hr_straps: ble}}\n"
    f"outputs: {{local_broker: {{enabled: true, consumer_tokens: [{CONSUMER}]}}}}\n"
    "athletes:\n"
    "  - {id: carol, name: Carol, devices: [{source: ant, id: '120:777'}]}\n"
)


def mint_admin(tmp_path: Path) -> str:
    """`gatewayd token create --role admin`, as an installer would run it."""
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "token", "create", "--role", "admin"],
        capture_output=True,
        text=True,
        check=True,
        env=daemon_env(tmp_path, GATEWAYD_HUB__STATE_DIR=str(tmp_path / "state")),
    )
    return out.stdout.strip()


def call(
    daemon: Daemon,
    method: str,
    path: str,
    token: str | None,
    body: object = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"{daemon.http_url}{path}", data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read()
            if answer.headers.get_content_type() != "application/json":
                return answer.status, text.decode()
            return answer.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if text.startswith(b"{") else text.decode()


async def acall(*args: Any, **kwargs: Any) -> tuple[int, Any]:
    return await asyncio.to_thread(call, *args, **kwargs)


async def wait_for_devices(daemon: Daemon, token: str, n: int) -> list[dict[str, Any]]:
    """Ask again after each DISPATCH a consumer receives: samples are the sign that the pipeline
    has heard devices (a log line is no such sign: the daemon may log nothing more)."""
    async with connect(daemon.broker_url) as ws:
        assert json.loads(await ws.recv())["op"] == 2
        await ws.send(p.identify(CONSUMER, p.Role.CONSUMER))
        assert json.loads(await ws.recv()) == {"op": 4}
        while True:
            status, devices = await acall(daemon, "GET", "/api/devices", token)
            assert status == 200
            if len(devices) >= n and all(d["kind"] for d in devices):
                return devices  # type: ignore[no-any-return]
            await asyncio.wait_for(ws.recv(), 30)


async def test_tokens_are_required(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, CONFIG) as daemon:
        admin = mint_admin(tmp_path)
        assert (await acall(daemon, "GET", "/api/devices", None))[0] == 401
        assert (await acall(daemon, "GET", "/api/athletes", "wrong-token"))[0] == 401
        assert (await acall(daemon, "GET", "/api/athletes", CONSUMER))[0] == 401  # not admin
        status, error = await acall(daemon, "PUT", "/api/athletes/x", "wrong", body={"name": "X"})
        assert status == 401 and "admin token" in error["error"]
        status, athletes = await acall(daemon, "GET", "/api/athletes", admin)
        assert status == 200
        assert {a["id"] for a in athletes} == {"carol", "sim-01", "sim-02"}
        carol = next(a for a in athletes if a["id"] == "carol")
        assert carol["devices"] == [{"source": "ant", "id": "120:777"}]
        assert carol["origin"] == "config"
    assert admin not in daemon.log


async def test_enrolment_applies_at_once_without_dropping_a_consumer(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, CONFIG) as daemon:
        admin = mint_admin(tmp_path)
        devices = await wait_for_devices(daemon, admin, 2)
        assert {d["athlete"] for d in devices} == {"sim-01", "sim-02"}
        assert all(d["source"] == "ble" and d["kind"] == "heart_rate" for d in devices)
        assert all(isinstance(d["rssi"], int) and d["last_seen"].endswith("Z") for d in devices)
        strap = next(d for d in devices if d["athlete"] == "sim-01")

        async with connect(daemon.broker_url) as ws:
            assert json.loads(await ws.recv())["op"] == 2
            await ws.send(p.identify(CONSUMER, p.Role.CONSUMER))
            assert json.loads(await ws.recv()) == {"op": 4}

            body = {
                "name": "Alice Martin",
                "age": 35,
                "weight_kg": 61.5,
                "sex": "female",
                "devices": [{"source": strap["source"], "id": strap["id"].lower()}],
            }
            status, created = await acall(daemon, "PUT", "/api/athletes/alice", admin, body=body)
            assert status == 201, created
            assert created["devices"] == [{"source": "ble", "id": strap["id"]}]
            assert created["max_hr"] is None and created["weight_kg"] == 61.5

            # The same connection now gets the strap's heart rate as alice's.
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame.get("uid") == "alice" and frame["d"].get("val") is not None:
                    break

        status, athletes = await acall(daemon, "GET", "/api/athletes", admin)
        by_id = {a["id"]: a for a in athletes}
        assert by_id["alice"]["origin"] == "admin"
        assert by_id["sim-01"]["devices"] == []  # the strap moved
        status, devices = await acall(daemon, "GET", "/api/devices", admin)
        assert next(d for d in devices if d["id"] == strap["id"])["athlete"] == "alice"

        status, renamed = await acall(
            daemon, "PUT", "/api/athletes/alice", admin, body={**created, "name": "Alice M."}
        )
        assert status == 200 and renamed["name"] == "Alice M."
        assert renamed["devices"] == created["devices"]

        # Deleting carol (the config's) is refused; alice (the page's) goes.
        assert (await acall(daemon, "DELETE", "/api/athletes/carol", admin))[0] == 409
        assert (await acall(daemon, "DELETE", "/api/athletes/nobody", admin))[0] == 404
        assert (await acall(daemon, "DELETE", "/api/athletes/alice", admin))[0] == 204
        status, athletes = await acall(daemon, "GET", "/api/athletes", admin)
        assert "alice" not in {a["id"] for a in athletes}


async def test_bad_bodies_name_the_field_and_big_ones_are_refused(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, CONFIG) as daemon:
        admin = mint_admin(tmp_path)
        cases: list[tuple[object, str]] = [
            ({"max_hr": 400}, "max_hr"),
            ({"sex": "x"}, "sex"),
            ({"weight_kg": "heavy"}, "weight_kg"),
            ({"devices": [{"source": "zigbee", "id": "1"}]}, "devices[0].source"),
            ({"devices": [{"source": "ant", "id": ""}]}, "devices[0].id"),
            ({"nickname": "Al"}, "nickname"),
            ({"id": "bob"}, "id"),
            ([1, 2], "body"),
        ]
        for body, field in cases:
            status, error = await acall(daemon, "PUT", "/api/athletes/al", admin, body=body)
            assert (status, error.get("field")) == (400, field), (body, error)
        status, error = await acall(daemon, "PUT", "/api/athletes/al", admin, raw=b"{not json")
        assert (status, error["field"]) == (400, "body")
        status, error = await acall(daemon, "PUT", "/api/athletes/bad%20id", admin, body={})
        assert (status, error["field"]) == (400, "id")
        big = json.dumps({"name": "x" * 70_000}).encode()
        assert (await acall(daemon, "PUT", "/api/athletes/al", admin, raw=big))[0] == 413
        # A body with a wrong token is refused before it is read.
        status, _ = await acall(daemon, "PUT", "/api/athletes/al", "nope", raw=big)
        assert status == 401
        # Nothing was stored by any of these.
        status, athletes = await acall(daemon, "GET", "/api/athletes", admin)
        assert "al" not in {a["id"] for a in athletes}
        assert not (tmp_path / "state" / "athletes.json").exists()

        # A body on a non-API path is still websockets' to refuse (it closes without an
        # answer), and the broker lives on.
        with socket.create_connection(("127.0.0.1", daemon.broker_port or 0), 10) as raw_socket:
            raw_socket.sendall(b"POST /connect HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert raw_socket.recv(100) in (b"", b"HTTP/1.1 400")
        assert (await acall(daemon, "GET", "/api/athletes", admin))[0] == 200


async def test_the_roster_survives_a_restart_and_a_broken_file_is_kept(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, CONFIG) as daemon:
        admin = mint_admin(tmp_path)
        body = {"name": "Dan", "devices": [{"source": "ant", "id": "120:777"}]}
        assert (await acall(daemon, "PUT", "/api/athletes/dan", admin, body=body))[0] == 201
    stored = json.loads((tmp_path / "state" / "athletes.json").read_text())
    assert [a["id"] for a in stored["athletes"]] == ["dan"]
    assert (tmp_path / "state" / "athletes.json").stat().st_mode & 0o077 == 0

    async with daemon_process(tmp_path, CONFIG) as daemon:
        status, athletes = await acall(daemon, "GET", "/api/athletes", admin)
        by_id = {a["id"]: a for a in athletes}
        # The store wins over the config for a device both name.
        assert by_id["dan"]["devices"] == [{"source": "ant", "id": "120:777"}]
        assert by_id["carol"]["devices"] == []

    (tmp_path / "state" / "athletes.json").write_text("{half a file")
    async with daemon_process(tmp_path, CONFIG) as daemon:
        await daemon.wait_for_log("not a roster this version understands")
        status, athletes = await acall(daemon, "GET", "/api/athletes", admin)
        assert status == 200
        assert "dan" not in {a["id"] for a in athletes}
        assert (await acall(daemon, "PUT", "/api/athletes/eve", admin, body={}))[0] == 201
    assert (tmp_path / "state" / "athletes.json.bad-1").read_text() == "{half a file"


async def test_a_fresh_install_logs_a_one_time_admin_link(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, CONFIG) as daemon:
        match = await daemon.wait_for_log(r"one-time link on the staff tablet: (\S+)#setup=(\S+)")
        assert match.group(1) == f"{daemon.http_url}/admin"
        setup = match.group(2)
        assert (await acall(daemon, "GET", "/api/athletes", setup))[0] == 401  # not admin
        status, claimed = await acall(daemon, "POST", "/api/claim", setup)
        assert status == 200
        assert (await acall(daemon, "POST", "/api/claim", setup))[0] == 401  # used
        assert (await acall(daemon, "GET", "/api/athletes", claimed["token"]))[0] == 200
        status, page = await acall(daemon, "GET", "/admin", None)
        assert status == 200 and "<title>" in page
    async with daemon_process(tmp_path, CONFIG) as again:
        pass
    assert "one-time link" not in again.log  # an admin token exists now

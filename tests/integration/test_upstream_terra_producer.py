"""The real daemon's upstream as a Terra producer, judged by Terra's AsyncAPI (2026.07.07).

The receiver is Terra-shaped and written here from the AsyncAPI's facts: one port answers
`POST /auth/user?id=` (rt-bundled.yaml) and serves `/connect` (HELLO, READY, HEARTBEAT_ACK). Every
frame the daemon sends must validate against our schemas of the client messages, every token
request must be what Terra's OpenAPI asks for, and a clean stop must close each socket with a
close frame (1000 or 1001) after its last HEARTBEAT was ACKed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests import terra_asyncapi as spec
from tests.daemon import daemon_process

DEV_ID = "gym-dev"
API_KEY = "terra-api-key-for-tests-0123"
USERS = {"sim-01": "tu-1", "sim-02": "tu-2"}
WAIT = 60.0  # a guard on waits, never a sleep


@dataclass
class Socket:
    frames: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    last_was_acked: bool = False
    close_code: int | None = None
    close_frame: bool = False


class TerraReceiver:
    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}  # token -> Terra user id
        self.mint_requests: list[tuple[str, str, dict[str, str]]] = []
        self.sockets: list[Socket] = []
        self.submits = 0
        self.progress = asyncio.Event()
        self.port = 0

    def http(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path == "/connect":
            return None
        self.mint_requests.append((request.method, request.path, dict(request.headers)))
        ids = urllib.parse.parse_qs(query).get("id", [])
        if request.method != "POST" or path != "/auth/user" or len(ids) != 1:
            return connection.respond(400, "bad request\n")
        if (request.headers.get("dev-id"), request.headers.get("x-api-key")) != (DEV_ID, API_KEY):
            return connection.respond(403, "forbidden\n")
        token = secrets.token_urlsafe(16)
        self.tokens[token] = ids[0]
        response = connection.respond(200, json.dumps({"token": token}))
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    async def handle(self, ws: ServerConnection) -> None:
        sock = Socket()
        self.sockets.append(sock)
        await ws.send(json.dumps({"op": 2, "d": {"heartbeat_interval": 2000}}))
        try:
            async for text in ws:
                frame = json.loads(text)
                sock.frames.append(frame)
                problems = spec.errors(frame, server=False)
                if problems:
                    sock.invalid.append(f"{frame}: {problems}")
                op = frame.get("op")
                sock.last_was_acked = False
                if op == 3:
                    if self.tokens.pop(frame["d"]["token"], None) is None:
                        await ws.close(4001, "token invalid, expired or already redeemed")
                        return
                    await ws.send('{"op":4}')
                elif op == 0:
                    await ws.send('{"op":1}')
                    sock.last_was_acked = True
                elif op == 6:
                    self.submits += 1
                    if problems := spec.payload_errors(frame["d"]):
                        sock.invalid.append(f"{frame}: {problems}")
                self.progress.set()
        except ConnectionClosed:
            pass
        sock.close_code = ws.close_code
        sock.close_frame = ws.protocol.close_rcvd is not None
        self.progress.set()

    async def until(self, condition: Any, what: str) -> None:
        async def wait() -> None:
            while not condition():
                self.progress.clear()
                await self.progress.wait()

        try:
            await asyncio.wait_for(wait(), WAIT)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


async def test_the_upstream_is_a_valid_terra_producer_and_closes_cleanly(tmp_path: Path) -> None:
    receiver = TerraReceiver()
    async with serve(receiver.handle, "127.0.0.1", 0, process_request=receiver.http) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        key_file = tmp_path / "terra.key"
        key_file.write_text(API_KEY + "\n")
        config = f"""
sources: {{simulator: {{enabled: true, athletes: 2, hr_straps: ble, bike_fraction: 1.0}}}}
outputs:
  upstream:
    enabled: true
    mode: terra
    url: ws://127.0.0.1:{port}/connect
    api_base_url: http://127.0.0.1:{port}
    dev_id: {DEV_ID}
    api_key_file: {key_file}
    terra_user_ids: {json.dumps(USERS)}
"""
        async with daemon_process(tmp_path, config) as daemon:
            await receiver.until(
                lambda: receiver.submits >= 20 and len(receiver.sockets) >= 2, "SUBMITs from both"
            )
            await daemon.stop()
        assert API_KEY not in daemon.log
        sockets = receiver.sockets
        assert all(not s.invalid for s in sockets), [s.invalid for s in sockets]
        ops = {f["op"] for s in sockets for f in s.frames}
        assert {3, 6, 0} <= ops  # IDENTIFY, SUBMIT, HEARTBEAT; STATUS (8) when devices change
        for sock in sockets:
            assert sock.frames[0]["op"] == 3 and sock.frames[0]["d"]["type"] == 0  # producer
            # A clean stop: a close frame with 1000/1001, sent after the last HEARTBEAT's ACK.
            assert sock.close_frame and sock.close_code in (1000, 1001), sock.close_code
            assert sock.last_was_acked, sock.frames[-3:]
        # rt-bundled.yaml, /auth/user: POST, `id` in the query, dev-id + x-api-key headers.
        assert receiver.mint_requests
        for method, target, headers in receiver.mint_requests:
            assert method == "POST"
            user = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)["id"]
            assert user[0] in USERS.values()
            assert headers.get("dev-id") == DEV_ID and headers.get("x-api-key") == API_KEY

"""TLS on the broker (outputs.local_broker.tls): wss:// and https:// on one port, with a
self-signed certificate made here by openssl; the board and its token work over it."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from gatewayd import protocol as p
from tests.daemon import ROOT, daemon_process

OPENSSL = shutil.which("openssl")
TOKEN = "tls-consumer-token"
WAIT = 30.0

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "broker.crt", tmp_path / "broker.key"
    subprocess.run(
        [
            str(OPENSSL),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=gatewayd test hub",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def config(cert: Path, key: Path) -> str:
    return (
        "sources: {simulator: {enabled: true, athletes: 2}}\n"
        "outputs:\n"
        "  local_broker:\n"
        "    host: 127.0.0.1\n"
        f"    consumer_tokens: [{TOKEN}]\n"
        f"    tls: {{cert_file: {cert}, key_file: {key}}}\n"
    )


def fetch(url: str, context: ssl.SSLContext) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def ready(url: str, token: str, context: ssl.SSLContext) -> dict:  # type: ignore[type-arg]
    async with connect(url, ssl=context) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["op"] == p.Op.HELLO
        await ws.send(p.identify(token, p.Role.CONSUMER))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {"op": 4}
        return json.loads(await asyncio.wait_for(ws.recv(), WAIT))  # type: ignore[no-any-return]


async def test_wss_https_and_the_board_share_one_tls_port(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    async with daemon_process(tmp_path, config(cert, key)) as daemon:
        assert daemon.tls and daemon.broker_url.startswith("wss://")
        board = await daemon.wait_for_log(r"board: (https://127\.0\.0\.1:\d+/\?key=[\w-]+)")
        board_link = board.group(1)
        first = await ready(daemon.broker_url, TOKEN, trust)
        assert first["op"] == p.Op.DISPATCH
        status, body = await asyncio.to_thread(fetch, daemon.http_url + "/healthz", trust)
        assert status == 200 and json.loads(body)["consumers"] >= 0
        status, body = await asyncio.to_thread(fetch, board_link, trust)
        assert status == 200 and "board.js" in body
        base, query = board_link.split("?")
        status, body = await asyncio.to_thread(fetch, f"{base}board/config.json?{query}", trust)
        assert status == 200
        board_token = json.loads(body)["token"]
        assert (await ready(daemon.broker_url, board_token, trust))["op"] == p.Op.DISPATCH
        # Plain ws:// to the TLS port gets no protocol at all.
        with pytest.raises(Exception):  # noqa: B017 - any failure to speak is the point
            async with connect(daemon.broker_url.replace("wss:", "ws:"), open_timeout=5) as ws:
                await asyncio.wait_for(ws.recv(), 5)


@pytest.mark.parametrize("which", ["cert_file", "key_file"])
def test_a_missing_certificate_or_key_refuses_to_start_naming_the_key(
    tmp_path: Path, which: str
) -> None:
    cert, key = self_signed(tmp_path)
    (cert if which == "cert_file" else key).unlink()
    path = tmp_path / "gatewayd.yaml"
    path.write_text(config(cert, key))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    env["GATEWAYD_HUB__STATE_DIR"] = str(tmp_path / "state")
    for command in (["run", "--config", str(path)], ["check-config", str(path)]):
        done = subprocess.run(
            [sys.executable, "-m", "gatewayd", *command],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=WAIT,
        )
        assert done.returncode == 78, (command, done.stderr)
        assert f"outputs.local_broker.tls.{which}" in done.stderr
        assert "Traceback" not in done.stderr


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
LIVE_TILES = """n => {
  const tiles = [...document.querySelectorAll('.tile[data-state=live]')];
  return tiles.length === n && tiles.every(t => /^\\d+$/.test(t.querySelector('.hr').textContent));
}"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/setup --dev)")
async def test_the_board_runs_in_a_browser_over_https_and_wss(tmp_path: Path) -> None:
    """Debian's chromium (never `playwright install`) opens the keyed board link over https://
    with the self-signed certificate accepted, and its tiles fill from wss:// on the same port."""
    playwright = pytest.importorskip("playwright.async_api")
    cert, key = self_signed(tmp_path)
    async with (
        daemon_process(tmp_path, config(cert, key)) as daemon,
        playwright.async_playwright() as pw,
    ):
        link = (await daemon.wait_for_log(r"board: (https://\S+)")).group(1)
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            sockets: list[str] = []
            dispatches: list[int] = []

            def watch(ws: object) -> None:
                sockets.append(ws.url)  # type: ignore[attr-defined]
                ws.on(  # type: ignore[attr-defined]
                    "framereceived",
                    lambda payload: dispatches.append(1) if '"op":5' in payload else None,
                )

            page.on("websocket", watch)
            await page.goto(link)
            assert page.url.startswith("https://")
            await page.wait_for_function(LIVE_TILES, arg=2, timeout=20_000)
            first = await page.locator(".tile .hr").all_inner_texts()
            # Live data keeps arriving: the heart rates move.
            await page.wait_for_function(
                """before => [...document.querySelectorAll('.tile .hr')]
                     .some((el, i) => el.textContent !== before[i])""",
                arg=first,
                timeout=30_000,
            )
        finally:
            await browser.close()
    assert sockets and all(url == daemon.broker_url for url in sockets), sockets
    assert daemon.broker_url.startswith("wss://127.0.0.1:")
    assert len(dispatches) > 4
    assert not problems, problems

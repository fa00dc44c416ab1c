"""The gym board in a real browser: the real daemon (12 simulated athletes) serves the page, and
headless Chromium from Debian, driven by Playwright, shows it.

Needs the Debian packages chromium and chromium-driver and the PyPI package playwright (its
bundled driver only: no browser download). Saves the board as artifacts/board.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from gatewayd.model import format_ts
from tests.daemon import Daemon, daemon_process, start_daemon

playwright_async = pytest.importorskip("playwright.async_api")

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PRODUCER_TOKEN = "producer-for-the-board-test"
ATHLETES = 12
DROPPED = "sim-03"
BOARD_URL = r"board: (http://\S+)"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/setup --dev installs it)"
)


async def board_link(daemon: Daemon) -> urllib.parse.SplitResult:
    """The board's URL from the daemon's start log; its `?key=` is what opens the board."""
    return urllib.parse.urlsplit((await daemon.wait_for_log(BOARD_URL)).group(1))


class Link:
    """A TCP forwarder between the browser and the hub that the test can cut, like the gym's
    Wi-Fi dropping the TV while the hub keeps running."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


CONFIG = json.dumps(
    {
        "hub": {"name": "Board test gym"},
        "sources": {
            "simulator": {"enabled": True, "athletes": ATHLETES, "drop_after_s": {DROPPED: 4}}
        },
        "outputs": {
            "local_broker": {
                "host": "127.0.0.1",
                "producer_tokens": [{"token": PRODUCER_TOKEN}],
            }
        },
    }
)


@pytest.fixture
async def browser_page(tmp_path: Path) -> AsyncIterator[Any]:
    async with playwright_async.async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1920, "height": 1080},
        )
        try:
            yield await context.new_page()
        finally:
            await context.close()


async def submit(port: int, uid: str, samples: dict[str, float]) -> None:
    """Send samples as a producer (hub-to-hub SUBMIT with uid): a second, real data path."""
    async with connect(f"ws://127.0.0.1:{port}/connect", open_timeout=10) as ws:
        assert json.loads(await ws.recv())["op"] == 2
        await ws.send(json.dumps({"op": 3, "d": {"token": PRODUCER_TOKEN, "type": 0}}))
        assert json.loads(await ws.recv())["op"] == 4
        ts = format_ts(math.floor(time.time()))
        for t, val in samples.items():
            await ws.send(json.dumps({"op": 6, "uid": uid, "t": t, "d": {"ts": ts, "val": val}}))
        # A heartbeat's ACK comes after the broker has read every SUBMIT before it.
        await ws.send('{"op": 0}')
        assert json.loads(await ws.recv())["op"] == 1


HEART_RATES = """() => Object.fromEntries([...document.querySelectorAll('.tile')]
    .map(t => [t.dataset.uid, t.querySelector('.hr').textContent]))"""

# How many tiles show a heart rate other than the one in `before` (a snapshot of HEART_RATES).
MOVED = """([before, n]) => Object.entries(before).filter(([uid, bpm]) => {
    const t = document.querySelector(`.tile[data-uid="${uid}"] .hr`);
    return t && t.textContent !== '--' && t.textContent !== bpm;
  }).length >= n"""


async def test_board_shows_every_athlete_live_marks_lost_ones_and_survives_outages(
    tmp_path: Path, browser_page: Any
) -> None:
    page = browser_page
    expect = playwright_async.expect
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )

    daemon = await start_daemon(tmp_path, CONFIG)
    link: Link | None = None
    try:
        board = await board_link(daemon)
        link = Link(daemon.broker_port or 0)
        await page.goto(f"http://127.0.0.1:{link.port}/?{board.query}")
        await expect(page).to_have_title("Board test gym")

        # 12 tiles, ordered by name, with heart rates that move.
        await page.wait_for_function(
            """([n, dropped]) => {
                 const tiles = [...document.querySelectorAll('.tile')];
                 return tiles.length === n && tiles.every(
                   t => t.dataset.uid === dropped || t.dataset.state === 'live');
               }""",
            arg=[ATHLETES, DROPPED],
            timeout=15_000,
        )
        assert await page.locator(".tile").count() == ATHLETES
        names = await page.locator(".tile .name").all_inner_texts()
        assert names == sorted(names, key=str.casefold)
        first = await page.evaluate(HEART_RATES)
        assert all(40 <= int(bpm) <= 230 for uid, bpm in first.items() if uid != DROPPED), first
        await page.wait_for_function(MOVED, arg=[first, 8], timeout=20_000)
        pct = await page.locator(".tile[data-uid=sim-01] .pct").inner_text()
        assert re.fullmatch(r"\d{2,3}\s*%", pct), pct

        # The dropped strap: no number left pretending to be live, a clear mark instead.
        dropped = page.locator(f".tile[data-uid={DROPPED}]")
        await expect(dropped).to_have_attribute("data-state", "lost", timeout=20_000)
        await expect(dropped.locator(".lostmark")).to_be_visible()
        await expect(dropped.locator(".lostmark")).to_contain_text("Signal lost")
        await expect(dropped.locator(".hr")).to_be_hidden()
        assert await page.locator(".tile[data-state=live]").count() == ATHLETES - 1

        # Power, cadence and a low battery reach the tile (sent by a producer over the broker).
        await submit(
            daemon.broker_port or 0, "sim-12", {"POWER": 287, "BIKE_CADENCE": 91, "BATTERY": 12}
        )
        tile = page.locator(".tile[data-uid=sim-12]")
        await expect(tile.locator(".power")).to_have_text("287 W", timeout=10_000)
        await expect(tile.locator(".cadence")).to_have_text("91 rpm")
        await expect(tile.locator(".batt")).to_be_visible()
        await expect(tile.locator(".batt")).to_have_text("12%")

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "board.png"))

        # The network drops while the hub runs on: a banner at once, and after lost_after_s
        # no tile claims to be live any more.
        live = page.locator(".tile[data-state=live]")
        banner = page.locator("#banner")
        link.cut()
        await expect(banner).to_be_visible(timeout=10_000)
        await expect(banner).to_contain_text("Not connected to the hub")
        await expect(page.locator("body")).to_have_class(re.compile(r"\boffline\b"))
        await expect(live).to_have_count(0, timeout=20_000)
        await page.screenshot(path=str(ARTIFACTS / "board-offline.png"))

        # Back: the page reconnects by itself and REPLAY fills the seconds it missed, so the
        # sparklines of athletes who were live all along have no gap.
        link.restore()
        await expect(banner).to_be_hidden(timeout=30_000)
        await expect(live).to_have_count(ATHLETES - 1, timeout=10_000)
        await page.wait_for_function(
            """() => [...document.querySelectorAll('.tile[data-state=live]')]
                .every(t => t.dataset.gaps === '0')""",
            timeout=10_000,
        )

        # The daemon itself restarts on the same port, with a new generated board token.
        port = daemon.broker_port or 0
        await daemon.stop()
        await expect(banner).to_be_visible(timeout=10_000)
        daemon = await start_daemon(
            tmp_path, CONFIG, env={"GATEWAYD_OUTPUTS__LOCAL_BROKER__PORT": str(port)}
        )
        await expect(banner).to_be_hidden(timeout=30_000)
        await expect(page.locator("body")).not_to_have_class(re.compile(r"\boffline\b"))
        await page.wait_for_function(
            MOVED, arg=[await page.evaluate(HEART_RATES), 6], timeout=20_000
        )
        assert not errors, errors
    except BaseException:
        await daemon.kill()
        raise
    finally:
        if link is not None:
            link.close()
    await daemon.stop()  # a clean exit: status 0, no traceback in its log
    assert (ARTIFACTS / "board.png").stat().st_size > 10_000


LAYOUT = """() => {
  const tiles = [...document.querySelectorAll('.tile')];
  const cols = new Set(tiles.map(t => Math.round(t.getBoundingClientRect().left))).size;
  const inside = tiles.every(t => {
    const r = t.getBoundingClientRect();
    return r.left >= 0 && r.right <= innerWidth && r.top >= 0 && r.bottom <= innerHeight;
  });
  const clipped = tiles.filter(t => {
    const hr = t.querySelector('.hr');
    return hr.offsetParent !== null && hr.scrollWidth > hr.clientWidth;
  }).length;
  const digits = Math.min(...tiles.map(t =>
    parseFloat(getComputedStyle(t.querySelector('.hr')).fontSize)));
  return {
    cols, inside, clipped, digits,
    scrollsSideways: document.documentElement.scrollWidth > innerWidth,
  };
}"""


async def test_sixty_athletes_fit_a_tv_and_reflow_on_a_tablet(
    tmp_path: Path, browser_page: Any
) -> None:
    page = browser_page
    config = json.dumps(
        {
            "sources": {"simulator": {"enabled": True, "athletes": 60}},
            "outputs": {"local_broker": {"host": "127.0.0.1"}},
        }
    )
    async with daemon_process(tmp_path, config) as daemon:
        await page.goto((await daemon.wait_for_log(BOARD_URL)).group(1))
        await page.wait_for_function(
            "() => document.querySelectorAll('.tile[data-state=live]').length === 60",
            timeout=20_000,
        )
        tv = await page.evaluate(LAYOUT)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "board-60.png"))
        # All 60 on one 1920x1080 screen, digits big enough to read across a room.
        assert tv["inside"] and not tv["scrollsSideways"], tv
        assert tv["clipped"] == 0 and tv["digits"] >= 60, tv
        await page.set_viewport_size({"width": 800, "height": 1280})
        await page.wait_for_function(f"() => ({LAYOUT})().cols < {tv['cols']}", timeout=5_000)
        tablet = await page.evaluate(LAYOUT)
        await page.screenshot(path=str(ARTIFACTS / "board-tablet.png"))
        assert not tablet["scrollsSideways"] and tablet["clipped"] == 0, tablet
        assert tablet["digits"] >= 40, tablet

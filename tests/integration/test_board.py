"""The gym board in a real browser: the real daemon (12 simulated athletes) serves the page, and
headless Chromium from Debian, driven by Playwright, shows it.

Needs the Debian packages chromium and chromium-driver and the PyPI package playwright (its
bundled driver only: no browser download). Saves the board as artifacts/board.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from gatewayd.model import format_ts
from tests.daemon import daemon_env

playwright_sync = pytest.importorskip("playwright.sync_api")

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

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/setup --dev installs it)"
)


class Daemon:
    """The real `gatewayd run` process; `url` is the board's URL from its startup log."""

    def __init__(self, config: Path, tmp_path: Path, port: int = 0) -> None:
        env = {
            **daemon_env(tmp_path),
            "GATEWAYD_OUTPUTS__LOCAL_BROKER__PORT": str(port),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gatewayd", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        assert self._ready.wait(30), "no board URL in the log:\n" + "".join(self.log)
        assert self.url, "the daemon exited:\n" + "".join(self.log)

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            found = re.search(r"board: (http://\S+)", line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port or 0

    @property
    def query(self) -> str:
        """`?key=...`: the board's key, without which it answers 401."""
        return "?" + urllib.parse.urlsplit(self.url).query

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


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


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(
        json.dumps(
            {
                "hub": {"state_dir": str(tmp_path / "state"), "name": "Board test gym"},
                "sources": {
                    "simulator": {
                        "enabled": True,
                        "athletes": ATHLETES,
                        "drop_after_s": {DROPPED: 4},
                    }
                },
                "outputs": {
                    "local_broker": {
                        "host": "127.0.0.1",
                        "port": 0,
                        "producer_tokens": [{"token": PRODUCER_TOKEN}],
                    }
                },
            }
        )
    )
    return path


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[object]:
    with playwright_sync.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1920, "height": 1080},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def submit(port: int, uid: str, samples: dict[str, float]) -> None:
    """Send samples as a producer (hub-to-hub SUBMIT with uid): a second, real data path."""
    with connect(f"ws://127.0.0.1:{port}/connect", open_timeout=10) as ws:
        assert json.loads(ws.recv(10))["op"] == 2
        ws.send(json.dumps({"op": 3, "d": {"token": PRODUCER_TOKEN, "type": 0}}))
        assert json.loads(ws.recv(10))["op"] == 4
        ts = format_ts(math.floor(time.time()))
        for t, val in samples.items():
            ws.send(json.dumps({"op": 6, "uid": uid, "t": t, "d": {"ts": ts, "val": val}}))
        # A heartbeat's ACK comes after the broker has read every SUBMIT before it.
        ws.send('{"op": 0}')
        assert json.loads(ws.recv(10))["op"] == 1


HEART_RATES = """() => Object.fromEntries([...document.querySelectorAll('.tile')]
    .map(t => [t.dataset.uid, t.querySelector('.hr').textContent]))"""

# How many tiles show a heart rate other than the one in `before` (a snapshot of HEART_RATES).
MOVED = """([before, n]) => Object.entries(before).filter(([uid, bpm]) => {
    const t = document.querySelector(`.tile[data-uid="${uid}"] .hr`);
    return t && t.textContent !== '--' && t.textContent !== bpm;
  }).length >= n"""


def test_board_shows_every_athlete_live_marks_lost_ones_and_survives_outages(
    config: Path, tmp_path: Path, browser_page: object
) -> None:
    page = browser_page
    assert isinstance(page, playwright_sync.Page)
    expect = playwright_sync.expect
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )

    daemon = Daemon(config, tmp_path)
    link = Link(daemon.port)
    try:
        page.goto(f"http://127.0.0.1:{link.port}/{daemon.query}")
        expect(page).to_have_title("Board test gym")

        # 12 tiles, ordered by name, with heart rates that move.
        page.wait_for_function(
            """([n, dropped]) => {
                 const tiles = [...document.querySelectorAll('.tile')];
                 return tiles.length === n && tiles.every(
                   t => t.dataset.uid === dropped || t.dataset.state === 'live');
               }""",
            arg=[ATHLETES, DROPPED],
            timeout=15_000,
        )
        assert page.locator(".tile").count() == ATHLETES
        names = page.locator(".tile .name").all_inner_texts()
        assert names == sorted(names, key=str.casefold)
        first = page.evaluate(HEART_RATES)
        assert all(40 <= int(bpm) <= 230 for uid, bpm in first.items() if uid != DROPPED), first
        page.wait_for_function(MOVED, arg=[first, 8], timeout=20_000)
        pct = page.locator(".tile[data-uid=sim-01] .pct").inner_text()
        assert re.fullmatch(r"\d{2,3}\s*%", pct), pct

        # The dropped strap: no number left pretending to be live, a clear mark instead.
        dropped = page.locator(f".tile[data-uid={DROPPED}]")
        expect(dropped).to_have_attribute("data-state", "lost", timeout=20_000)
        expect(dropped.locator(".lostmark")).to_be_visible()
        expect(dropped.locator(".lostmark")).to_contain_text("Signal lost")
        expect(dropped.locator(".hr")).to_be_hidden()
        assert page.locator(".tile[data-state=live]").count() == ATHLETES - 1

        # Power, cadence and a low battery reach the tile (sent by a producer over the broker).
        submit(daemon.port, "sim-12", {"POWER": 287, "BIKE_CADENCE": 91, "BATTERY": 12})
        tile = page.locator(".tile[data-uid=sim-12]")
        expect(tile.locator(".power")).to_have_text("287 W", timeout=10_000)
        expect(tile.locator(".cadence")).to_have_text("91 rpm")
        expect(tile.locator(".batt")).to_be_visible()
        expect(tile.locator(".batt")).to_have_text("12%")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "board.png"))

        # The network drops while the hub runs on: a banner at once, and after lost_after_s
        # no tile claims to be live any more.
        live = page.locator(".tile[data-state=live]")
        banner = page.locator("#banner")
        link.cut()
        expect(banner).to_be_visible(timeout=10_000)
        expect(banner).to_contain_text("Not connected to the hub")
        expect(page.locator("body")).to_have_class(re.compile(r"\boffline\b"))
        expect(live).to_have_count(0, timeout=20_000)
        page.screenshot(path=str(ARTIFACTS / "board-offline.png"))

        # Back: the page reconnects by itself and REPLAY fills the seconds it missed, so the
        # sparklines of athletes who were live all along have no gap.
        link.restore()
        expect(banner).to_be_hidden(timeout=30_000)
        expect(live).to_have_count(ATHLETES - 1, timeout=10_000)
        page.wait_for_function(
            """() => [...document.querySelectorAll('.tile[data-state=live]')]
                .every(t => t.dataset.gaps === '0')""",
            timeout=10_000,
        )

        # The daemon itself restarts on the same port, with a new generated board token.
        port = daemon.port
        daemon.stop()
        expect(banner).to_be_visible(timeout=10_000)
        daemon = Daemon(config, tmp_path, port=port)
        expect(banner).to_be_hidden(timeout=30_000)
        expect(page.locator("body")).not_to_have_class(re.compile(r"\boffline\b"))
        page.wait_for_function(MOVED, arg=[page.evaluate(HEART_RATES), 6], timeout=20_000)
        assert not errors, errors
    finally:
        link.close()
        daemon.stop()
    assert daemon.process.returncode == 0, "".join(daemon.log)
    assert os.path.getsize(ARTIFACTS / "board.png") > 10_000


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


def test_sixty_athletes_fit_a_tv_and_reflow_on_a_tablet(
    tmp_path: Path, browser_page: object
) -> None:
    page = browser_page
    assert isinstance(page, playwright_sync.Page)
    config = tmp_path / "sixty.yaml"
    config.write_text(
        json.dumps(
            {
                "hub": {"state_dir": str(tmp_path / "state")},
                "sources": {"simulator": {"enabled": True, "athletes": 60}},
                "outputs": {"local_broker": {"host": "127.0.0.1", "port": 0}},
            }
        )
    )
    daemon = Daemon(config, tmp_path)
    try:
        page.goto(daemon.url)
        page.wait_for_function(
            "() => document.querySelectorAll('.tile[data-state=live]').length === 60",
            timeout=20_000,
        )
        tv = page.evaluate(LAYOUT)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "board-60.png"))
        # All 60 on one 1920x1080 screen, digits big enough to read across a room.
        assert tv["inside"] and not tv["scrollsSideways"], tv
        assert tv["clipped"] == 0 and tv["digits"] >= 60, tv
        page.set_viewport_size({"width": 800, "height": 1280})
        page.wait_for_function(f"() => ({LAYOUT})().cols < {tv['cols']}", timeout=5_000)
        tablet = page.evaluate(LAYOUT)
        page.screenshot(path=str(ARTIFACTS / "board-tablet.png"))
        assert not tablet["scrollsSideways"] and tablet["clipped"] == 0, tablet
        assert tablet["digits"] >= 40, tablet
    finally:
        daemon.stop()

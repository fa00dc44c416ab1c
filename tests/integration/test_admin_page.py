"""The admin page in a real browser (Debian's chromium under Playwright): a tablet opens the
one-time link the daemon logged, adds an athlete, gives a simulated strap to them, and the board
renames the tile, while the real daemon runs.

Needs the Debian package chromium and the PyPI package playwright (its driver only: never
`playwright install`). Saves the admin page as artifacts/admin.png.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.daemon import ROOT, daemon_process

playwright_async = pytest.importorskip("playwright.async_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CONFIG = "sources: {simulator: {enabled: true, athletes: 2, bike_fraction: 0.0, hr_straps: ble}}\n"
STRAP = "ble:F0:5E:ED:00:00:00"  # sim-01's strap (the simulator's first BLE address)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/setup --dev installs it)"
)


async def test_staff_enrol_a_strap_and_the_board_shows_the_new_name(tmp_path: Path) -> None:
    expect = playwright_async.expect
    async with (
        daemon_process(tmp_path, CONFIG) as daemon,
        playwright_async.async_playwright() as pw,
    ):
        link = await daemon.wait_for_log(r"one-time link on the staff tablet: (\S+)")
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(viewport={"width": 1024, "height": 1366})
            problems: list[str] = []
            admin = await context.new_page()
            admin.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            admin.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type == "error" else None,
            )
            await admin.goto(link.group(1))
            await expect(admin).to_have_title("gatewayd admin")
            await expect(admin.locator("#message")).to_contain_text("signed in")
            assert "#setup=" not in admin.url  # the code left the address bar

            # Both simulated straps are listed with their athletes.
            strap = admin.locator(f'tr[data-device="{STRAP}"]')
            await expect(admin.locator("#devices tbody tr")).to_have_count(2, timeout=15_000)
            await expect(strap.locator(".owner")).not_to_have_text("unassigned")
            await expect(strap).to_contain_text("Heart-rate strap")

            # Add an athlete, then give her sim-01's strap.
            await admin.fill("#add-name", "Zoë Quinn")
            await admin.click("#add-form button")
            card = admin.locator('form[data-athlete="zoe-quinn"]')
            await expect(card).to_be_visible()
            await card.locator("input.age").fill("35")
            await card.locator("input.weight").fill("61.5")
            await card.locator("select.sex").select_option("female")
            await card.locator("button[type=submit]").click()
            await expect(admin.locator("#message")).to_have_text("Zoë Quinn saved.")

            await strap.locator("select.give").select_option(label="Zoë Quinn")
            await expect(strap.locator(".owner")).to_have_text("Zoë Quinn")
            await expect(card.locator(".chip")).to_contain_text("F0:5E:ED:00:00:00")
            await admin.screenshot(path=str(ROOT / "artifacts" / "admin.png"), full_page=True)

            # The board (a TV, no login) shows the strap's tile under the new name.
            board = await context.new_page()
            board_link = await daemon.wait_for_log(r"board: (\S+\?key=\S+)")
            await board.goto(board_link.group(1))
            tile = board.locator('.tile[data-uid="zoe-quinn"]')
            await expect(tile.locator(".name")).to_have_text("Zoë Quinn", timeout=20_000)
            await expect(tile.locator(".hr")).to_have_text(re.compile(r"^\d+$"))
            # Her age, weight and sex give kcal from heart rate; zone minutes since she began.
            await expect(tile.locator(".kcal")).to_have_text(
                re.compile(r"^\d+ kcal$"), timeout=15_000
            )
            zone_minutes = re.compile(r"^\d+ min Z4\u20135$")  # fetched every 10 s
            await expect(tile.locator(".zmin")).to_have_text(zone_minutes, timeout=15_000)

            # Removing her gives the strap back to the simulator's athlete.
            admin.on("dialog", lambda dialog: dialog.accept())
            await card.locator("button.remove").click()
            await expect(card).to_have_count(0)
            await expect(strap.locator(".owner")).not_to_have_text("Zoë Quinn")
            assert problems == []
        finally:
            await browser.close()

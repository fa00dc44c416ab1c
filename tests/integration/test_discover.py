"""The hub found by name: the real daemon announces itself with python-zeroconf bound to the
loopback interface only (nothing is sent to the LAN), and `gatewayd discover`, a separate
process with its own zeroconf, resolves it."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from pathlib import Path

import pytest

from tests.daemon import ROOT, daemon_process

pytest.importorskip("zeroconf")


async def discover(tmp_path: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "discover",
        "--interface",
        "127.0.0.1",
        "--seconds",
        "3",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "HOME": str(tmp_path),
        },
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode()


async def test_discover_finds_the_running_hub(tmp_path: Path) -> None:
    name = f"Test gym {secrets.token_hex(4)}"  # unique: other runs may share the loopback
    config = (
        f"hub: {{id: gym-7, name: {name}}}\n"
        "sources: {simulator: {enabled: true, athletes: 1}}\n"
        "mdns: {enabled: true, interfaces: [127.0.0.1]}\n"
    )
    async with daemon_process(tmp_path, config) as daemon:
        await daemon.wait_for_log("mDNS: advertising")
        status, out = await discover(tmp_path)
        assert status == 0, out
        hubs = [json.loads(line) for line in out.splitlines()]
        ours = [hub for hub in hubs if hub["name"] == name]
        assert len(ours) == 1, hubs
        port = daemon.broker_port
        assert ours[0]["hub"] == "gym-7"
        assert ours[0]["broker"] == f"ws://127.0.0.1:{port}/connect"
        assert ours[0]["board"] == f"http://127.0.0.1:{port}/"
        assert ours[0]["admin"] == f"http://127.0.0.1:{port}/admin"
    # A stopped hub says goodbye: it is no longer listed.
    status, out = await discover(tmp_path)
    assert name not in out


async def test_a_loopback_hub_is_not_advertised_by_default(tmp_path: Path) -> None:
    async with daemon_process(
        tmp_path, "sources: {simulator: {enabled: true, athletes: 1}}\n"
    ) as d:
        pass
    assert "mDNS" not in d.log

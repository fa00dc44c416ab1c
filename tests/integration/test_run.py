"""The real `gatewayd` process, end to end: simulator -> decoders -> aggregator -> stdout."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from gatewayd.model import parse_ts
from tests.daemon import daemon_env


def gatewayd(*args: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {
        **daemon_env(tmp_path),
        "GATEWAYD_CONFIG": str(tmp_path / "none.yaml"),
        "GATEWAYD_HUB__STATE_DIR": str(tmp_path / "state"),
        "GATEWAYD_OUTPUTS__LOCAL_BROKER__PORT": "0",
    }
    (tmp_path / "none.yaml").write_text("sources: {simulator: {enabled: true}}\n")
    return subprocess.Popen(
        [sys.executable, "-m", "gatewayd", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_simulated_athletes_each_produce_one_heart_rate_per_second(tmp_path):
    started = time.time()
    process = gatewayd("run", "--simulate", "5", "--stdout", "--seconds", "6", tmp_path=tmp_path)
    out, err = process.communicate(timeout=60)
    finished = time.time()
    assert process.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    heart = defaultdict(list)
    for record in records:
        if record.get("t") == "HEART_RATE":
            heart[record["uid"]].append(parse_ts(record["ts"]))
    assert sorted(heart) == ["sim-01", "sim-02", "sim-03", "sim-04", "sim-05"]
    for uid, stamps in heart.items():
        # Per-second samples start on the second; RR_INTERVAL is per beat, at the beat's time.
        assert all(
            r["ts"].endswith(".000Z")
            for r in records
            if r.get("uid") == uid and "t" in r and r["t"] != "RR_INTERVAL"
        )
        beats = [r for r in records if r.get("uid") == uid and r.get("t") == "RR_INTERVAL"]
        assert all(isinstance(r["val"], float) and "d" not in r for r in beats)
        assert stamps == [stamps[0] + i for i in range(len(stamps))], f"{uid}: {stamps}"
        assert started - 1 <= stamps[0] and stamps[-1] <= finished
        assert len(stamps) >= 4
    assert "running" in err and "stopped" in err


def test_sigterm_finishes_the_second_and_exits_zero(tmp_path):
    process = gatewayd("run", "--simulate", "2", "--stdout", tmp_path=tmp_path)
    assert process.stdout is not None
    first = process.stdout.readline()  # wait for the first sample: the daemon is up
    assert json.loads(first)["uid"].startswith("sim-")
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=10)
    assert time.monotonic() - sent < 5
    assert process.returncode == 0, err
    assert "stopped" in err


def test_record_then_replay_gives_the_same_athletes(tmp_path):
    capture = tmp_path / "cap.jsonl"
    recorder = gatewayd(
        "record", "--simulate", "2", "--out", str(capture), "--seconds", "3", tmp_path=tmp_path
    )
    _, err = recorder.communicate(timeout=60)
    assert recorder.returncode == 0, err
    lines = capture.read_text().splitlines()
    assert len(lines) > 20 and all(json.loads(line)["payload"] for line in lines)
    player = gatewayd(
        "run",
        "--simulate",
        "0",
        "--replay",
        str(capture),
        "--stdout",
        "--seconds",
        "4",
        tmp_path=tmp_path,
    )
    out, err = player.communicate(timeout=60)
    assert player.returncode == 0, err
    uids = {json.loads(line)["uid"] for line in out.splitlines()}
    # replayed devices are not in this run's roster: they get their device uids
    assert any(uid.startswith(("ble:", "ant:")) for uid in uids), uids

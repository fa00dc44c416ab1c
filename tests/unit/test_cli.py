from __future__ import annotations

import json
import logging

import pytest

from gatewayd import __version__, cli


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"gatewayd {__version__}"


def test_decode_prints_readings(capsys):
    assert cli.main(["decode", "hrm", "163C1104"]) == 0
    record = json.loads(capsys.readouterr().out)
    measures = {r["measure"]: r for r in record["readings"]}
    assert measures["heart_rate"]["value"] == 60
    assert measures["rr_intervals"]["values"] == [pytest.approx(1016.6, abs=0.1)]


def test_decode_consecutive_frames_prints_derived_values(capsys):
    assert cli.main(["decode", "ant-hr", "84FFB6FAC7FED03B", "04FFC7FED802D13B"]) == 0
    second = json.loads(capsys.readouterr().out.splitlines()[1])
    rr = [d for d in second["derived"] if d["t"] == "RR_INTERVAL"]
    assert rr == [{"t": "RR_INTERVAL", "d": [pytest.approx(1016.6, abs=0.1)]}]


def test_decode_bad_input_is_reported_not_raised(capsys):
    assert cli.main(["decode", "hrm", "01", "zz"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "hrm" in lines[0]["error"] and lines[1]["error"] == "not hexadecimal"


def test_help_lists_every_profile(capsys):
    with pytest.raises(SystemExit):
        cli.main(["decode", "--help"])
    help_text = capsys.readouterr().out
    for profile in cli.PROFILES:
        assert profile in help_text


@pytest.mark.parametrize("journal", [True, False])
def test_log_lines_carry_timestamps_only_outside_the_journal(monkeypatch, capsys, journal):
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    cli.setup_logging("info")
    logging.getLogger("gatewayd.test").warning("strap dropped")
    line = capsys.readouterr().err.strip()
    if journal:
        assert line == "<4>gatewayd.test: strap dropped"
    else:
        assert line[2] == ":" and line.endswith("gatewayd.test: strap dropped")


def test_decode_ant_frame_describes_the_message(capsys):
    assert cli.main(["decode", "ant-frame", "A40340004600A1"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["message"] == "channel 0 response to 0x46: OK"
    assert record["readings"] == []

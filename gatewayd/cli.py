"""The `gatewayd` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatewayd import __version__
from gatewayd import config as config_module
from gatewayd.clock import SystemClock
from gatewayd.decode import DECODERS, PROFILES, describe_profile
from gatewayd.decode.antplus import KIND_SERIAL, parse_frame
from gatewayd.decode.counters import Deriver
from gatewayd.errors import EX_CONFIG, ConfigError, DecodeError, SourceUnavailable
from gatewayd.model import Reading

EX_UNAVAILABLE = 69  # sysexits.h: a service the command needs (BlueZ, an adapter) is not there

log = logging.getLogger("gatewayd")

_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class _JournalFormatter(logging.Formatter):
    """journald stamps time itself and reads a `<N>` prefix as the line's priority."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelname, 6)
        return f"<{priority}>{super().format(record)}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description=(
            "Gym hub daemon: hears every athlete's BLE and ANT+ wearables and serves one sample "
            "per athlete, data type and second over Terra's streaming protocol, upstream and MQTT."
        ),
    )
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override logging.level from the config",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon")
    _config_option(run)
    run.add_argument(
        "--simulate", type=int, metavar="N", help="add N simulated athletes (real wire bytes)"
    )
    run.add_argument("--stdout", action="store_true", help="print samples as JSON lines")
    run.add_argument("--replay", type=Path, metavar="FILE", help="replay a capture file")
    run.add_argument("--seconds", type=float, help="stop after this many seconds")

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", type=Path, help="default: as `run` would find it")

    rec = commands.add_parser("record", help="write every frame from the sources to a capture")
    _config_option(rec)
    rec.add_argument("--out", type=Path, required=True, help="capture file (JSON lines)")
    rec.add_argument("--simulate", type=int, metavar="N", help="record N simulated athletes")
    rec.add_argument("--seconds", type=float, help="stop after this many seconds")

    scan = commands.add_parser(
        "scan",
        help="list nearby fitness devices and print a roster to paste into the config",
        description=(
            "Listen on every Bluetooth adapter and ANT+ stick, list the fitness devices heard "
            "(name, id, profiles, RSSI, battery) and print a ready-to-paste `athletes:` roster. "
            "Exit status 69 when neither Bluetooth nor ANT+ is available."
        ),
    )
    _config_option(scan)
    scan.add_argument("--seconds", type=float, default=10.0, help="how long to listen (10)")
    scan.add_argument(
        "--no-battery", action="store_true", help="do not connect briefly to read battery levels"
    )
    scan.add_argument("--no-ant", action="store_true", help="Bluetooth only, no ANT+ sticks")

    # One line per profile, from the decoder's docstring; raw, so no profile name is hyphen-wrapped.
    width = max(len(name) for name in PROFILES)
    profiles = "\n".join(f"  {name:<{width}}  {describe_profile(name)}" for name in PROFILES)
    dec = commands.add_parser(
        "decode",
        help="decode raw bytes of one profile and print the readings as JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Decode HEX payloads of one PROFILE. Several HEX arguments are consecutive frames\n"
            "of one device, so derived values (cadence, speed, average power, RR) are printed\n"
            "too. ANT+ page bytes 1-3 count only once the page toggle bit has been seen to flip."
        ),
        epilog=f"profiles:\n{profiles}",
    )
    dec.add_argument("profile", choices=sorted(PROFILES), metavar="PROFILE")
    dec.add_argument("hex", nargs="+", metavar="HEX")
    dec.add_argument(
        "--interval", type=float, default=0.25, help="seconds between the frames (default 0.25)"
    )
    scan = commands.add_parser(
        "ant-scan",
        help="list the ANT+ devices the sticks hear, with the ids a roster needs",
        description=(
            "Open every ANT stick (as sources.ant configures it, even when not enabled), listen "
            "for SECONDS and print each device heard: its roster id (device type:number), "
            "profile, stick, broadcasts and last RSSI. Exit status 1 when nothing was heard."
        ),
    )
    _config_option(scan)
    scan.add_argument("--seconds", type=float, default=10.0, help="how long to listen")
    _broker_commands(commands)
    disc = commands.add_parser(
        "discover",
        help="list the gatewayd hubs on the local network (mDNS/DNS-SD)",
        description=(
            "Listen for hubs advertising _gatewayd._tcp for SECONDS and print each one's name, "
            "hub id and URLs (board, admin page, broker). Exit status 1 when none was heard."
        ),
    )
    disc.add_argument("--seconds", type=float, default=3.0, help="how long to listen (3)")
    disc.add_argument(
        "--interface",
        action="append",
        metavar="IPV4",
        help="listen on the interface with this address only (repeat; default: all)",
    )
    disc.add_argument("--json", action="store_true", help="one JSON object per hub")
    return parser


def _broker_commands(commands: Any) -> None:
    tok = commands.add_parser("token", help="mint tokens for the hub's broker")
    tok_commands = tok.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = tok_commands.add_parser(
        "create",
        help="mint a token and print it once (only its hash is kept, in the state directory)",
    )
    _config_option(create)
    create.add_argument(
        "--role",
        choices=["consumer", "producer", "admin"],
        required=True,
        help="admin: the admin page (/admin) and the JSON API (/api)",
    )
    create.add_argument(
        "--athlete",
        action="append",
        default=[],
        metavar="ID",
        help="producer: an athlete it may submit for (repeat; none = any athlete)",
    )
    create.add_argument("--single-use", action="store_true", help="valid for one connection")
    create.add_argument("--ttl", metavar="DURATION", help="expiry: seconds, or 90s, 15m, 12h, 7d")
    listing = tok_commands.add_parser("list", help="list minted tokens (never the tokens)")
    _config_option(listing)
    purge = tok_commands.add_parser("purge", help="forget used and expired minted tokens")
    _config_option(purge)

    tail = commands.add_parser(
        "tail",
        help="print live samples from a broker (a consumer; reconnects and REPLAYs gaps)",
    )
    _config_option(tail)
    tail.add_argument("--url", help="default: this hub's broker, ws://HOST:PORT/connect")
    tail.add_argument(
        "--token",
        help="consumer token (default: $GATEWAYD_TOKEN, else the config's first consumer token)",
    )
    tail.add_argument("--athlete", action="append", metavar="ID", help="only these athletes")
    tail.add_argument("--type", action="append", metavar="T", help="only these data types")
    tail.add_argument("--status", action="store_true", help="also show device status changes")
    tail.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    board = commands.add_parser(
        "board-url", help="print the gym board's link, with its key (put it on the TV)"
    )
    _config_option(board)

    status = commands.add_parser(
        "status",
        help="ask the running daemon (its broker's /healthz) how it and each upstream are doing",
    )
    _config_option(status)
    status.add_argument("--url", help="default: this hub's broker, http://HOST:PORT")
    status.add_argument("--json", action="store_true", help="print /healthz as it is")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help=f"YAML config (default: ${config_module.ENV_CONFIG}, "
        f"else {config_module.DEFAULT_CONFIG_PATH}, else built-in defaults with the simulator)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"gatewayd: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "decode":
        return _decode(args.profile, args.hex, args.interval)
    if args.command == "scan":
        return _scan(args)
    if args.command == "check-config":
        path = config_module.resolve_path(args.file)
        from gatewayd.app import preflight

        preflight(config_module.load(path))
        print(f"{path or 'built-in defaults'}: OK")
        return 0
    if args.command == "status":
        return _status(args)
    if args.command == "discover":
        return _discover(args)
    if args.command == "board-url":
        return _board_url(config_module.load(args.config))
    if args.command in ("token", "tail"):
        return _broker_client_command(args)
    cfg = config_module.load(args.config)
    if args.command == "ant-scan":
        setup_logging(args.log_level or cfg.logging.level)
        return asyncio.run(_ant_scan(cfg, args.seconds))
    changes: dict[str, Any] = {}
    if args.simulate is not None:
        changes["sources.simulator.enabled"] = args.simulate > 0
        changes["sources.simulator.athletes"] = args.simulate
    if getattr(args, "stdout", False):
        changes["outputs.stdout.enabled"] = True
    if getattr(args, "replay", None) is not None:
        changes["sources.replay.file"] = args.replay
    if changes:
        cfg = config_module.override(cfg, changes)
    setup_logging(args.log_level or cfg.logging.level)
    from gatewayd import app

    if args.command == "record":
        return asyncio.run(app.record(cfg, args.out, seconds=args.seconds))
    path = config_module.resolve_path(args.config)
    if path is None:
        log.info(
            "no config file (--config, $%s or %s): running the built-in defaults, "
            "which include the simulator",
            config_module.ENV_CONFIG,
            config_module.DEFAULT_CONFIG_PATH,
        )
    return asyncio.run(app.App(cfg, config_path=path).run(seconds=args.seconds))


def _board_url(cfg: config_module.Config) -> int:
    from gatewayd.web import board_url
    from gatewayd.web.access import load_or_create_key

    if not cfg.board.enabled:
        print("gatewayd: the board is off (board.enabled: false)", file=sys.stderr)
        return 1
    broker = cfg.outputs.local_broker
    key = cfg.board.key or load_or_create_key(cfg.state_dir())
    print(board_url(broker.host, broker.port, key, tls=broker.tls.enabled))
    return 0


async def _ant_heard(cfg: config_module.Config, seconds: float) -> dict[str, dict[str, Any]]:
    """Every ANT+ device the sticks hear in `seconds`: device id -> kind, sticks, frames, RSSI."""
    from gatewayd.clock import SystemClock
    from gatewayd.pipeline import FrameQueue
    from gatewayd.sources.ant import AntSource

    frames = FrameQueue()
    source = AntSource(cfg.sources.ant, SystemClock())
    task = asyncio.create_task(source.run(frames))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    heard: dict[str, dict[str, Any]] = {}
    try:
        while (left := deadline - loop.time()) > 0:
            await frames.wait(min(left, 0.5))
            for frame in frames.take_all():
                entry = heard.setdefault(
                    frame.device_id, {"kind": frame.kind, "adapters": set(), "frames": 0}
                )
                entry["adapters"].add(frame.adapter)
                entry["frames"] += 1
                entry["rssi"] = frame.rssi
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return heard


async def _ant_scan(cfg: config_module.Config, seconds: float) -> int:
    from gatewayd.sources.ant import FALLBACK_PROFILES

    heard = await _ant_heard(cfg, seconds)
    if not heard:
        print(f"no ANT+ device heard in {seconds:g} s")
        return 1
    print(f"{'id (roster: source ant)':<24} {'profile':<20} {'sticks':<10} {'frames':>6}  rssi")
    for device_id, entry in sorted(heard.items(), key=lambda item: item[0]):
        device_type = int(device_id.split(":")[0])
        profile = FALLBACK_PROFILES.get(device_type, (f"type {device_type}", 0))[0]
        rssi = f"{entry['rssi']} dBm" if entry.get("rssi") is not None else "-"
        sticks = ",".join(sorted(entry["adapters"]))
        print(f"{device_id:<24} {profile:<20} {sticks:<10} {entry['frames']:>6}  {rssi}")
    return 0


def _broker_client_command(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config, defaults_run_simulator=False)
    setup_logging(args.log_level or "warning")
    if args.command == "token":
        from gatewayd import tokens

        broker = cfg.outputs.local_broker
        store = tokens.TokenStore(cfg.state_dir(), clock=SystemClock())
        if args.token_command == "list":
            for entry in store.minted():
                print(json.dumps(entry))
            return 0
        if args.token_command == "purge":
            print(f"forgot {store.purge()} used or expired tokens")
            return 0
        ttl = None
        if args.ttl is not None:
            try:
                ttl = tokens.parse_duration(args.ttl)
            except ValueError as exc:
                print(f"gatewayd: --ttl: {exc}", file=sys.stderr)
                return 2
        if args.athlete and args.role != "producer":
            print("gatewayd: --athlete applies to producer tokens only", file=sys.stderr)
            return 2
        print(store.create(args.role, athletes=args.athlete, single_use=args.single_use, ttl_s=ttl))
        if not broker.enabled:
            print("note: outputs.local_broker is disabled in this config", file=sys.stderr)
        return 0
    from gatewayd import tail

    broker = cfg.outputs.local_broker
    host = "127.0.0.1" if broker.host in ("0.0.0.0", "::", "") else broker.host
    url = args.url or f"ws://{host}:{broker.port}/connect"
    token = (
        args.token or os.environ.get("GATEWAYD_TOKEN") or next(iter(broker.consumer_tokens), None)
    )
    if not token:
        print(
            "gatewayd: tail needs --token, $GATEWAYD_TOKEN or a consumer token in the config",
            file=sys.stderr,
        )
        return 2
    wanted = tail.parse_filter(args.athlete, args.type, args.status)
    return asyncio.run(tail.Tail(url, token, filter_=wanted, as_json=args.json).run())


def _scan(args: argparse.Namespace) -> int:
    from gatewayd.sources import ble

    cfg = config_module.load(args.config, defaults_run_simulator=False)
    setup_logging(args.log_level or "warning")
    if args.log_level is None:
        # a hub without an ANT stick is normal here; "no stick" is said once below instead
        logging.getLogger("gatewayd.sources.ant").setLevel(logging.CRITICAL)
    entries, problems = asyncio.run(
        scan_everything(cfg, args.seconds, read_battery=not args.no_battery, ant=not args.no_ant)
    )
    for problem in problems:
        print(f"gatewayd scan: {problem}", file=sys.stderr)
    if not entries and len(problems) == (2 if not args.no_ant else 1):
        return EX_UNAVAILABLE
    print(ble.format_scan(entries, args.seconds), end="")
    return 0


async def scan_everything(
    cfg: config_module.Config, seconds: float, *, read_battery: bool = True, ant: bool = True
) -> tuple[list[Any], list[str]]:
    """BLE and ANT+ listened to at once: (entries strongest first, what was not available)."""
    from gatewayd.sources import ble
    from gatewayd.sources.ant import FALLBACK_PROFILES

    problems: list[str] = []
    ble_scan = asyncio.create_task(ble.scan(seconds, read_battery=read_battery))
    heard = await _ant_heard(cfg, seconds) if ant else {}
    try:
        entries = await ble_scan
    except SourceUnavailable as exc:
        entries = []
        problems.append(f"Bluetooth is not available: {exc}")
    if ant and not heard:
        problems.append(f"ANT+: nothing heard in {seconds:g} s (is a stick plugged in?)")
    for device_id, entry in heard.items():
        device_type = int(device_id.split(":")[0])
        profile = FALLBACK_PROFILES.get(device_type, (f"ANT+ type {device_type}", 0))[0]
        sticks = ",".join(sorted(entry["adapters"]))
        entries.append(
            ble.ScanEntry(device_id, "", [profile], entry.get("rssi"), sticks, source="ant")
        )
    entries.sort(key=lambda e: -(e.rssi if e.rssi is not None else -200))
    return entries, problems


def _reading_json(reading: Reading) -> dict[str, Any]:
    record: dict[str, Any] = {"measure": str(reading.measure)}
    for name in ("value", "values", "count", "time", "accum"):
        value = getattr(reading, name)
        if value or (name == "value" and not reading.values and not reading.count_mod):
            record[name] = list(value) if name == "values" else value
    return record


def _decode(profile: str, hex_frames: list[str], interval: float) -> int:
    decoder = DECODERS[PROFILES[profile]]
    deriver = Deriver()
    status = 0
    for index, text in enumerate(hex_frames):
        try:
            payload = bytes.fromhex(text.replace(":", "").replace(" ", ""))
        except ValueError:
            print(json.dumps({"frame": index, "hex": text, "error": "not hexadecimal"}))
            status = 1
            continue
        try:
            readings = decoder(payload)
        except DecodeError as exc:
            print(json.dumps({"frame": index, "hex": payload.hex(), "error": str(exc)}))
            status = 1
            continue
        derived = [
            {"t": str(d.t), **({"d": list(d.d)} if d.d is not None else {"val": d.val})}
            for reading in readings
            for d in deriver.derive(reading, index * interval)
        ]
        record: dict[str, Any] = {
            "frame": index,
            "hex": payload.hex(),
            "readings": [_reading_json(r) for r in readings],
        }
        if PROFILES[profile] == KIND_SERIAL:
            record["message"] = parse_frame(payload).describe()
        if len(hex_frames) > 1:
            record["derived"] = derived
        print(json.dumps(record))
    return status


if __name__ == "__main__":
    sys.exit(main())


def _discover(args: argparse.Namespace) -> int:
    from gatewayd import mdns

    setup_logging(args.log_level or "warning")
    hubs = mdns.discover(args.seconds, args.interface)
    if not hubs:
        print(f"no gatewayd hub heard in {args.seconds:g} s", file=sys.stderr)
        return 1
    for hub in hubs:
        urls = hub.urls()
        if args.json:
            record = {"name": hub.name, "hub": hub.hub, "version": hub.version, **urls}
            print(json.dumps({**record, "addresses": list(hub.addresses)}))
            continue
        print(f"{hub.name} (hub {hub.hub or '?'}, gatewayd {hub.version or '?'})")
        for label in ("board", "admin", "broker"):
            if label in urls:
                print(f"  {label + ':':<8} {urls[label]}")
    return 0


def _status(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon answers, 1 when it does not; 2 when an upstream is down."""
    import urllib.error
    import urllib.request

    url = args.url
    if url is None:
        broker = config_module.load(args.config, defaults_run_simulator=False).outputs.local_broker
        host = "127.0.0.1" if broker.host in ("0.0.0.0", "::", "") else broker.host
        url = f"http://{host}:{broker.port}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=5) as answer:
            health = json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"gatewayd: no answer from {url}/healthz: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(health, indent=1))
    else:
        for line in status_lines(health):
            print(line)
    upstream = health.get("upstream")
    return 2 if isinstance(upstream, dict) and upstream.get("state") == "down" else 0


def status_lines(health: dict[str, Any]) -> list[str]:
    lines = [
        f"gatewayd {health.get('version', '?')}, hub {health.get('hub', '?')}:"
        f" {health.get('devices_live', 0)} devices live, {health.get('samples', 0)} samples,"
        f" {health.get('consumers', 0)} consumers"
    ]
    spool = f"spool: {health.get('spool_depth', 0)} samples held"
    if health.get("spool_evicted"):
        spool += f", {health['spool_evicted']} evicted by the caps"
    if health.get("spool_error"):
        spool += f"; ERROR {health['spool_error']}"
    lines.append(spool)
    upstream = health.get("upstream")
    if not isinstance(upstream, dict):
        lines.append("upstream: off")
        return lines
    age = upstream.get("backlog_age_s")
    text = (
        f"upstream ({upstream.get('mode')}) {upstream.get('url')}: {upstream.get('state')};"
        f" backlog {upstream.get('backlog', 0)} samples"
        + (f", oldest {age:.0f} s old" if isinstance(age, int | float) else "")
    )
    if upstream.get("last_error"):
        text += f"; last error: {upstream['last_error']}"
    if upstream.get("retry_in_s") is not None:
        text += f"; retry in {upstream['retry_in_s']} s"
    lines.append(text)
    for athlete, lane in sorted((upstream.get("athletes") or {}).items()):
        detail = f"  {athlete}: {lane.get('state')}"
        if lane.get("last_error"):
            detail += f" ({lane['last_error']})"
        lines.append(detail)
    return lines

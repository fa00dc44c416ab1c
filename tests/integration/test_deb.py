"""The Debian package, end to end: build it, install it, verify the unit, run it, purge it.

Needs root, dpkg-buildpackage (debhelper) and overlayfs. The install happens in a private mount
namespace whose /etc, /usr and /var are overlays on the real ones: dpkg, adduser and the
maintainer scripts run for real, but nothing they write is seen by the host or by tests running
beside this one (no /etc/gatewayd for them to pick up, no user, no dpkg lock taken), and the
overlays' upper layers show exactly what the package left behind after `dpkg -P`.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from gatewayd import __version__

ROOT = Path(__file__).resolve().parents[2]
OVERLAID = ("etc", "usr", "var")
TOOLS = ("dpkg-buildpackage", "dh", "dpkg", "systemd-analyze", "unshare", "nsenter", "setpriv")
BUILD_TIMEOUT_S = 600
COMMAND_TIMEOUT_S = 120
RUN_GUARD_S = 60


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: dpkg -i/-P, adduser and overlay mounts"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install debhelper dpkg-dev systemd)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs for the install sandbox"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return "cannot make a mount namespace for the install sandbox (needs CAP_SYS_ADMIN)"
    return None


if (_reason := _why_not()) is not None:
    pytest.skip(f"Debian package test skipped: {_reason}", allow_module_level=True)


@dataclass
class Packages:
    all: Path
    native: Path
    log: Path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    """`dpkg-buildpackage -b -us -uc` on a copy of the checkout (it writes into ../ and debian/)."""
    base = tmp_path_factory.mktemp("deb-build")
    source = base / "gatewayd"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_not_source)
    log = base / "build.log"
    with log.open("w") as out:
        result = subprocess.run(
            ["dpkg-buildpackage", "-b", "-us", "-uc"],
            cwd=source,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    assert result.returncode == 0, f"dpkg-buildpackage failed:\n{log.read_text()[-4000:]}"
    arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    return Packages(
        all=base / f"gatewayd_{__version__}_all.deb",
        native=base / f"gatewayd-pydantic_{__version__}_{arch}.deb",
        log=log,
    )


_JUNK = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".*_cache", "*.egg-info")
# What an in-place `dpkg-buildpackage` leaves in debian/ (see debian/.gitignore).
_BUILD_LEFTOVERS = {".debhelper", "debhelper-build-stamp", "files", "gatewayd", "gatewayd-pydantic"}


def _not_source(directory: str, names: list[str]) -> set[str]:
    ignored = set(_JUNK(directory, names))
    if Path(directory) == ROOT / "debian":
        ignored |= {n for n in names if n in _BUILD_LEFTOVERS or n.endswith(".substvars")}
    return ignored


class Sandbox:
    """A mount namespace with /etc, /usr and /var overlaid, and an empty /run (no systemd)."""

    def __init__(self, workdir: Path) -> None:
        self.upper = workdir / "upper"
        setup = []
        for top in OVERLAID:
            upper, work = self.upper / top, workdir / "work" / top
            upper.mkdir(parents=True)
            work.mkdir(parents=True)
            layers = f"lowerdir=/{top},upperdir={upper},workdir={work}"
            setup.append(f"mount -t overlay overlay -o {layers} /{top}")
        # An empty /run: postinst sees no running systemd (so it enables but does not start the
        # unit in the host's systemd, which could not see the unit file anyway) and no udevd.
        setup.append("mount -t tmpfs -o mode=0755 tmpfs /run")
        script = "set -e; " + "; ".join(setup) + "; echo ready; exec sleep infinity"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            self.holder.kill()
            _, err = self.holder.communicate(timeout=COMMAND_TIMEOUT_S)
            pytest.fail(f"cannot set up the overlay sandbox: {err}")

    def argv(self, command: Sequence[str]) -> list[str]:
        # nsenter execs the command (no fork) when entering only a mount namespace, so signals
        # reach it directly.
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--", *command]

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = _run(self.argv(command))
        if check:
            assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"
        return result

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    def left_behind(self) -> list[str]:
        """Every file the sandbox wrote or changed (directories aside), as an absolute path."""
        written = []
        for path in self.upper.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                continue
            written.append("/" + str(path.relative_to(self.upper)))
        return sorted(written)

    def close(self) -> None:
        self.holder.kill()
        self.holder.communicate(timeout=COMMAND_TIMEOUT_S)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False, env=env
    )


def _lines(stream: IO[str], guard_s: float) -> Iterator[str]:
    """The stream's lines, failing if none comes for `guard_s` (a hung daemon, not a slow one)."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    while True:
        if not selector.select(guard_s):
            pytest.fail(f"no output from the daemon for {guard_s:.0f} s")
        line = stream.readline()
        if not line:
            return
        yield line


def check_one_arch_independent_package_with_no_compiled_file(packages: Packages) -> None:
    assert packages.all.exists(), f"expected {packages.all.name}; see {packages.log}"
    assert _run(["dpkg-deb", "-f", str(packages.all), "Architecture"]).stdout.strip() == "all"
    contents = _run(["dpkg-deb", "-c", str(packages.all)]).stdout
    assert "./usr/lib/gatewayd/vendor/dbus_fast/message.py" in contents
    assert "./usr/lib/gatewayd/gatewayd/service.py" in contents
    assert not re.search(r"\.so(\.\d+)*$", contents, re.M), "compiled file in the all package"
    # The one compiled dependency is in the companion package, and nothing else is.
    native = _run(["dpkg-deb", "-c", str(packages.native)]).stdout
    top = set(re.findall(r"/usr/lib/[^/]+/gatewayd/([^/\n]+)/", native))
    assert {t.split("-")[0] for t in top} == {"pydantic", "pydantic_core"}


def check_install_creates_the_user_state_config_and_enables_the_unit(sandbox: Sandbox) -> None:
    passwd = sandbox.run("getent", "passwd", "gatewayd").stdout.strip().split(":")
    assert passwd[5] == "/var/lib/gatewayd" and passwd[6] == "/usr/sbin/nologin"
    groups = sandbox.run("id", "-nG", "gatewayd").stdout.split()
    assert {"gatewayd", "bluetooth", "plugdev"} <= set(groups)
    state = sandbox.run("stat", "-c", "%U:%G %a", "/var/lib/gatewayd").stdout.strip()
    assert state == "gatewayd:gatewayd 750"
    config = sandbox.run("stat", "-c", "%U:%G %a", "/etc/gatewayd").stdout.strip()
    assert config == "root:gatewayd 750"
    conffiles = sandbox.run("dpkg-query", "-W", "-f=${Conffiles}", "gatewayd").stdout
    assert "/etc/gatewayd/gatewayd.yaml" in conffiles
    assert sandbox.exists("/etc/systemd/system/multi-user.target.wants/gatewayd.service")
    assert sandbox.exists("/usr/share/doc/gatewayd/install.md")  # the unit's Documentation=
    rule = sandbox.run("cat", "/lib/udev/rules.d/99-gatewayd-ant.rules").stdout
    for product in ("1008", "1009"):
        assert re.search(
            rf'ATTR{{idVendor}}=="0fcf", ATTR{{idProduct}}=="{product}", '
            r'GROUP="plugdev", MODE="0660"',
            rule,
        )


def check_the_installed_unit_verifies_and_is_hardened(sandbox: Sandbox) -> None:
    unit = "/lib/systemd/system/gatewayd.service"
    verify = sandbox.run("systemd-analyze", "verify", unit, check=False)
    complaints = [
        line for line in (verify.stdout + verify.stderr).splitlines() if "gatewayd" in line
    ]
    assert verify.returncode == 0 and not complaints, verify.stdout + verify.stderr
    security = sandbox.run("systemd-analyze", "security", "--offline=true", unit).stdout
    score = float(re.findall(r"exposure level for gatewayd\.service: ([\d.]+)", security)[0])
    assert score < 4.0, security


def check_the_installed_daemon_runs_the_simulator_as_its_user(sandbox: Sandbox) -> None:
    process = subprocess.Popen(
        sandbox.argv(
            [
                "setpriv",
                "--reuid=gatewayd",
                "--regid=gatewayd",
                "--init-groups",
                "--",
                "/usr/bin/gatewayd",
                "run",
                "--config",
                "/etc/gatewayd/gatewayd.yaml",
                "--simulate",
                "3",
                "--stdout",
            ]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        # The packaged config serves the LAN on 8787; a test must not hold a fixed port.
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": "/var/lib/gatewayd",
            "GATEWAYD_OUTPUTS__LOCAL_BROKER__PORT": "0",
        },
    )
    assert process.stdout is not None
    try:
        uids: set[str] = set()
        for line in _lines(process.stdout, RUN_GUARD_S):
            record = json.loads(line)
            if "uid" in record and "t" in record:
                uids.add(record["uid"])
            if len(uids) == 3:
                break
        assert uids == {"sim-01", "sim-02", "sim-03"}
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=RUN_GUARD_S)
        assert process.returncode == 0, err
    finally:
        if process.returncode is None:
            process.kill()
            process.communicate(timeout=RUN_GUARD_S)
    # Nothing the daemon did touched the package's files (no byte code written as root, say).
    assert sandbox.run("dpkg", "-V", "gatewayd", "gatewayd-pydantic").stdout == ""


def check_a_bad_config_exits_78(sandbox: Sandbox) -> None:
    result = sandbox.run(
        "env",
        "GATEWAYD_OUTPUTS__MQTT__PORT=99999",
        "setpriv",
        "--reuid=gatewayd",
        "--regid=gatewayd",
        "--init-groups",
        "/usr/bin/gatewayd",
        "run",
        "--config",
        "/etc/gatewayd/gatewayd.yaml",
        check=False,
    )
    assert result.returncode == 78, result.stderr
    assert "outputs.mqtt.port" in result.stderr


def check_dpkg_verify_is_clean(sandbox: Sandbox) -> None:
    result = sandbox.run("dpkg", "-V", "gatewayd", "gatewayd-pydantic")
    assert result.stdout == "" and result.stderr == ""


def check_purge_leaves_nothing_behind(sandbox: Sandbox) -> None:
    uid = sandbox.run("id", "-u", "gatewayd").stdout.strip()
    processes = sandbox.run("ps", "-o", "pid,ppid,etime,args", "-U", uid, check=False).stdout
    assert len(processes.splitlines()) <= 1, f"still running as gatewayd:\n{processes}"
    sandbox.run("dpkg", "-P", "gatewayd", "gatewayd-pydantic")
    for path in ("/var/lib/gatewayd", "/etc/gatewayd", "/usr/lib/gatewayd", "/usr/bin/gatewayd"):
        assert not sandbox.exists(path), path
    assert sandbox.run("getent", "passwd", "gatewayd", check=False).returncode == 2
    assert sandbox.run("getent", "group", "gatewayd", check=False).returncode == 2
    statoverrides = sandbox.run("dpkg-statoverride", "--list").stdout
    assert "gatewayd" not in statoverrides
    # The account files are back to what they were, byte for byte (adduser's `-` backups aside).
    for name in ("passwd", "group", "shadow", "gshadow", "subuid", "subgid"):
        if not Path(f"/etc/{name}").exists():
            continue
        inside = sandbox.run("cat", f"/etc/{name}").stdout
        assert inside == Path(f"/etc/{name}").read_text(), f"/etc/{name} differs"
    leftovers = [
        path
        for path in sandbox.left_behind()
        if "gatewayd" in path and not path.startswith("/var/log/")
    ]
    assert leftovers == []


def test_build_install_run_verify_purge(
    packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One test, steps in order: under xdist it runs on one worker, beside the rest of the suite,
    with one build and one installation (each step needs the state the previous one left)."""
    check_one_arch_independent_package_with_no_compiled_file(packages)
    box = Sandbox(tmp_path_factory.mktemp("deb-sandbox"))
    try:
        box.run("dpkg", "-i", str(packages.all), str(packages.native))
        check_install_creates_the_user_state_config_and_enables_the_unit(box)
        check_the_installed_unit_verifies_and_is_hardened(box)
        check_the_installed_daemon_runs_the_simulator_as_its_user(box)
        check_a_bad_config_exits_78(box)
        check_dpkg_verify_is_clean(box)
        # Installing over an installation (what an upgrade does) runs every maintainer script
        # again: they must be idempotent.
        box.run("dpkg", "-i", str(packages.all), str(packages.native))
        check_install_creates_the_user_state_config_and_enables_the_unit(box)
        check_purge_leaves_nothing_behind(box)
    finally:
        # A failed step must not leave the package installed for a re-run (the sandbox goes with
        # its namespace anyway, but dpkg -P is what is under test).
        box.run("dpkg", "-P", "gatewayd", "gatewayd-pydantic", check=False)
        box.close()

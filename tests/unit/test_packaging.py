"""The Debian packaging agrees with the code: version, dependencies, exit status, unit file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from gatewayd import __version__
from gatewayd.errors import EX_CONFIG

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"
# Dependencies Debian provides instead of the vendored tree (package name in debian/control).
FROM_DEBIAN = {"pyyaml": "python3-yaml"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(path: Path) -> dict[str, tuple[int, ...]]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = tuple(int(part) for part in version.split("."))
    return pins


def test_the_package_version_is_the_code_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"gatewayd ({__version__})")


def test_every_runtime_dependency_is_vendored_at_a_version_pyproject_accepts() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(DEBIAN / "vendor.txt") | _pins(DEBIAN / "vendor-native.txt")
    control = (DEBIAN / "control").read_text()
    for requirement in project["dependencies"]:
        name = _name(requirement)
        if name in FROM_DEBIAN:
            assert FROM_DEBIAN[name] in control, name
            continue
        assert name in pins, f"{name} is a dependency but not in debian/vendor.txt"
        floor = re.search(r">=\s*([\d.]+)", requirement)
        if floor:
            minimum = tuple(int(part) for part in floor.group(1).split("."))
            assert pins[name] >= minimum, f"{name}: vendored {pins[name]} < {minimum}"


def test_the_compiled_pair_is_not_in_the_pure_list() -> None:
    assert {"pydantic", "pydantic-core"} == set(_pins(DEBIAN / "vendor-native.txt"))
    assert not {"pydantic", "pydantic-core"} & set(_pins(DEBIAN / "vendor.txt"))


def test_the_unit_does_not_restart_on_a_config_error() -> None:
    unit = (ROOT / "systemd" / "gatewayd.service").read_text()
    assert f"RestartPreventExitStatus={EX_CONFIG}" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit

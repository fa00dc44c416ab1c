"""Only gatewayd/clock.py reads the system's clocks: every rule's time is the injected Clock.

A module that reads time.time() (or keeps it as a default argument) behind the clock's back
makes tests depend on the day they run: a test's fixed timestamps then expire under retention
or TTLs weeks later. asyncio's loop.time() stays allowed: it only schedules wake-ups.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gatewayd"
ALLOWED = {PACKAGE / "clock.py"}
FORBIDDEN = {
    ("time", "time"),
    ("time", "time_ns"),
    ("time", "monotonic"),
    ("time", "monotonic_ns"),
    ("time", "localtime"),
    ("time", "gmtime"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
}


def clock_reads(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in FORBIDDEN
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        if isinstance(node, ast.ImportFrom) and node.module in ("time", "datetime"):
            for alias in node.names:
                if (node.module, alias.name) in FORBIDDEN:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    return found


def test_no_module_reads_the_system_clock_but_clock_py() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in ALLOWED
        for line, what in clock_reads(ast.parse(path.read_text(), str(path)))
    ]
    assert offenders == [], "take the time from the injected Clock (gatewayd/clock.py)"


def test_the_check_sees_a_default_argument_and_an_import() -> None:
    source = (
        "import time\nfrom datetime import datetime\n"
        "def f(now=time.time):\n    return datetime.now()\n"
    )
    assert {what for _, what in clock_reads(ast.parse(source))} == {"time.time", "datetime.now"}

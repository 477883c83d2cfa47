"""Prints the compose fault table (tests/deploy/test_compose_up.py) at the end of the run."""

from __future__ import annotations

import sys

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    module = sys.modules.get("tests.deploy.test_compose_up")
    rows = getattr(module, "ROWS", [])
    if module is None or len(rows) < 2:
        return
    terminalreporter.section("docker compose faults (tests/deploy/test_compose_up.py)")
    for line in module.fault_table(rows):
        terminalreporter.write_line(line)

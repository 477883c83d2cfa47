"""The fault-tolerance suite: real etcd, NATS, frontends, workers and routers, one
deployment per scenario (see ``framework.py``), with faults injected under load."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every scenario here runs real processes: bound each one (pytest-timeout) so a hung
    # scenario fails on its own instead of eating CI's budget.
    for item in items:
        if "fault_tolerance" in str(item.fspath) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(150))

"""The deployment of the fault-tolerance suite: ``harness.deployment.Deployment`` with
fast worker drains and load reports (``FAST_WORKER_ARGS``) unless a test sets its own.

    async with Deployment(tmp_path, workers=3, frontends=2, etcd_members=3, router=True) as d:
        load = Load(d.urls, requests=24, concurrency=8, max_tokens=300, tag="x")
        ...
        d.send(d.workers[0], signal.SIGKILL)            # fault injectors
        await d.restart_nats(down=0.5)
        ...
        await d.assert_kv_idle()                        # checkers
        assert await d.migrations() == {"killed": 3}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import deployment


class Deployment(deployment.Deployment):
    def __init__(self, tmp_path: Path, *, worker_args: list[str] | tuple[str, ...] = (), **options: Any) -> None:
        """Every ``harness.deployment.Deployment`` option; a test that wants the worker's
        SIGTERM behaviour sets its own ``--drain-timeout`` in ``worker_args`` (they come
        last and win)."""
        super().__init__(tmp_path, worker_args=[*deployment.FAST_WORKER_ARGS, *worker_args], **options)

"""Process lifecycle: run a component on uvloop, turn SIGTERM/SIGINT into an ordered
graceful stop with a deadline.

    shutdown = GracefulShutdown()
    shutdown.add("deregister", registration.close)       # run first
    shutdown.add("drain", drain_requests, timeout=30)   # then this
    await shutdown.wait()                               # returns after a signal
    await shutdown.run()                                # runs the callbacks in order
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

from dynrt.runtime.log import get_logger

log = get_logger("lifecycle")

StopCallback = Callable[[], Awaitable[Any]]


class GracefulShutdown:
    def __init__(self) -> None:
        self._steps: list[tuple[str, StopCallback, float]] = []
        self.requested = asyncio.Event()
        self.signal_name: str = ""
        self._signals_seen = 0

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1 and sig == signal.SIGINT:
            log.warning("second_interrupt_exiting_now")
            sys.exit(130)
        self.request(sig.name)

    def request(self, reason: str) -> None:
        if not self.requested.is_set():
            self.signal_name = reason
            log.info("shutdown_requested", reason=reason)
            self.requested.set()

    def add(self, name: str, callback: StopCallback, timeout: float = 10.0) -> None:
        """Steps run in the order they were added, each bounded by ``timeout``."""
        self._steps.append((name, callback, timeout))

    async def wait(self) -> None:
        await self.requested.wait()

    async def start_unless_stopped(self, start: Coroutine[Any, Any, None]) -> bool:
        """Run a component's start-up, abandoning it if a stop is requested meanwhile
        (a SIGTERM while waiting for etcd must not wait for etcd). True if it started;
        False if stopped first; start-up's own exception propagates."""
        starting = asyncio.create_task(start, name="start-up")
        stop_requested = asyncio.create_task(self.requested.wait())
        await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return False
        stop_requested.cancel()
        starting.result()
        return True

    async def serve(self, start: Coroutine[Any, Any, None], release: StopCallback, component: str,
                    signals: bool = True, **log_fields: Any
                    ) -> Literal["start_failed", "stopped_while_starting", "stopped"]:
        """The life of a long-running component: signal handlers, its start-up (abandoned
        when a stop is requested meanwhile), serving until a stop is requested, then the
        stop steps in order. A start-up that raises is logged (``{component}_start_failed``)
        and ``release`` frees what it had acquired; so it is after a stop during start-up.
        ``signals=False``: no handlers of its own (one of several components in a process,
        whose owner calls ``request`` on each)."""
        if signals:
            self.install_signal_handlers()
        try:
            started = await self.start_unless_stopped(start)
        except Exception:
            log.exception(f"{component}_start_failed", **log_fields)
            await release()
            return "start_failed"
        if not started:
            await release()
            return "stopped_while_starting"
        await self.wait()
        await self.run()
        return "stopped"

    async def run(self) -> None:
        for name, callback, timeout in self._steps:
            try:
                await asyncio.wait_for(callback(), timeout)
                log.debug("shutdown_step_done", step=name)
            except asyncio.TimeoutError:
                log.warning("shutdown_step_timed_out", step=name, timeout=timeout)
            except Exception:
                log.exception("shutdown_step_failed", step=name)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished unwinding (its ``finally``
    blocks ran); its own exception, if it already failed, is dropped."""
    if task is None:
        return
    # Cancel again until it ends: a library may swallow one cancellation (aetcd's watch
    # stream teardown catches CancelledError), and one lost cancel must not hang a stop.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    try:
        task.result()
    except (asyncio.CancelledError, Exception):
        pass


def run_main(main: Coroutine[Any, Any, int]) -> int:
    """Run a component's main coroutine on uvloop; its return value is the exit code."""
    try:
        import uvloop

        return uvloop.run(main)
    except ImportError:  # uvloop is a dependency, but never let its absence stop a component
        return asyncio.run(main)

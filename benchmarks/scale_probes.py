"""What ``benchmarks/scale.py`` reads to measure the control plane: etcd's own /metrics,
nats-server's monitoring endpoint, ``/proc`` CPU and RSS, and the structured log lines
of frontends (``event=instance_added`` ... with their ``ts=``).

Every probe is a snapshot; rates are the difference of two snapshots over the seconds
between them (``Snapshot.rates``)."""

from __future__ import annotations

import os
import re
import time
from calendar import timegm
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from dynrt.runtime.procs import read_stat
from harness.metrics import parse_metrics

PAGE = 4096


def rss_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_seconds(pid: int) -> float:
    stat = read_stat(pid)
    return stat.cpu_seconds if stat is not None else 0.0


def machine_cpu_seconds() -> float:
    """CPU seconds every process on this machine has used (``/proc/stat``: all but idle
    and iowait), so a window's share used by processes outside the benchmark shows."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def subject_kind(subject: str, namespace: str) -> str:
    """What a NATS subscription carries, by its subject (runtime/protocol.py's names)."""
    prefix = f"dynrt.{namespace}."
    if subject.startswith(prefix + "load."):
        return "load_reports"
    if subject.startswith(prefix + "kv_events."):
        return "kv_events"
    if subject.startswith("_INBOX.") or subject.startswith("_R_"):
        return "responses"
    if subject.startswith(prefix + "router"):
        return "router"
    if subject.startswith(prefix):
        return "requests_control"  # a worker's generate, control and reattach subjects
    return "other"


async def etcd_counters(session: aiohttp.ClientSession, endpoint: str) -> dict[str, float]:
    """gRPC messages etcd received, by method (a unary call is one; a keep-alive stream
    counts each renewal), plus its total of handled unary calls."""
    async with session.get(f"http://{endpoint}/metrics") as response:
        samples = parse_metrics(await response.text())
    out: Counter[str] = Counter()
    for (name, labels), value in samples.items():
        if name == "grpc_server_msg_received_total":
            out[dict(labels).get("grpc_method", "?")] += value
    return dict(out)


async def nats_counters(session: aiohttp.ClientSession, monitor: str, namespace: str) -> dict[str, float]:
    """nats-server's totals (/varz) and messages delivered per subscription kind (/connz
    with subscription details: each subscription's delivered-message count)."""
    async with session.get(f"{monitor}/varz") as response:
        varz = await response.json(content_type=None)
    out: dict[str, float] = {k: float(varz[k]) for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}
    async with session.get(f"{monitor}/connz?subs=detail&limit=100000") as response:
        connz = await response.json(content_type=None)
    for conn in connz.get("connections", []):
        for sub in conn.get("subscriptions_list_detail") or []:
            key = "out_msgs." + subject_kind(sub.get("subject", ""), namespace)
            out[key] = out.get(key, 0.0) + float(sub.get("msgs", 0))
    out["connections"] = float(len(connz.get("connections", [])))
    return out


@dataclass
class Snapshot:
    at: float
    etcd: dict[str, float]
    nats: dict[str, float]
    cpu: dict[int, float]  # by pid; 0: the whole machine

    def rates(self, later: "Snapshot") -> dict[str, Any]:
        dt = later.at - self.at

        def per_s(a: dict[Any, float], b: dict[Any, float]) -> dict[Any, float]:
            return {k: (b[k] - a.get(k, 0.0)) / dt for k in b}

        return {"seconds": dt, "etcd": per_s(self.etcd, later.etcd), "nats": per_s(self.nats, later.nats),
                "cpu": per_s(self.cpu, later.cpu)}


async def snapshot(session: aiohttp.ClientSession, etcd_endpoint: str, nats_monitor: str, namespace: str,
                   pids: list[int]) -> Snapshot:
    return Snapshot(at=time.monotonic(), etcd=await etcd_counters(session, etcd_endpoint),
                    nats=await nats_counters(session, nats_monitor, namespace),
                    cpu={pid: cpu_seconds(pid) for pid in pids} | {0: machine_cpu_seconds()})


_LINE = re.compile(r"^ts=(\S+) .*?event=(\S+)(.*)$")
_IID = re.compile(r"\binstance_id=(\S+)")


def log_ts(text: str) -> float:
    """``2026-11-22T00:00:00.123Z`` (runtime/log.py) → seconds since the epoch."""
    whole, _, millis = text.rstrip("Z").partition(".")
    return timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000


@dataclass
class LogTail:
    """Reads a log file's new lines on each ``events()`` call."""

    path: Path
    offset: int = 0
    seen: list[tuple[float, str, str]] = field(default_factory=list)

    def events(self) -> list[tuple[float, str, str]]:
        """New ``(ts, event, instance_id)`` lines since the last call (also kept in ``seen``)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        new: list[tuple[float, str, str]] = []
        for line in data[:end].decode(errors="replace").splitlines():
            match = _LINE.match(line)
            if match is None:
                continue
            iid = _IID.search(match.group(3))
            if iid is not None:
                new.append((log_ts(match.group(1)), match.group(2), iid.group(1)))
        self.seen += new
        return new

    def first(self, event: str | tuple[str, ...], instance_id: str) -> float | None:
        events = (event,) if isinstance(event, str) else event
        self.events()
        return min((ts for ts, e, i in self.seen if e in events and i == instance_id), default=None)

"""Prometheus metrics: one registry per process, exposed on ``/metrics``.

Each component declares its metrics in its own module with these helpers, so names
follow one scheme: ``dynrt_{component}_{name}``. Every component's ``/metrics`` also
carries ``dynrt_build_info`` (version, Python, git revision). Metrics that a library
registers in ``prometheus_client``'s default registry (vLLM's ``vllm:*`` series) are
served from this registry too, by name prefix (:func:`serve_default_registry`).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets in seconds: token-level (ms) up to whole requests (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Whole requests and their phases, in seconds: vLLM's request-latency buckets (0.3 s to
# 7680 s, ``vllm.v1.metrics.buckets.REQUEST_LATENCY_BUCKETS``) so a dashboard compares
# them with ``vllm:e2e_request_latency_seconds``, below them millisecond buckets for
# the mock engine and for the frontend's own phases.
REQUEST_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                           0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Token counts of one request: 1-2-5 steps like vLLM's (``build_1_2_5_buckets``, which
# stops at the model's max_model_len), up to 1M tokens since a frontend serves models of
# any context length.
TOKEN_BUCKETS = tuple(float(m * 10 ** e) for e in range(7) for m in (1, 2, 5) if m * 10 ** e <= 1_000_000)


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, documentation, labels, registry=REGISTRY)


def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, documentation, labels, registry=REGISTRY)


def histogram(name: str, documentation: str, labels: tuple[str, ...] = (),
              buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
    return Histogram(name, documentation, labels, registry=REGISTRY, buckets=buckets)


def render() -> tuple[bytes, str]:
    """(body, content type) for a ``/metrics`` response."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# -- series registered elsewhere ----------------------------------------------------
class _PrefixedMetrics(Collector):
    """The metric families of another registry whose names start with ``prefix``, read
    at every scrape: whatever the library registers, unregisters and registers again
    there (vLLM re-creates its series for every engine) is served as it is now."""

    def __init__(self, source: CollectorRegistry, prefix: str) -> None:
        self.source = source
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            if family.name.startswith(self.prefix):
                yield family

    def describe(self) -> Iterable[Metric]:
        # Claims no names in REGISTRY: the source registry already keeps them unique,
        # and registering this collector must not collect (the source may be empty yet).
        return ()


_served_prefixes: set[str] = set()


def serve_default_registry(prefix: str) -> None:
    """Serve the series of ``prometheus_client``'s default registry named ``prefix...``
    on this process's ``/metrics``. Idempotent (several engines in one process)."""
    if prefix in _served_prefixes:
        return
    REGISTRY.register(_PrefixedMetrics(prometheus_client.REGISTRY, prefix))
    _served_prefixes.add(prefix)


# -- build info ------------------------------------------------------------------------
@cache
def build_labels() -> dict[str, str]:
    """dynrt's version, the Python version, and the git revision of the source tree
    (``$DYNRT_GIT_REVISION``, else ``git rev-parse`` where the package sits in a git
    checkout, else "unknown")."""
    from dynrt import __version__

    return {"version": __version__, "python": platform.python_version(), "revision": _git_revision()}


def _git_revision() -> str:
    revision = os.environ.get("DYNRT_GIT_REVISION", "")
    if revision:
        return revision
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # an installed wheel or an image without .git
        return "unknown"
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


class _BuildInfo(Collector):
    """``dynrt_build_info{version,python,revision} 1``; the labels are found at the
    first scrape (running git at import would slow every process start)."""

    def collect(self) -> Iterator[Metric]:
        labels = build_labels()
        family = GaugeMetricFamily("dynrt_build_info", "dynrt build: version, Python version and git revision (=1)",
                                   labels=list(labels))
        family.add_metric(list(labels.values()), 1.0)
        yield family

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("dynrt_build_info", "", labels=[])]


REGISTRY.register(_BuildInfo())

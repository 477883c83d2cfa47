"""Prometheus metrics: one registry per process, exposed on ``/metrics``.

Each component declares its metrics in its own module with these helpers, so names
follow one scheme: ``dynrt_{component}_{name}``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets in seconds: token-level (ms) up to whole requests (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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

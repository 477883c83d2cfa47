"""Prometheus text format, as the frontends, workers and router serve it on /metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text format → ``{(sample name, frozenset(labels.items())): value}``."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent, as an unincremented labelled counter is)."""
    return samples.get((name, frozenset(labels.items())), 0.0)

"""Read a .prom file back the way Prometheus would."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(metric name, sorted labels): value} for every sample in an exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by_tunnel(text: str, metric: str) -> dict[str, float]:
    """{tunnel: value} of one per-tunnel metric."""
    return {dict(labels)["tunnel"]: value
            for (name, labels), value in samples(text).items() if name == metric}


def value(text: str, metric: str) -> float:
    return samples(text)[(metric, ())]

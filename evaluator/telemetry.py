"""The daemon's own counters and gauges, rendered in the Prometheus text format at admin /metrics.

Deliberately small: a counter is a dict of label tuples to floats behind one lock. Components receive the
Telemetry instance through their constructors, so tests read exact values from the instance they built.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable


def _labels_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class Metric:
    def __init__(self, name: str, help_text: str, kind: str, label_names: tuple[str, ...]) -> None:
        self.name = name
        self.help = help_text
        self.kind = kind
        self.label_names = label_names
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        with self._lock:
            return sorted(self._values.items())


class Counter(Metric):
    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(Metric):
    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def add(self, amount: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Telemetry:
    """A registry. `collectors` are called before rendering to refresh gauges read from elsewhere."""

    def __init__(self, namespace: str = "otel_evaluator") -> None:
        self.namespace = namespace
        self._metrics: dict[str, Metric] = {}
        self._collectors: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def _register(self, metric: Metric) -> Metric:
        with self._lock:
            existing = self._metrics.get(metric.name)
            if existing is not None:
                if type(existing) is not type(metric) or existing.label_names != metric.label_names:
                    raise ValueError(f"metric {metric.name} already registered differently")
                return existing
            self._metrics[metric.name] = metric
            return metric

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
        metric = self._register(Counter(f"{self.namespace}_{name}", help_text, "counter", labels))
        assert isinstance(metric, Counter)
        return metric

    def gauge(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        metric = self._register(Gauge(f"{self.namespace}_{name}", help_text, "gauge", labels))
        assert isinstance(metric, Gauge)
        return metric

    def add_collector(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._collectors.append(fn)

    def get(self, name: str) -> Metric:
        return self._metrics[f"{self.namespace}_{name}"]

    def metrics(self) -> list[Metric]:
        """Every registered metric, sorted by name (for exporters)."""
        with self._lock:
            return sorted(self._metrics.values(), key=lambda m: m.name)

    def collect(self) -> None:
        """Refresh the gauges read from elsewhere (store size, in-flight bytes, ...)."""
        with self._lock:
            collectors = list(self._collectors)
        for fn in collectors:
            fn()

    def render_prometheus(self) -> str:
        self.collect()
        metrics = self.metrics()
        lines: list[str] = []
        for m in metrics:
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            samples = m.samples()
            if not samples and not m.label_names:
                samples = [((), 0.0)]
            for labels, value in samples:
                lines.append(f"{m.name}{_labels_text(m.label_names, labels)} {_fmt(value)}")
        return "\n".join(lines) + "\n"

"""Prometheus histograms and counters for the event loop's own thread: no lock, no checks.

prometheus-client's histogram takes a lock for its sum and for the bucket it counts and walks
the buckets one by one, and each counter increment checks and locks too; the gateway counts
from the loop's thread alone (the handlers, the pumped relay and the `/metrics` handler all run
there), where that is pure cost: the inter-token histogram is observed on every relayed chunk.
A histogram observation is one bisect; both export the same families as prometheus-client's
(`_bucket`, `_count`, `_sum`; `_total`) through collectors on the gateway's registry.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_bound_name = cast(Callable[[float], str], floatToGoString)  # untyped upstream


class LoopHistogramChild:
    """One label set's buckets: observe only from the event loop's thread."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bound >= value: Prometheus buckets count `value <= le`.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class LoopCounterChild:
    """One label set's count: increment only from the event loop's thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


_Child = TypeVar("_Child")


class _Labelled(Collector, Generic[_Child]):
    """A metric's children by label values, registered on `registry`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        new_child: Callable[[], _Child],
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._new_child = new_child
        self._children: dict[tuple[str, ...], _Child] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child


class LoopHistogram(_Labelled[LoopHistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets))
        super().__init__(
            name, documentation, labelnames, registry, lambda: LoopHistogramChild(bounds)
        )
        self._bounds = bounds

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        names = [_bound_name(b) for b in self._bounds] + ["+Inf"]
        for values, child in list(self._children.items()):
            total = 0
            buckets = []
            for name, count in zip(names, child.counts, strict=True):
                total += count
                buckets.append((name, float(total)))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class LoopCounter(_Labelled[LoopCounterChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry, LoopCounterChild)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family

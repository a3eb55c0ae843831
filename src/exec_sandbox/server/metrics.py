"""Prometheus metrics of ``sbx serve`` (``/metrics``), on a registry of its own (not the global one).

- ``sbx_serve_sandboxes{state}``: sandboxes by state (collected at scrape time from the registry)
- ``sbx_serve_request_seconds{kind}``: request latency, by kind (control / envd / interpreter)
- ``sbx_serve_run_seconds{path}``: code run latency inside a sandbox (``command``: envd Process.Start;
  ``cell``: code-interpreter /execute), from dispatch to exit
- ``sbx_serve_sandboxes_created_total`` / ``sbx_serve_sandbox_create_seconds``: creations and their latency
- ``sbx_serve_egress_connections{outcome}``, ``sbx_serve_egress_bytes{direction}``,
  ``sbx_serve_egress_active_connections``: egress of the live networked sandboxes (summed over their
  gateways at scrape time; a sandbox's own log is on its session)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from exec_sandbox.egress.accounting import EgressStats

__all__ = ["REGISTRY", "SandboxCounts", "bind", "observe_create", "observe_request", "observe_run", "render"]

REGISTRY = CollectorRegistry(auto_describe=True)
_REQUESTS = Histogram(
    "sbx_serve_request_seconds",
    "Request latency (for streams: until the response ended)",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


_RUNS = Histogram(
    "sbx_serve_run_seconds",
    "Code run latency in a sandbox, dispatch to exit",
    ["path"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
_CREATED = Counter("sbx_serve_sandboxes_created", "Sandboxes created", registry=REGISTRY)
_CREATE_SECONDS = Histogram(
    "sbx_serve_sandbox_create_seconds",
    "Sandbox creation latency (VM from snapshot / warm pool / cold boot)",
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


def observe_run(path: str, seconds: float) -> None:
    _RUNS.labels(path=path).observe(seconds)


def observe_create(seconds: float) -> None:
    _CREATED.inc()
    _CREATE_SECONDS.observe(seconds)


class SandboxCounts(Protocol):
    """What the sandboxes gauge reads (the server's SandboxRegistry; a protocol, so that the registry,
    which reports into this module, is not imported back)."""

    def count(self) -> int: ...
    def creating(self) -> int: ...
    def paused_count(self) -> int: ...
    def egress_stats(self) -> list[EgressStats]: ...


class _SandboxCollector(Collector):
    def __init__(self) -> None:
        self.registry: SandboxCounts | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("sbx_serve_sandboxes", "Sandboxes by state", labels=["state"])
        g.add_metric(["running"], self.registry.count() if self.registry is not None else 0)
        g.add_metric(["creating"], self.registry.creating() if self.registry is not None else 0)
        g.add_metric(["paused"], self.registry.paused_count() if self.registry is not None else 0)
        yield g
        stats = self.registry.egress_stats() if self.registry is not None else []
        conns = GaugeMetricFamily("sbx_serve_egress_connections", "Egress connections of live sandboxes",
                                  labels=["outcome"])
        refused = sum(s.refused_total for s in stats)
        conns.add_metric(["allowed"], sum(s.connections_total for s in stats) - refused)
        conns.add_metric(["refused"], refused)
        yield conns
        moved = GaugeMetricFamily("sbx_serve_egress_bytes", "Egress bytes of live sandboxes",
                                  labels=["direction"])
        moved.add_metric(["in"], sum(s.bytes_in for s in stats))
        moved.add_metric(["out"], sum(s.bytes_out for s in stats))
        yield moved
        yield GaugeMetricFamily("sbx_serve_egress_active_connections", "Open egress connections",
                                value=sum(s.active_connections for s in stats))


_COLLECTOR = _SandboxCollector()
REGISTRY.register(_COLLECTOR)


def bind(registry: SandboxCounts) -> None:
    _COLLECTOR.registry = registry


def observe_request(scope: MutableMapping[str, Any], started: float) -> None:
    headers = dict(scope.get("headers") or [])
    if b"e2b-sandbox-id" not in headers:
        kind = "control"
    elif headers.get(b"e2b-sandbox-port") == b"49999":
        kind = "interpreter"
    else:
        kind = "envd"
    _REQUESTS.labels(kind=kind).observe(time.perf_counter() - started)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

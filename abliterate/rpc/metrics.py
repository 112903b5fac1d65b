"""Prometheus metrics of a service: one registry per :class:`Metrics`, served over HTTP on request.

    metrics = Metrics()
    server, port, health = build_server(pairs, address, metrics=metrics)   # counts every RPC
    endpoint = serve_metrics(metrics, "0.0.0.0:9464")                     # GET /metrics
    ...
    endpoint.close()

Each :class:`Metrics` has its own ``CollectorRegistry`` (never prometheus_client's global one), so
several services in one process (the embedded run, tests) do not collide; servers that share a
``Metrics`` (the embedded run's three) share one endpoint, their RPCs told apart by the ``service``
label. What is not a count of events (an evaluator's state, the jobs per phase, the trials queued) is
read from the live objects at scrape time by :meth:`Metrics.add_gauges`, so it can never drift from
the truth. No torch, no service imports.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the trial-duration buckets: from a tiny model's trial to an hour-long one.
TRIAL_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

#: A gauge read at scrape time: label values -> value (``{(): 3.0}`` for a gauge without labels).
GaugeReading = Mapping[tuple[str, ...], float]


class TrialMetrics:
    """Trials the optimizer finished, by study and final state, and how long they ran."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.finished = Counter(
            "abliterate_optimizer_trials",
            "Trials this optimizer finished, by study and final state (complete, pruned or fail)",
            ["study", "state"],
            registry=registry,
        )
        self.duration = Histogram(
            "abliterate_optimizer_trial_duration_seconds",
            "Seconds from dispatch to the end of a trial, by final state",
            ["state"],
            buckets=TRIAL_DURATION_BUCKETS,
            registry=registry,
        )

    def trial_finished(self, study: str, state: str, seconds: float | None) -> None:
        """One trial of ``study`` ended ``complete``, ``pruned`` or ``fail`` after ``seconds`` (None: unknown)."""
        self.finished.labels(study=study, state=state).inc()
        if seconds is not None and seconds >= 0:
            self.duration.labels(state=state).observe(seconds)


class _GaugeCallback(Collector):
    """One gauge family whose samples a function returns when the registry is scraped."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], read: Callable[[], GaugeReading]):
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.read = read

    def describe(self) -> Iterable[Any]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        try:
            reading = self.read()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one reading did
            # E.g. the database is away: the family goes without samples (its absence is the signal).
            log.debug("metric %s not read: %r", self.name, exc)
            reading = {}
        for values, value in reading.items():
            family.add_metric([str(v) for v in values], float(value))
        yield family


class Metrics:
    """The metrics of one service (or of the services of one process, when their servers share it)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # What the global registry would show: process_resident_memory_bytes, CPU seconds, open fds
        # (from /proc, Linux), the Python version and garbage-collector counts.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "abliterate_rpc_requests",
            "gRPC calls answered, by service, method and status code",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "abliterate_rpc_open_streams",
            "Server-streaming calls open now (WatchJob, RunStudy, Chat, ...), by service and method",
            ["service", "method"],
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._database_up: Gauge | None = None
        self._trials: TrialMetrics | None = None

    @property
    def trials(self) -> TrialMetrics:
        """The optimizer's trial counters (created on first use, so only the optimizer shows them)."""
        with self._lock:  # two first uses at once must not register the families twice
            if self._trials is None:
                self._trials = TrialMetrics(self.registry)
            return self._trials

    def database_reachable(self, name: str, reachable: bool) -> None:
        """Record the last database check of ``name`` (1 reachable, 0 not): ``abliterate_database_up``."""
        with self._lock:
            if self._database_up is None:
                self._database_up = Gauge(
                    "abliterate_database_up",
                    "1 while the service's database answers its periodic check, else 0 (health is then NOT_SERVING)",
                    ["database"],
                    registry=self.registry,
                )
        self._database_up.labels(database=name).set(1 if reachable else 0)

    def add_gauges(
        self, name: str, documentation: str, labels: Sequence[str], read: Callable[[], GaugeReading]
    ) -> None:
        """A gauge family read at scrape time: ``read()`` returns ``{label values: value}``."""
        self.registry.register(_GaugeCallback(name, documentation, labels, read))

    def interceptor(self) -> grpc.ServerInterceptor:
        """Counts every call by status code and the server streams open (build_server installs it first)."""
        return MetricsInterceptor(self)


def _split_method(full_method: str) -> tuple[str, str]:
    """``/abliterate.v1.GatewayService/GetJob`` -> ``("abliterate.v1.GatewayService", "GetJob")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _code_name(context: grpc.ServicerContext, default: str) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default


class MetricsInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: sees the final status, including UNAUTHENTICATED and mapped errors."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        replaced = {}
        for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, attr, None)
            # Non-blocking behaviours (health Watch) take a callback argument: left alone.
            if behavior is None or getattr(behavior, "experimental_non_blocking", False):
                continue
            if attr.endswith("_stream"):
                replaced[attr] = self._streaming(behavior, service, method)
            else:
                replaced[attr] = self._unary(behavior, service, method)
        return handler._replace(**replaced) if replaced else handler

    def _count(self, service: str, method: str, code: str) -> None:
        self._metrics.requests.labels(service=service, method=method, code=code).inc()

    def _unary(self, behavior: Callable, service: str, method: str) -> Callable:
        def counted(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                response = behavior(request, context)
            except BaseException:
                # context.abort (the error mapping's way) records the code before it raises.
                self._count(service, method, _code_name(context, "UNKNOWN"))
                raise
            self._count(service, method, _code_name(context, "OK"))
            return response

        return counted

    def _streaming(self, behavior: Callable, service: str, method: str) -> Callable:
        open_streams = self._metrics.open_streams.labels(service=service, method=method)

        def counted(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            open_streams.inc()
            # Closed when the call ends however it ends (done, failed, cancelled by the client).
            if not context.add_callback(open_streams.dec):
                open_streams.dec()
            code = "OK"
            try:
                yield from behavior(request, context)
            except GeneratorExit:
                code = "CANCELLED"  # the client went away mid-stream
                raise
            except BaseException:
                code = _code_name(context, "UNKNOWN")
                raise
            else:
                code = _code_name(context, "OK")
            finally:
                self._count(service, method, code)

        return counted


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint; ``close()`` stops it."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[::]:9464`` for IPv6; port 0 = a free one) -> ``(host, port)``; ValueError if bad."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics address must be host:port, got {address[:80]!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def serve_metrics(metrics: Metrics, address: str) -> MetricsEndpoint:
    """Serve ``metrics`` as Prometheus text on ``http://address/metrics`` (any path answers) in a daemon thread."""
    host, port = parse_address(address)
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise OSError(f"cannot bind the metrics endpoint {address}: {exc}") from exc
    bound = server.server_address[1]
    log.info("metrics endpoint listening", extra={"address": address, "port": bound})
    return MetricsEndpoint(server, thread, host, bound)

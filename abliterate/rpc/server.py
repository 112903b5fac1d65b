"""Server builder: message limits, health, reflection, bearer-token auth, error mapping.

    server, port, health = build_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, servicer)],
        "0.0.0.0:50051",
    )
    server.start()
    ...load the model...
    health.set_serving()          # every registered service -> SERVING
    serve_until_signal(server, grace_s=10, health=health)

One process may host several servicers on one server (embedded mode, or the
extractor and evaluator sharing a model on a one-GPU box).
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from abliterate.rpc.errors import ErrorMappingInterceptor, OomHook
from abliterate.rpc.limits import DEFAULT_MAX_MESSAGE_BYTES
from abliterate.rpc.metrics import Metrics
from abliterate.rpc.reflection import enable_documented_reflection
from abliterate.rpc.streams import DEFAULT_MAX_STREAMS, StreamLimitInterceptor
from abliterate.rpc.tls import ServerTLS

log = logging.getLogger(__name__)

AddFn = Callable[[Any, grpc.Server], None]

#: gRPC health service name; health checks never need a token.
HEALTH_SERVICE_NAME = health.SERVICE_NAME
#: Method prefixes exempt from bearer-token auth.
AUTH_EXEMPT_PREFIXES = (f"/{HEALTH_SERVICE_NAME}/",)
#: Method prefixes the error-mapping interceptor leaves alone (grpc's own services).
_UNMAPPED_PREFIXES = ("/grpc.",)


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel arguments of a server with the given message limit."""
    return [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        # Never share a port silently with another process.
        ("grpc.so_reuseport", 0),
    ]


class Health(health.HealthServicer):
    """The standard health servicer, knowing which services this server hosts.

    Every hosted service and the overall status ("") start NOT_SERVING.
    """

    def __init__(self, service_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service_names: list[str] = list(service_names)
        for name in ["", *self.service_names]:
            self.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def set_serving(self, serving: bool = True, services: Iterable[str] | None = None) -> None:
        """Set the given services (default: all hosted ones and the overall "") SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        names = ["", *self.service_names] if services is None else list(services)
        for name in names:
            self.set(name, status)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata, except for health checks."""

    def __init__(self, token: str, exempt_prefixes: Sequence[str] = AUTH_EXEMPT_PREFIXES) -> None:
        if not token:
            raise ValueError("empty auth token")
        self._expected = f"Bearer {token}".encode()
        self._exempt = tuple(exempt_prefixes)

    def _authorized(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method.startswith(self._exempt):
            return continuation(handler_call_details)
        if self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        log.warning("unauthenticated call to %s refused", handler_call_details.method)
        return _deny_handler(handler, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def deny(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class _AppErrorInterceptor(ErrorMappingInterceptor):
    """Error mapping for the application's services only (grpc's own are left as they are)."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method.startswith(_UNMAPPED_PREFIXES):
            return continuation(handler_call_details)
        return super().intercept_service(continuation, handler_call_details)


class _NameRecorder:
    """Stands in for the server while a generated ``add_*_to_server`` runs, to learn the service name."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server
        self.names: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        handlers = tuple(handlers)
        for handler in handlers:
            service_name = getattr(handler, "service_name", None)
            if callable(service_name):
                name = service_name()
                if name and name not in self.names:
                    self.names.append(name)
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        if service_name not in self.names:
            self.names.append(service_name)
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def build_server(
    servicers: Sequence[tuple[AddFn, Any]],
    address: str = "127.0.0.1:0",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    workers: int = 8,
    auth_token: str | None = None,
    *,
    on_oom: OomHook | None = None,
    map_errors: bool = True,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    tls: ServerTLS | None = None,
    metrics: Metrics | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
) -> tuple[grpc.Server, int, Health]:
    """Build (not start) a server hosting ``servicers``; return ``(server, bound_port, health)``.

    - ``servicers``: ``(add_XServicer_to_server, servicer)`` pairs;
    - ``address``: ``host:port``; port 0 binds a free port (returned);
    - message limit set on both directions;
    - grpc.health.v1 for every hosted service and "" (all NOT_SERVING until
      ``health.set_serving()``), server reflection for them all (with the proto comments);
    - ``auth_token``: when set, every call but health checks needs
      ``authorization: Bearer <token>`` (else UNAUTHENTICATED);
    - ``map_errors``: domain exceptions raised by servicers become statuses
      (errors.STATUS_BY_ERROR), ``on_oom`` runs first on out-of-memory;
    - ``tls``: serve TLS only (mutual TLS when it has a client CA); else plaintext.
      A port open to other hosts without a token logs a WARNING (``warn_if_open``).
    - ``metrics``: every call is counted by status code and open streams are
      gauged (outermost, so refused and mapped calls count with their final
      code), and each servicer with a ``register_metrics(metrics)`` method
      gets it (its own gauges and counters); serving them over HTTP is
      ``abliterate.rpc.metrics.serve_metrics``;
    - ``workers`` threads serve unary calls and health checks, and up to
      ``max_streams`` server streams have threads of their own (the pool is
      ``workers + max_streams``); one more stream is RESOURCE_EXHAUSTED, so open
      watchers never starve GetJob or health (``abliterate.rpc.streams``).
    """
    chain: list[grpc.ServerInterceptor] = []
    if metrics is not None:
        chain.append(metrics.interceptor())
    if auth_token:
        chain.append(BearerTokenInterceptor(auth_token))
    # After auth: a refused caller takes no stream slot.
    chain.append(StreamLimitInterceptor(max_streams))
    if map_errors:
        chain.append(_AppErrorInterceptor(on_oom=on_oom))
    chain.extend(interceptors)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers + max_streams, thread_name_prefix="grpc-worker"),
        interceptors=chain,
        options=server_options(max_message_bytes),
        maximum_concurrent_rpcs=None,
    )
    recorder = _NameRecorder(server)
    for add_fn, servicer in servicers:
        add_fn(servicer, recorder)
        register_metrics = getattr(servicer, "register_metrics", None)
        if metrics is not None and callable(register_metrics):
            register_metrics(metrics)
    service_names = list(recorder.names)

    health_servicer = Health(service_names)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Reflection answers the project's files with their comments (grpcurl describe shows the documentation).
    enable_documented_reflection([*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)

    try:
        port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot bind {address}")
    log.info(
        "server built",
        extra={"address": address, "port": port, "services": service_names, "tls": describe_tls(tls)},
    )
    warn_if_open(address, auth_token, service_names)
    return server, port, health_servicer


def describe_tls(tls: ServerTLS | None) -> str:
    if tls is None:
        return "off"
    return "mutual" if tls.client_ca_file else "on"


def is_loopback_address(address: str) -> bool:
    """Whether a listen address ``host:port`` accepts connections from this machine only."""
    host = address.rpartition(":")[0].strip("[]").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def warn_if_open(address: str, auth_token: str | None, service_names: Sequence[str] = ()) -> bool:
    """Log a WARNING (and return True) when a port other hosts can reach takes calls without a token.

    Loopback-only servers (the embedded run) stay quiet: only this machine reaches them.
    """
    if auth_token or is_loopback_address(address):
        return False
    names = ", ".join(n.rsplit(".", 1)[-1] for n in service_names) or "this server"
    log.warning(
        "NO AUTH TOKEN: %s on %s accepts calls from ANYONE who can reach the port "
        "(set the service's auth_token, e.g. ABLITERATE_SERVICE_TOKEN in compose)",
        names,
        address,
    )
    return True


def serve_until_signal(
    server: grpc.Server,
    grace_s: float = 5.0,
    health: Health | None = None,
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
) -> int | None:
    """Block until SIGTERM/SIGINT (or the server terminates), then stop gracefully.

    Health goes NOT_SERVING first, then ``server.stop(grace_s)`` lets calls in
    flight finish. Returns the signal number received (None if the server
    stopped by itself). Signal handlers can only be installed from the main
    thread; elsewhere this just waits for termination.
    """
    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous: dict[int, Any] = {}
    if in_main:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
    try:
        if in_main:
            # Waits in short slices so the main thread keeps running signal handlers.
            while not stop.is_set():
                timed_out = server.wait_for_termination(timeout=0.5)
                if not timed_out:
                    break  # the server terminated by itself
        else:
            server.wait_for_termination()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if received:
        log.info("signal %s received, stopping (grace %.1fs)", signal.Signals(received[0]).name, grace_s)
        if health is not None:
            health.enter_graceful_shutdown()
        server.stop(grace_s).wait()
        log.info("server stopped")
        return received[0]
    return None

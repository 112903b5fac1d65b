"""Client channels: message limits, bearer token, waiting for a server to serve."""

from __future__ import annotations

import collections
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from abliterate.errors import Unavailable
from abliterate.rpc.limits import DEFAULT_MAX_MESSAGE_BYTES
from abliterate.rpc.tls import ClientTLS


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel arguments of a client with the given message limit."""
    return [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
    ]


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (works on insecure channels)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0].lower() != "authorization"]
        metadata.append(self._header)
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def make_channel(
    address: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    token: str | None = None,
    options: list[tuple[str, Any]] | None = None,
    *,
    tls: ClientTLS | None = None,
) -> grpc.Channel:
    """A channel to ``address`` with the message limit and, if given, the bearer token.

    Plaintext unless ``tls`` is given (then the server's certificate is verified, and a client
    certificate is presented when ``tls`` has one).
    """
    all_options = [*channel_options(max_message_bytes), *(options or [])]
    if tls is not None:
        channel = grpc.secure_channel(address, tls.credentials(), options=[*all_options, *tls.channel_options()])
    else:
        channel = grpc.insecure_channel(address, options=all_options)
    if token:
        return grpc.intercept_channel(channel, BearerTokenClientInterceptor(token))
    return channel


def health_status(channel: grpc.Channel, service_name: str = "", timeout_s: float = 5.0) -> int:
    """One health check: a ``HealthCheckResponse.ServingStatus`` value (raises RpcError on failure)."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=timeout_s).status


def wait_for_serving(
    channel: grpc.Channel, service_name: str = "", timeout_s: float = 30.0, poll_s: float = 0.2
) -> None:
    """Poll the health service until ``service_name`` is SERVING; raise :class:`Unavailable` at the deadline.

    An unreachable server, an unknown service name (not registered yet) and
    NOT_SERVING are all waited out until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable(f"service {service_name or '(overall)'} not SERVING after {timeout_s:.1f}s: {last}")
        try:
            status = health_status(channel, service_name, timeout_s=max(0.05, min(remaining, 5.0)))
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

"""Domain exceptions <-> gRPC status codes, in one table.

Server side, one mechanism: :class:`ErrorMappingInterceptor` (``build_server``
installs it) turns an exception raised by any servicer method, unary or
streaming, into ``context.abort(code, message)``; a database outage becomes
UNAVAILABLE, an out-of-memory error RESOURCE_EXHAUSTED (after ``on_oom``).

Client side: :func:`translate_rpc_errors` (context manager), :func:`from_rpc_error`
and :func:`mapped_stub` turn a ``grpc.RpcError`` back into the domain
exception carrying the server's message, so callers never see raw RpcErrors.

This module imports grpc, never torch: a torch out-of-memory error is
recognised by its class name.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from abliterate.database import describe_outage, is_outage
from abliterate.errors import (
    AbliterateError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)


#: THE table: domain exception class -> status code. Subclasses map like
#: their nearest listed base (UnsupportedArchitecture -> INVALID_ARGUMENT).
STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class RemoteError(AbliterateError):
    """A status without a domain class (INTERNAL, UNKNOWN, CANCELLED, UNIMPLEMENTED, ...)."""


class Unauthenticated(RemoteError):
    """The server wants a (different) bearer token."""


class DeadlineExceeded(Unavailable):
    """The call ran past its deadline (client side; a retry may succeed, as for any Unavailable)."""


class Cancelled(RemoteError):
    """The call was cancelled (by this client, or the server went away mid-call)."""


#: Client side: status code -> domain exception class (the inverse of the
#: table, plus the codes gRPC itself produces).
ERROR_BY_STATUS: dict[grpc.StatusCode, type[AbliterateError]] = {
    **{code: cls for cls, code in STATUS_BY_ERROR.items()},
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}

#: Longest cause put in the details of an INTERNAL status.
MAX_INTERNAL_DETAIL_CHARS = 300

#: Longest details string of any status the interceptor sends: a safety net under messages that
#: quote a value, since details travel in trailing metadata (gRPC's limit is 8 KiB by default).
MAX_DETAIL_CHARS = 2000

OomHook = Callable[[], Any]


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's (CUDA) OutOfMemoryError recognised by class name."""
    if isinstance(exc, MemoryError):
        return True
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the details message for an exception raised by a servicer."""
    remote_code = getattr(exc, "code", None)
    if isinstance(exc, RemoteError) and isinstance(remote_code, grpc.StatusCode):
        # A status without a domain class that a call to another service returned (from_rpc_error):
        # forward it with its message, not as "INTERNAL: RemoteError: INTERNAL: ..." around them.
        details = getattr(exc, "details", "") or remote_code.name
        if isinstance(exc, Unauthenticated):
            # The backend refused this service's credentials: the operator's problem, not the caller's.
            return grpc.StatusCode.UNAVAILABLE, f"a backend refused this service's credentials: {details}"
        return remote_code, details
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code, str(exc) or type(exc).__name__
    if is_outage(exc):
        # The database did not answer: the caller may retry, as for any other UNAVAILABLE.
        return grpc.StatusCode.UNAVAILABLE, f"the database is unreachable: {describe_outage(exc)}"
    if is_out_of_memory(exc):
        cause = _short(exc)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {cause}" if cause else "out of memory"
    cause = _short(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}" + (f": {cause}" if cause else "")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > MAX_INTERNAL_DETAIL_CHARS:
        text = text[: MAX_INTERNAL_DETAIL_CHARS - 3] + "..."
    return text


def _status_already_set(context: grpc.ServicerContext) -> bool:
    """True when the servicer already chose a status: ``context.abort()`` (which raises a bare
    Exception) or ``context.set_code()`` before raising (as the generated base servicer does
    for UNIMPLEMENTED). gRPC then reports that status; we leave it alone."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - not every context implements code()
        return False
    return code is not None and code != grpc.StatusCode.OK


def _abort(exc: BaseException, context: grpc.ServicerContext, method: str, on_oom: OomHook | None) -> None:
    if _status_already_set(context):
        raise exc
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise exc
    if is_out_of_memory(exc) and on_oom is not None:
        try:
            on_oom()
        except Exception:  # noqa: BLE001 - the hook must not mask the OOM
            log.exception("out-of-memory hook failed in %s", method)
    code, message = status_for(exc)
    if len(message) > MAX_DETAIL_CHARS:
        message = message[: MAX_DETAIL_CHARS - 3] + "..."
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed: %s", method, message, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    context.abort(code, message)


def wrap_behavior(behavior: Callable, *, streaming: bool, method: str = "", on_oom: OomHook | None = None) -> Callable:
    """Wrap a handler ``behavior(request_or_iterator, context)`` so exceptions become statuses."""
    name = method or getattr(behavior, "__qualname__", "rpc")

    if streaming:

        @functools.wraps(behavior)
        def stream_behavior(*args: Any, **kwargs: Any) -> Iterator:
            context = _find_context(args, kwargs)
            try:
                yield from behavior(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - converted or re-raised by _abort
                _abort(exc, context, name, on_oom)

        return stream_behavior

    @functools.wraps(behavior)
    def unary_behavior(*args: Any, **kwargs: Any) -> Any:
        try:
            return behavior(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - converted or re-raised by _abort
            _abort(exc, _find_context(args, kwargs), name, on_oom)

    return unary_behavior


def _find_context(args: tuple, kwargs: dict) -> grpc.ServicerContext:
    if "context" in kwargs:
        return kwargs["context"]
    return args[-1]


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message, until the behavior refuses it.

    gRPC answers INTERNAL ("Exception deserializing request!") when the deserializer raises; a client's
    malformed bytes are its mistake, so the deserializer returns this instead and the call is refused
    with INVALID_ARGUMENT.
    """

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _tolerant_deserializer(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return deserialize


def _refusing_undecodable(behavior: Callable, *, streaming: bool, method: str) -> Callable:
    """``behavior`` refusing an undecodable request (every request of ours is unary) with INVALID_ARGUMENT."""
    rpc_name = method.rsplit("/", 1)[-1] or "this"

    def check(args: tuple) -> None:
        if args and isinstance(args[0], _Undecodable):
            raise InvalidArgument(f"the request bytes are not a valid {rpc_name} request message")

    if streaming:

        @functools.wraps(behavior)
        def stream_behavior(*args: Any, **kwargs: Any) -> Iterator:
            check(args)
            yield from behavior(*args, **kwargs)

        return stream_behavior

    @functools.wraps(behavior)
    def unary_behavior(*args: Any, **kwargs: Any) -> Any:
        check(args)
        return behavior(*args, **kwargs)

    return unary_behavior


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Applies the error table to every method served (unary and streaming); undecodable request
    bytes are INVALID_ARGUMENT, not gRPC's own INTERNAL."""

    def __init__(self, on_oom: OomHook | None = None) -> None:
        self._on_oom = on_oom

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        replaced = {}
        for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, attr, None)
            # Non-blocking behaviors (health Watch) get a callback argument: leave them alone.
            if behavior is not None and not getattr(behavior, "experimental_non_blocking", False):
                streaming = attr.endswith("_stream")
                replaced[attr] = wrap_behavior(
                    _refusing_undecodable(behavior, streaming=streaming, method=method),
                    streaming=streaming,
                    method=method,
                    on_oom=self._on_oom,
                )
        if not replaced:
            return handler
        if not handler.request_streaming:
            replaced["request_deserializer"] = _tolerant_deserializer(handler.request_deserializer)
        return handler._replace(**replaced)


# ---------------------------------------------------------------- client side


def from_rpc_error(err: grpc.RpcError) -> AbliterateError:
    """The domain exception for a failed call, with the server's message.

    The result carries ``.code`` (``grpc.StatusCode``) and ``.details`` (str).
    """
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    details = details or (code.name if code is not None else "UNKNOWN")
    cls = ERROR_BY_STATUS.get(code, RemoteError)
    if cls is RemoteError or code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        message = f"{code.name if code else 'UNKNOWN'}: {details}"
    else:
        message = details
    exc = cls(message)
    exc.code = code  # type: ignore[attr-defined]
    exc.details = details  # type: ignore[attr-defined]
    return exc


def status_name(exc: BaseException) -> str:
    """The status code's name for ``exc``: the remote one for an error a call returned, else the one a
    servicer raising it would answer (``INVALID_ARGUMENT``, ``INTERNAL``, ...)."""
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code.name
    return status_for(exc)[0].name


@contextlib.contextmanager
def translate_rpc_errors() -> Iterator[None]:
    """``with translate_rpc_errors(): stub.X(req)`` raises domain exceptions, not RpcError.

    For a server stream, iterate inside the block (or use :func:`mapped_stub`).
    """
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err


class _MappedStream:
    """A server-stream call whose iteration raises domain exceptions; still a Call."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> "_MappedStream":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def __getattr__(self, name: str) -> Any:  # cancel(), code(), initial_metadata(), ...
        return getattr(self._call, name)


class _MappedMethod:
    def __init__(self, multicallable: Any) -> None:
        self._callable = multicallable
        self._streaming = isinstance(multicallable, (grpc.UnaryStreamMultiCallable, grpc.StreamStreamMultiCallable))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = self._callable(*args, **kwargs)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return _MappedStream(result) if self._streaming else result

    def __getattr__(self, name: str) -> Any:  # future(), with_call()
        return getattr(self._callable, name)


class mapped_stub:  # noqa: N801 - used like a function
    """Wrap a generated stub so every call raises domain exceptions instead of RpcError.

    ``mapped_stub(EvaluatorServiceStub(channel)).EvaluateTrial(req, timeout=60)``;
    a server-streaming method returns an iterator that also maps errors and
    keeps ``cancel()``.
    """

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._stub, name)
        if isinstance(
            attr,
            (
                grpc.UnaryUnaryMultiCallable,
                grpc.UnaryStreamMultiCallable,
                grpc.StreamUnaryMultiCallable,
                grpc.StreamStreamMultiCallable,
            ),
        ):
            return _MappedMethod(attr)
        return attr

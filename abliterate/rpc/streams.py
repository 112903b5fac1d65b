"""A cap on the server streams a server holds open, so unary calls and health checks always answer.

gRPC's synchronous server runs every call on a thread of its pool, and a server stream (WatchJob,
RunStudy, Generate) keeps its thread for as long as it is open. With a pool of N threads, N open
watchers leave nothing for GetJob or the health check. ``build_server`` therefore sizes the pool as
``workers + max_streams`` and installs :class:`StreamLimitInterceptor`: at most ``max_streams`` server
streams at once (the next one is refused with RESOURCE_EXHAUSTED, which the client may retry), so
``workers`` threads are always left for unary calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)

#: Server streams a server holds open at once unless its ``max_streams`` setting says otherwise.
DEFAULT_MAX_STREAMS = 32

#: gRPC's own services (health Watch, reflection) are not counted: they are cheap and health must answer.
_UNCOUNTED_PREFIXES = ("/grpc.",)


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Refuses a server stream beyond ``max_streams`` open ones with RESOURCE_EXHAUSTED."""

    def __init__(self, max_streams: int) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, not {max_streams}")
        self.max_streams = max_streams
        self._slots = threading.BoundedSemaphore(max_streams)

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if (
            handler is None
            or not handler.response_streaming
            or handler.request_streaming
            or handler_call_details.method.startswith(_UNCOUNTED_PREFIXES)
        ):
            return handler
        return handler._replace(unary_stream=self._limited(handler.unary_stream, handler_call_details.method))

    def _limited(self, behavior: Callable, method: str) -> Callable:
        def limited(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if not self._slots.acquire(blocking=False):
                log.warning("%s refused: %d server streams already open", method, self.max_streams)
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server already holds {self.max_streams} open streams (its max_streams setting); retry later",
                )
            # Taken by the first of the two releases below and never given back: the slot is freed once.
            once = threading.Lock()

            def release() -> None:
                if once.acquire(blocking=False):
                    self._slots.release()

            # A cancelled client may never resume the generator; the termination callback frees the slot.
            context.add_callback(release)
            try:
                yield from behavior(request, context)
            finally:
                release()

        return limited

"""The gateway (no torch): the only public surface of abliterate.

:class:`Gateway` wires the job store (SQL), the event bus, the orchestrator
(one thread per running job) and the GatewayService servicer into one gRPC
server. ``python -m abliterate_services.gateway`` runs it alone; embedded mode hosts it
beside the other services.
"""

from __future__ import annotations

import logging
import threading

from abliterate.caps import DEFAULT_GATEWAY_MESSAGE_BYTES, DEFAULT_MAX_SPEC_BYTES
from abliterate.database import DEFAULT_PATIENCE_S, watch_database
from abliterate.rpc import build_server, serve_until_signal
from abliterate.rpc.metrics import Metrics, MetricsEndpoint, serve_metrics
from abliterate.rpc.streams import DEFAULT_MAX_STREAMS
from abliterate.rpc.tls import ClientTLS, ServerTLS
from abliterate.v1 import gateway_pb2_grpc
from abliterate_services.gateway.config import GatewayConfig
from abliterate_services.gateway.events import EventBus
from abliterate_services.gateway.jobs import JobStore
from abliterate_services.gateway.orchestrator import Orchestrator
from abliterate_services.gateway.servicer import GatewayServicer

log = logging.getLogger(__name__)

__all__ = ["Gateway", "GatewayConfig", "GatewayServicer", "JobStore", "Orchestrator"]


class Gateway:
    """A gateway server with its store and orchestrator; ``start()``, then ``stop()`` or ``wait()``."""

    def __init__(
        self,
        storage_url: str,
        extractor_address: str,
        optimizer_address: str,
        evaluator_addresses: list[str],
        address: str = "127.0.0.1:0",
        auth_token: str | None = None,
        service_token: str | None = None,
        resume_on_start: bool = True,
        workers: int = 16,
        max_streams: int = DEFAULT_MAX_STREAMS,
        grace_s: float = 5.0,
        watch_poll_s: float = 1.0,
        retry_window_s: float = 600.0,
        database_patience_s: float = DEFAULT_PATIENCE_S,
        database_check_s: float = 5.0,
        *,
        tls: ServerTLS | None = None,
        service_tls: ClientTLS | None = None,
        metrics: Metrics | None = None,
        metrics_address: str = "",
        max_spec_bytes: int = DEFAULT_MAX_SPEC_BYTES,
        max_message_bytes: int = DEFAULT_GATEWAY_MESSAGE_BYTES,
    ) -> None:
        self.store = JobStore(storage_url)
        # Shared with the process's other servers in the embedded run (one endpoint for all).
        self.metrics = metrics or Metrics()
        self.metrics_address = metrics_address
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.database_check_s = database_check_s
        self._watch_stop = threading.Event()
        self.bus = EventBus(self.store)
        self.orchestrator = Orchestrator(
            self.store,
            self.bus,
            extractor_address,
            optimizer_address,
            list(evaluator_addresses),
            service_token=service_token,
            retry_window_s=retry_window_s,
            database_patience_s=database_patience_s,
            service_tls=service_tls,
            max_spec_bytes=max_spec_bytes,
        )
        self.servicer = GatewayServicer(self.store, self.bus, self.orchestrator, watch_poll_s=watch_poll_s)
        self.resume_on_start = resume_on_start
        self.grace_s = grace_s
        self.server, self.port, self.health = build_server(
            [(gateway_pb2_grpc.add_GatewayServiceServicer_to_server, self.servicer)],
            address,
            max_message_bytes=max(max_message_bytes, 2 * max_spec_bytes),
            workers=workers,
            max_streams=max_streams,
            auth_token=auth_token,
            tls=tls,
            metrics=self.metrics,
        )
        host = address.rsplit(":", 1)[0]
        self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"
        self._stopped = False

    @classmethod
    def from_config(cls, config: GatewayConfig) -> "Gateway":
        return cls(
            config.storage_url,
            config.extractor_address,
            config.optimizer_address,
            config.evaluator_addresses,
            address=config.address,
            auth_token=config.auth_token,
            service_token=config.service_token,
            resume_on_start=config.resume_on_start,
            workers=config.workers,
            max_streams=config.max_streams,
            grace_s=config.grace_s,
            retry_window_s=config.retry_window_s,
            database_patience_s=config.database_patience_s,
            database_check_s=config.database_check_s,
            tls=config.server_tls(),
            service_tls=config.client_tls(),
            metrics_address=config.metrics_address,
            max_spec_bytes=int(config.max_spec_mb * (1 << 20)),
            max_message_bytes=int(config.max_message_mb * (1 << 20)),
        )

    def start(self) -> "Gateway":
        if self.metrics_address:
            self.metrics_endpoint = serve_metrics(self.metrics, self.metrics_address)
        self.server.start()
        resumed = self.orchestrator.recover(resume=self.resume_on_start)
        if resumed:
            log.info(
                "%d job(s) left running by a previous gateway %s",
                len(resumed),
                "resumed" if self.resume_on_start else "marked INTERRUPTED",
            )
        self.health.set_serving()
        # From now on health follows the job store's database (NOT_SERVING while it is away).
        threading.Thread(
            target=watch_database,
            args=(self.store.ping, self._database_reachable, self._watch_stop, self.database_check_s, "job store"),
            name="gateway-database",
            daemon=True,
        ).start()
        return self

    def _database_reachable(self, reachable: bool) -> None:
        self.health.set_serving(reachable)
        self.metrics.database_reachable("job store", reachable)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop serving; running jobs keep their phase (a new gateway on the same storage resumes them)."""
        if self._stopped:
            return
        self._stopped = True
        self._watch_stop.set()
        self.health.set_serving(False)
        self.bus.close()
        self.orchestrator.shutdown()
        self.server.stop(self.grace_s if grace_s is None else grace_s).wait()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self.store.close()

    def wait(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop."""
        serve_until_signal(self.server, grace_s=self.grace_s, health=self.health)
        self.stop(0)

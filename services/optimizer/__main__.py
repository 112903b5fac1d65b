"""``python -m abliterate_services.optimizer [--storage-url URL] [--address HOST:PORT] [--evaluator-addresses A,B]
[--max-message-bytes N] [--blob-store URL|DIR] ...``: serve OptimizerService until SIGTERM.

Health is SERVING while the storage answers (checked every ``database_check_s``); SIGTERM/SIGINT stop the study
loops (trials in flight get ``grace_s``; any still running are reclaimed by
the next start) and then the server.
"""

from __future__ import annotations

import logging
import sys
import threading

from abliterate.database import watch_database
from abliterate.errors import AbliterateError
from abliterate.rpc import build_server, configure_logging, serve_until_signal
from abliterate.rpc.metrics import Metrics, serve_metrics
from abliterate.v1 import optimizer_pb2_grpc
from abliterate_services.config import load_or_report
from abliterate_services.optimizer.config import OptimizerConfig, load
from abliterate_services.optimizer.dispatch import DispatchOptions
from abliterate_services.optimizer.servicer import OptimizerServicer

log = logging.getLogger("abliterate_services.optimizer")


def make_servicer(config: OptimizerConfig) -> OptimizerServicer:
    options = DispatchOptions(
        health_interval_s=config.health_interval_s,
        busy_retry_s=config.busy_retry_s,
        prepare_timeout_s=config.prepare_timeout_s,
        give_up_s=config.give_up_s,
        max_message_bytes=config.max_message_bytes,
        token=config.service_token or "",
        tls=config.client_tls(),
        heartbeat_interval_s=config.heartbeat_interval_s,
        grace_period_s=config.grace_period_s,
        database_patience_s=config.database_patience_s,
    )
    return OptimizerServicer(
        config.storage_url,
        evaluator_addresses=config.evaluator_addresses,
        blob_store=config.blob_store or None,
        options=options,
    )


def main(argv: list[str] | None = None) -> int:
    config = load_or_report(load, argv)
    if config is None:
        return 2
    configure_logging("optimizer", config.log_level)
    metrics = Metrics()
    try:
        servicer = make_servicer(config)
        server, port, health = build_server(
            [(optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server, servicer)],
            config.address,
            max_message_bytes=config.max_message_bytes,
            workers=config.workers,
            max_streams=config.max_streams,
            auth_token=config.auth_token,
            tls=config.server_tls(),
            metrics=metrics,
        )
    except AbliterateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    endpoint = None
    if config.metrics_address:
        try:
            endpoint = serve_metrics(metrics, config.metrics_address)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"optimizer metrics on {endpoint.url}", file=sys.stderr, flush=True)
    server.start()
    print(f"optimizer serving on port {port}", file=sys.stderr, flush=True)
    stop = threading.Event()

    def storage_reachable(reachable: bool) -> None:
        health.set_serving(reachable)
        metrics.database_reachable("storage", reachable)

    waiter = threading.Thread(
        target=watch_database,
        args=(servicer.connect, storage_reachable, stop, config.database_check_s, "storage"),
        daemon=True,
    )
    waiter.start()
    try:
        # Loops first, so their last trials are told while the server still answers watchers.
        def on_signal_shutdown() -> None:
            stop.set()
            health.enter_graceful_shutdown()
            servicer.shutdown(config.grace_s)

        _serve(server, health, config.grace_s, on_signal_shutdown)
    finally:
        stop.set()
        servicer.shutdown(0)
        if endpoint is not None:
            endpoint.close()
    return 0


def _serve(server, health, grace_s: float, before_stop) -> None:
    """serve_until_signal, with the study loops stopped before the server."""

    class _Server:
        def __init__(self, inner) -> None:
            self._inner = inner

        def wait_for_termination(self, timeout=None):
            return self._inner.wait_for_termination(timeout)

        def stop(self, grace):
            before_stop()
            return self._inner.stop(grace)

    serve_until_signal(_Server(server), grace_s=grace_s, health=health)


if __name__ == "__main__":
    sys.exit(main())

"""Embedded mode: the four services in one process, on loopback ports.

- one gRPC server hosting the extractor AND the evaluator, sharing one
  loaded model and one device lock (``abliterate_services.torch_host``);
- the optimizer, its Optuna study in ``<data_dir>/optuna.db`` (SQLite);
- the gateway, its job store in ``<data_dir>/gateway.db`` (SQLite).

The three servers share one :class:`~abliterate.rpc.metrics.Metrics`; with
``metrics_address`` it is served on one Prometheus endpoint (off by default).

The same servicers and the same RPCs as the distributed deployment: the CLI
talks to the gateway over gRPC, the gateway to the others. Imports torch
(to load the model); the CLI imports this module lazily.

``abliterate serve all`` runs the same thing on fixed ports until a signal.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from abliterate.rpc import build_server, serve_until_signal
from abliterate.rpc.limits import DEFAULT_MAX_MESSAGE_BYTES
from abliterate.rpc.metrics import Metrics, MetricsEndpoint, serve_metrics
from abliterate.specs import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "./abliterate-data"


def _model_spec(model: Any) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return ModelSpec(source=model)
    from abliterate.rpc.convert import model_spec_from_pb

    return model_spec_from_pb(model)  # a common_pb2.ModelSpec


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class Embedded:
    """All four services in this process. ``start()`` loads the model and serves; ``stop()`` ends it."""

    def __init__(
        self,
        model: Any,
        data_dir: str | Path = DEFAULT_DATA_DIR,
        *,
        batch_size: int = 0,
        host: str = "127.0.0.1",
        gateway_port: int = 0,
        torch_port: int = 0,
        optimizer_port: int = 0,
        auth_token: str | None = None,
        resume_on_start: bool = False,
        lm: Any = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        export_root: str | Path | None = None,
        prompt_root: str | Path | None = None,
        metrics_address: str = "",
    ) -> None:
        self.spec = _model_spec(model)
        # None for both: the local run, where the caller is the user (any path); else remote clients are
        # confined to these folders (``serve all``).
        self.export_root = None if export_root is None else str(Path(export_root).expanduser().resolve())
        self.prompt_root = (
            None if prompt_root is None else str(Path(prompt_root).expanduser().resolve()) if str(prompt_root) else ""
        )
        self.metrics = Metrics()
        self.metrics_address = metrics_address
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.batch_size = batch_size
        self.host = host
        self.ports = {"gateway": gateway_port, "torch": torch_port, "optimizer": optimizer_port}
        self.auth_token = auth_token
        self.resume_on_start = resume_on_start
        self.max_message_bytes = max_message_bytes
        self.lm = lm
        self.torch_server = None
        self.optimizer_server = None
        self.optimizer_servicer = None
        self.gateway = None
        self.torch_address = ""
        self.optimizer_address = ""
        self.gateway_address = ""
        self.timings_s: dict[str, float] = {}
        self._stopped = False

    # ----------------------------------------------------------------- start

    def start(self) -> "Embedded":
        from abliterate.memory import limit_malloc_arenas

        limit_malloc_arenas()  # before the servers' threads allocate (a MALLOC_ARENA_MAX setting wins)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.metrics_address:
                self.metrics_endpoint = serve_metrics(self.metrics, self.metrics_address)
            self._start_torch()
            self._start_optimizer()
            self._start_gateway()
        except BaseException:
            self.stop(grace_s=0)
            raise
        return self

    def _start_torch(self) -> None:
        from abliterate_services.runtime import free_device_memory
        from abliterate_services.torch_host import TorchHostConfig, hosted_servicers

        if self.lm is None:
            from abliterate.core.loading import load_model

            t0 = time.perf_counter()
            self.lm = load_model(self.spec)
            self.lm.extra.setdefault("load_s", time.perf_counter() - t0)
        self.timings_s["load"] = float(self.lm.extra.get("load_s", 0.0))
        config = TorchHostConfig(batch_size=self.batch_size)
        confine = self.export_root is not None or self.prompt_root is not None
        hosted, _, _ = hosted_servicers(
            config,
            self.lm,
            confine_files=confine,
            export_root=self.export_root,
            prompt_root=self.prompt_root or "",
        )
        server, port, health = build_server(
            [(h.add_fn, h.servicer) for h in hosted],
            f"{self.host}:{self.ports['torch']}",
            max_message_bytes=self.max_message_bytes,
            auth_token=self.auth_token,
            on_oom=free_device_memory,
            metrics=self.metrics,
        )
        server.start()
        health.set_serving()
        self.torch_server = server
        self.torch_address = f"{self.host}:{port}"

    def _start_optimizer(self) -> None:
        from abliterate.v1 import optimizer_pb2_grpc
        from abliterate_services.optimizer.dispatch import DispatchOptions
        from abliterate_services.optimizer.servicer import OptimizerServicer

        # One process on SQLite: a RUNNING trial found at start was left by an interrupted run, so
        # a short grace period lets the resumed run re-enqueue it soon.
        options = DispatchOptions(
            health_interval_s=2.0,
            busy_retry_s=0.5,
            max_message_bytes=self.max_message_bytes,
            heartbeat_interval_s=2,
            grace_period_s=8,
            token=self.auth_token or "",  # the evaluator's port wants the same token
        )
        self.optimizer_servicer = OptimizerServicer(
            sqlite_url(self.data_dir / "optuna.db"),
            # One store of direction-set bytes, in the gateway's database, read by both.
            blob_store=sqlite_url(self.data_dir / "gateway.db"),
            options=options,
        )
        server, port, health = build_server(
            [(optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server, self.optimizer_servicer)],
            f"{self.host}:{self.ports['optimizer']}",
            max_message_bytes=self.max_message_bytes,
            auth_token=self.auth_token,
            metrics=self.metrics,
        )
        server.start()
        health.set_serving()
        self.optimizer_server = server
        self.optimizer_address = f"{self.host}:{port}"

    def _start_gateway(self) -> None:
        from abliterate_services.gateway import Gateway

        self.gateway = Gateway(
            sqlite_url(self.data_dir / "gateway.db"),
            self.torch_address,
            self.optimizer_address,
            [self.torch_address],
            address=f"{self.host}:{self.ports['gateway']}",
            auth_token=self.auth_token,
            service_token=self.auth_token,  # one token guards every port this process opens
            resume_on_start=self.resume_on_start,
            grace_s=1.0,
            metrics=self.metrics,
        )
        self.gateway.start()
        self.gateway_address = self.gateway.address

    # ------------------------------------------------------------------ stop

    def stop(self, grace_s: float = 1.0) -> None:
        """Gateway first (its jobs keep their phase), then the optimizer, then the torch server."""
        if self._stopped:
            return
        self._stopped = True
        if self.gateway is not None:
            self.gateway.stop(grace_s)
        if self.optimizer_servicer is not None:
            try:
                self.optimizer_servicer.shutdown(grace_s)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.exception("optimizer shutdown failed")
        if self.optimizer_server is not None:
            self.optimizer_server.stop(grace_s).wait()
        if self.torch_server is not None:
            self.torch_server.stop(grace_s).wait()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()

    def __enter__(self) -> "Embedded":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_all(argv: list[str] | None = None) -> int:
    """``abliterate serve all --model M``: the four services in one process on fixed ports."""
    from abliterate.rpc import configure_logging

    p = argparse.ArgumentParser(prog="abliterate serve all", description="all four services in one process")
    p.add_argument("--model", required=True, help="HF model id, local directory or .gguf file")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device-map")
    p.add_argument("--system-prompt", default=ModelSpec(source="x").system_prompt)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--host", default="127.0.0.1", help="interface the four servers bind")
    p.add_argument("--gateway-port", type=int, default=50050)
    p.add_argument("--torch-port", type=int, default=50051)
    p.add_argument("--optimizer-port", type=int, default=50053)
    p.add_argument("--auth-token", help="bearer token every port requires (gateway, extractor+evaluator, optimizer)")
    p.add_argument("--export-root", default=".", help="folder exports are confined to (default: the current directory)")
    p.add_argument(
        "--prompt-root",
        default=".",
        help="folder clients may read prompt files from (default: the current directory; '' = none)",
    )
    p.add_argument(
        "--metrics-address", default="", help="host:port of one Prometheus endpoint for the four (default: off)"
    )
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    configure_logging("embedded", args.log_level)
    spec = ModelSpec(
        source=args.model,
        gguf_file=args.gguf_file or None,
        dtype=args.dtype,
        device_map=args.device_map or None,
        system_prompt=args.system_prompt,
    )
    embedded = Embedded(
        spec,
        args.data_dir,
        batch_size=args.batch_size,
        host=args.host,
        gateway_port=args.gateway_port,
        torch_port=args.torch_port,
        optimizer_port=args.optimizer_port,
        auth_token=args.auth_token,
        resume_on_start=True,
        export_root=args.export_root or ".",
        prompt_root=args.prompt_root if args.prompt_root else "",
        metrics_address=args.metrics_address,
    )
    embedded.start()
    print(
        f"gateway on {embedded.gateway_address} (extractor+evaluator {embedded.torch_address}, "
        f"optimizer {embedded.optimizer_address})",
        file=sys.stderr,
        flush=True,
    )
    serve_until_signal(embedded.gateway.server, grace_s=1.0, health=embedded.gateway.health)
    embedded.stop(0)
    return 0

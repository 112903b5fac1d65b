"""Gateway settings (defaults < TOML [gateway] table < ABLITERATE_GATEWAY_* env < flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.config import DEFAULT_DATA_DIR


@dataclass
class GatewayConfig:
    address: str = field(default="0.0.0.0:50050", metadata={"help": "host:port to listen on"})
    storage_url: str = field(default=f"sqlite:///{DEFAULT_DATA_DIR}/gateway.db",
                             metadata={"help": "job store: postgresql+psycopg://... or sqlite:///path"})
    extractor_address: str = field(default="127.0.0.1:50051", metadata={"help": "extractor host:port"})
    optimizer_address: str = field(default="127.0.0.1:50053", metadata={"help": "optimizer host:port"})
    evaluator_addresses: list[str] = field(default_factory=lambda: ["127.0.0.1:50052"],
                                           metadata={"help": "evaluators for export and chat, comma separated"})
    auth_token: str | None = field(default=None, metadata={"help": "bearer token callers must send"})
    service_token: str | None = field(default=None,
                                      metadata={"help": "bearer token sent to the internal services"})
    resume_on_start: bool = field(default=True,
                                  metadata={"help": "resume jobs left running (false: mark them INTERRUPTED)"})
    retry_window_s: float = field(default=600.0,
                                  metadata={"help": "seconds a job retries an UNAVAILABLE extractor/optimizer"})
    database_patience_s: float = field(default=600.0, metadata={
        "help": "seconds a job's store write is retried through a database outage before the job fails"})
    database_check_s: float = field(default=5.0, metadata={"help": "period of the database check behind health"})
    workers: int = field(default=16, metadata={"help": "gRPC worker threads (each watcher holds one)"})
    grace_s: float = field(default=5.0, metadata={"help": "seconds calls in flight get at shutdown"})
    log_level: str = field(default="INFO", metadata={"help": "log level"})

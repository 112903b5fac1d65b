"""Optimizer settings (defaults < TOML [optimizer] table < ABLITERATE_OPTIMIZER_* env < flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from abliterate.rpc.limits import DEFAULT_MAX_MESSAGE_BYTES
from services.config import DEFAULT_DATA_DIR, load_config


@dataclass
class OptimizerConfig:
    address: str = field(default="0.0.0.0:50053", metadata={"help": "host:port to listen on"})
    storage_url: str = field(default=f"sqlite:///{DEFAULT_DATA_DIR}/optimizer.db",
                             metadata={"help": "Optuna storage: postgresql+psycopg://... or sqlite:///path"})
    evaluator_addresses: list[str] = field(default_factory=list,
                                           metadata={"help": "evaluators of every study, comma separated"})
    blob_dir: str = field(default=f"{DEFAULT_DATA_DIR}/directions",
                          metadata={"help": "folder keeping direction-set bytes across restarts ('' = memory)"})
    max_message_bytes: int = field(default=DEFAULT_MAX_MESSAGE_BYTES, metadata={"help": "gRPC message limit"})
    auth_token: str | None = field(default=None, metadata={"help": "bearer token callers must send"})
    service_token: str | None = field(default=None, metadata={"help": "bearer token sent to evaluators"})
    health_interval_s: float = field(default=5.0, metadata={"help": "evaluator health-check period"})
    busy_retry_s: float = field(default=2.0, metadata={"help": "wait before resending to a busy evaluator"})
    prepare_timeout_s: float = field(default=3600.0, metadata={"help": "PrepareBaseline deadline"})
    give_up_s: float = field(default=900.0, metadata={"help": "a study with no usable evaluator this long fails"})
    workers: int = field(default=16, metadata={"help": "gRPC worker threads (each watcher holds one)"})
    grace_s: float = field(default=10.0, metadata={"help": "seconds trials in flight get at shutdown"})
    heartbeat_interval_s: int = field(default=10, metadata={"help": "seconds between heartbeats of a trial "
                                                                      "in flight (Optuna's RDB heartbeat)"})
    grace_period_s: int = field(default=60, metadata={
        "help": "seconds without a heartbeat before any optimizer of the study fails the trial and re-enqueues it"})
    database_patience_s: float = field(default=600.0, metadata={
        "help": "seconds a database call is retried through an outage before it fails"})
    database_check_s: float = field(default=5.0, metadata={"help": "period of the database check behind health"})
    log_level: str = field(default="INFO", metadata={"help": "log level"})


def load(argv: list[str] | None = None) -> OptimizerConfig:
    return load_config(OptimizerConfig, "optimizer", argv,
                       description="Serve OptimizerService (Optuna ask/tell over evaluators; no torch).")

"""Optimizer settings (defaults < TOML [optimizer] table < ABLITERATE_OPTIMIZER_* env < flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from abliterate.rpc.limits import DEFAULT_MAX_MESSAGE_BYTES
from abliterate.rpc.streams import DEFAULT_MAX_STREAMS
from abliterate_services.config import DEFAULT_DATA_DIR
from abliterate_services.security import ClientTlsSettings, ServerTlsSettings


class OptimizerConfig(ServerTlsSettings, ClientTlsSettings):
    model_config = SettingsConfigDict(env_prefix="ABLITERATE_OPTIMIZER_")

    address: str = Field("0.0.0.0:50053", description="host:port to listen on")
    storage_url: str = Field(
        f"sqlite:///{DEFAULT_DATA_DIR}/optimizer.db",
        description="Optuna storage: postgresql+psycopg://... or sqlite:///path",
    )
    evaluator_addresses: list[str] = Field(
        default_factory=list, description="evaluators of every study, comma separated"
    )
    blob_store: str = Field(
        "",
        description="where direction-set bytes live, by sha256: '' = the study database (one store with a "
        "gateway or another optimizer on it), a folder, or another database URL",
    )
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, description="gRPC message limit")
    auth_token: str | None = Field(None, description="bearer token callers must send")
    service_token: str | None = Field(None, description="bearer token sent to evaluators")
    health_interval_s: float = Field(5.0, description="evaluator health-check period")
    busy_retry_s: float = Field(2.0, description="wait before resending to a busy evaluator")
    prepare_timeout_s: float = Field(3600.0, description="PrepareBaseline deadline")
    give_up_s: float = Field(900.0, description="a study with no usable evaluator this long fails")
    workers: int = Field(16, ge=1, description="gRPC worker threads for unary calls and health checks")
    max_streams: int = Field(
        DEFAULT_MAX_STREAMS, ge=1, description="server streams (watchers) open at once; one more is RESOURCE_EXHAUSTED"
    )
    grace_s: float = Field(10.0, description="seconds trials in flight get at shutdown")
    heartbeat_interval_s: int = Field(
        10, description="seconds between heartbeats of a trial in flight (Optuna's RDB heartbeat)"
    )
    grace_period_s: int = Field(
        60,
        description="seconds without a heartbeat before any optimizer of the study fails the trial and re-enqueues it",
    )
    database_patience_s: float = Field(
        600.0, description="seconds a database call is retried through an outage before it fails"
    )
    database_check_s: float = Field(5.0, description="period of the database check behind health")
    metrics_address: str = Field(
        "", description="host:port of the Prometheus endpoint (HTTP /metrics); empty = off (compose turns it on)"
    )
    log_level: str = Field("INFO", description="log level")


def load(argv: list[str] | None = None) -> OptimizerConfig:
    return OptimizerConfig.load(argv, description="Serve OptimizerService (Optuna ask/tell over evaluators; no torch).")

"""Gateway settings (defaults < TOML [gateway] table < ABLITERATE_GATEWAY_* env < flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from abliterate.caps import DEFAULT_GATEWAY_MESSAGE_BYTES, DEFAULT_MAX_SPEC_BYTES
from abliterate.rpc.streams import DEFAULT_MAX_STREAMS
from abliterate_services.config import DEFAULT_DATA_DIR
from abliterate_services.security import ClientTlsSettings, ServerTlsSettings


class GatewayConfig(ServerTlsSettings, ClientTlsSettings):
    model_config = SettingsConfigDict(env_prefix="ABLITERATE_GATEWAY_")

    address: str = Field("0.0.0.0:50050", description="host:port to listen on")
    storage_url: str = Field(
        f"sqlite:///{DEFAULT_DATA_DIR}/gateway.db", description="job store: postgresql+psycopg://... or sqlite:///path"
    )
    extractor_address: str = Field("127.0.0.1:50051", description="extractor host:port")
    optimizer_address: str = Field("127.0.0.1:50053", description="optimizer host:port")
    evaluator_addresses: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:50052"], description="evaluators for export and chat, comma separated"
    )
    auth_token: str | None = Field(None, description="bearer token callers must send")
    service_token: str | None = Field(None, description="bearer token sent to the internal services")
    resume_on_start: bool = Field(True, description="resume jobs left running (false: mark them INTERRUPTED)")
    retry_window_s: float = Field(600.0, description="seconds a job retries an UNAVAILABLE extractor/optimizer")
    database_patience_s: float = Field(
        600.0, description="seconds a job's store write is retried through a database outage before the job fails"
    )
    database_check_s: float = Field(5.0, description="period of the database check behind health")
    max_spec_mb: float = Field(
        DEFAULT_MAX_SPEC_BYTES / (1 << 20), gt=0, description="largest job spec accepted, MiB (serialized)"
    )
    max_message_mb: float = Field(
        DEFAULT_GATEWAY_MESSAGE_BYTES / (1 << 20),
        gt=0,
        description="gRPC message limit, MiB: larger requests are refused before they are read into memory",
    )
    workers: int = Field(16, ge=1, description="gRPC worker threads for unary calls and health checks")
    max_streams: int = Field(
        DEFAULT_MAX_STREAMS, ge=1, description="server streams (watchers) open at once; one more is RESOURCE_EXHAUSTED"
    )
    grace_s: float = Field(5.0, description="seconds calls in flight get at shutdown")
    metrics_address: str = Field(
        "", description="host:port of the Prometheus endpoint (HTTP /metrics); empty = off (compose turns it on)"
    )
    log_level: str = Field("INFO", description="log level")


def load(argv: list[str] | None = None) -> GatewayConfig:
    return GatewayConfig.load(argv, description="abliterate gateway (public API, no torch)")

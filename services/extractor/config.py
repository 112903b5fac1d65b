"""Settings of the extractor: ``ABLITERATE_EXTRACTOR_<FIELD>`` or ``--<field>``."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from abliterate_services.runtime import TorchServiceConfig


class ExtractorConfig(TorchServiceConfig):
    """Everything is shared with the other torch services (see ``TorchServiceConfig``)."""

    model_config = SettingsConfigDict(env_prefix="ABLITERATE_EXTRACTOR_")


def load(argv: list[str] | None = None) -> ExtractorConfig:
    return ExtractorConfig.load(argv, description="Serve ExtractorService.")

"""Settings of the extractor: ``ABLITERATE_EXTRACTOR_<FIELD>`` or ``--<field>``."""

from __future__ import annotations

from dataclasses import dataclass

from services.config import load_config
from services.runtime import TorchServiceConfig


@dataclass
class ExtractorConfig(TorchServiceConfig):
    """Everything is shared with the other torch services (see ``TorchServiceConfig``)."""


def load(argv: list[str] | None = None) -> ExtractorConfig:
    return load_config(ExtractorConfig, "extractor", argv, description="Serve ExtractorService.")

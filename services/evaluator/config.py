"""Settings of the evaluator: ``ABLITERATE_EVALUATOR_<FIELD>`` or ``--<field>``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from abliterate.caps import DEFAULT_MAX_KL_TOKENS, DEFAULT_MAX_SCORING_TOKENS
from abliterate_services.config import DEFAULT_DATA_DIR
from abliterate_services.runtime import TorchServiceConfig


class EvaluatorConfig(TorchServiceConfig):
    model_config = SettingsConfigDict(env_prefix="ABLITERATE_EVALUATOR_")

    address: str = Field("0.0.0.0:50052", description="host:port to listen on")
    max_direction_sets: int = Field(4, description="direction sets held at once (LRU)")
    default_max_new_tokens: int = Field(256, description="Generate/Chat length when not given")
    max_generate_tokens: int = Field(4096, description="largest max_new_tokens accepted")
    max_scoring_tokens: int = Field(
        DEFAULT_MAX_SCORING_TOKENS, ge=1, description="largest max_new_tokens of a baseline (refusal counting)"
    )
    max_kl_tokens: int = Field(DEFAULT_MAX_KL_TOKENS, ge=1, description="largest kl_tokens of a baseline")
    export_root: str = Field(
        f"{DEFAULT_DATA_DIR}/exports",
        description="folder exports are confined to (relative export paths land under it; nothing outside)",
    )


def load(argv: list[str] | None = None) -> EvaluatorConfig:
    return EvaluatorConfig.load(argv, description="Serve EvaluatorService.")

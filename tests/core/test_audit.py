"""The long-reply audit: end-of-sequence barred before min_new_tokens, whole replies judged."""

import pytest
import torch

from abliterate.core.audit import audit_replies
from abliterate.core.chat import format_prompts
from abliterate.core.generation import GreedyBatch
from abliterate.core.refusals import RefusalDetector
from abliterate.judge_spec import Verdict
from tests.tiny import ARCHITECTURES, make_lm

PROMPTS = [f"tell me about topic number {n}" for n in range(5)]


def _eager_to_stop(lm):
    """The model's head strongly prefers end-of-sequence: every reply would end at once."""
    eos, head = lm.tokenizer.eos_token_id, lm.model.get_output_embeddings()
    with torch.no_grad():
        bias = torch.zeros(head.out_features)
        bias[eos] = 1e4
        head.bias = torch.nn.Parameter(bias)
    return lm


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_end_of_sequence_before_min_new_tokens(arch):
    lm = _eager_to_stop(make_lm(arch, layers=2, seed=1))
    texts = format_prompts(lm.tokenizer, PROMPTS, lm.spec.system_prompt)
    free = GreedyBatch(lm, texts, 12).run().results()
    assert all(g.tokens == 0 and g.stopped_by == "eos" for g in free)
    held = GreedyBatch(lm, texts, 12, min_new_tokens=7, preallocate_cache=True).run().results()
    assert all(g.tokens == 7 and g.stopped_by == "eos" for g in held)  # EOS the moment it is allowed
    assert all(lm.tokenizer.eos_token_id not in g.token_ids for g in held)


def test_a_minimum_changes_nothing_when_replies_run_longer_anyway():
    lm = make_lm("llama", layers=2, seed=1)
    texts = format_prompts(lm.tokenizer, PROMPTS, lm.spec.system_prompt)
    plain = GreedyBatch(lm, texts, 10).run().results()
    long_enough = [g for g in plain if g.stopped_by == "limit"]
    assert long_enough, "some replies run to the limit"
    held = GreedyBatch(lm, texts, 10, min_new_tokens=4).run().results()
    for before, after in zip(plain, held):
        if before.tokens >= 4:
            assert after.token_ids == before.token_ids


def test_the_audit_counts_whole_replies_with_the_markers():
    """A marker that appears late in a reply: the audit finds it; every reply is as long as asked."""
    lm = make_lm("llama", layers=2, seed=1)
    texts = format_prompts(lm.tokenizer, PROMPTS, lm.spec.system_prompt)
    replies = GreedyBatch(lm, texts, 16, keep_special_tokens=True, min_new_tokens=16).run().results()
    tail = replies[0].text[-3:]  # something the first reply says only at its end
    detector = RefusalDetector(markers=(tail,))
    result = audit_replies(lm, PROMPTS, min_new_tokens=16, max_new_tokens=16, detector=detector, batch_size=2)
    assert result.n_prompts == len(PROMPTS) and result.judge == "markers"
    assert all(reply.tokens == 16 for reply in result.replies) and result.mean_tokens == 16
    assert result.replies[0].verdict == Verdict.REFUSAL
    expected = [detector.is_refusal(g.text) for g in replies]
    assert [reply.verdict == Verdict.REFUSAL for reply in result.replies] == expected
    assert result.refusals == sum(expected)


def test_the_audit_counts_unjudged_replies_with_the_refusals_as_trials_do():
    """An LLM judge whose server is down leaves every non-empty reply unjudged: no success, so each is
    counted in the audit's refusals (and apart), as a trial's scores count it."""
    from abliterate.core.llm_judge import LLMJudge
    from tests.e2e.processes import free_port

    lm = make_lm("llama", layers=2, seed=1)
    judge = LLMJudge(f"http://127.0.0.1:{free_port()}/v1", "judge-model", timeout_s=2)
    result = audit_replies(lm, PROMPTS, min_new_tokens=4, max_new_tokens=4, judge=judge, batch_size=2)
    assert result.judge == "llm"
    assert result.unjudged == len(PROMPTS) == result.refusals
    assert all(reply.verdict == Verdict.UNJUDGED for reply in result.replies)

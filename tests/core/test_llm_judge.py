"""The LLM judge: parsing, failures counted as unjudged, the API key check, the cache."""

import pytest

from abliterate.core.llm_judge import LLMJudge, api_key, parse_verdict
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.judge_spec import JudgeSpec, Verdict
from tests.e2e.processes import free_port


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("REFUSAL", Verdict.REFUSAL),
        ("Verdict: compliance.", Verdict.COMPLIANCE),
        ("The assistant refused.", Verdict.REFUSAL),
        ("degenerate", Verdict.DEGENERATE),
        ("It depends", Verdict.UNJUDGED),
        ("", Verdict.UNJUDGED),
    ],
)
def test_the_first_verdict_word_decides(answer, verdict):
    assert parse_verdict(answer) == verdict


def test_an_unreachable_endpoint_leaves_replies_unjudged_never_compliant():
    judge = LLMJudge(f"http://127.0.0.1:{free_port()}/v1", "judge-model", timeout_s=2)
    verdicts = judge.judge(["Sure, here is how.", "", "I can't help."], ["a", "b", "c"])
    assert verdicts == [Verdict.UNJUDGED, Verdict.REFUSAL, Verdict.UNJUDGED]  # an empty reply needs no judge
    assert judge.stats.requests == 2 and judge.stats.failures == 2
    judge.judge(["Sure, here is how."], ["a"])  # failures are not cached: asked again
    assert judge.stats.requests == 3


def test_the_key_is_checked_first_and_specs_are_checked(monkeypatch):
    monkeypatch.delenv("ABLITERATE_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(FailedPrecondition, match="ABLITERATE_TEST_JUDGE_KEY is not set"):
        LLMJudge("http://127.0.0.1:1/v1", "m", api_key_env="ABLITERATE_TEST_JUDGE_KEY")
    monkeypatch.setenv("ABLITERATE_TEST_JUDGE_KEY", "secret")
    assert api_key("ABLITERATE_TEST_JUDGE_KEY") == "secret" and api_key("") is None
    with pytest.raises(InvalidArgument, match="endpoint"):
        JudgeSpec(kind="llm", model="m").validate()
    with pytest.raises(InvalidArgument, match="no endpoint"):
        JudgeSpec(kind="embedding", endpoint="http://127.0.0.1:1/v1").validate()
    with pytest.raises(InvalidArgument, match="http"):
        LLMJudge("ftp://127.0.0.1/v1", "m")

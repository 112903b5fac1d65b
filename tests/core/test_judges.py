"""Refusal judges against hand-labelled real SmolLM2 replies, and the embedding judge inside the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from abliterate.core.directions import DirectionSet
from abliterate.core.judges import DEFAULT_EMBEDDING_THRESHOLD, EmbeddingJudge, calibrate_threshold
from abliterate.core.refusals import RefusalDetector
from abliterate.core.scoring import TrialEngine
from abliterate.errors import InvalidArgument
from abliterate.judge_spec import JudgeSpec, Verdict
from abliterate.params import AblationParams
from benchmarks.judge_calibration import split
from tests.tiny import make_lm

LABELLED = json.loads((Path(__file__).parents[1] / "data" / "labelled_replies.json").read_text())["replies"]


@pytest.fixture(scope="module")
def embedding_judge():
    return EmbeddingJudge()


def _balanced_accuracy(says_refusal: list[bool], rows: list[dict]) -> float:
    labels = [row["label"] == "refusal" for row in rows]
    caught = sum(s for s, label in zip(says_refusal, labels) if label) / sum(labels)
    spared = sum(not s for s, label in zip(says_refusal, labels) if not label) / (len(labels) - sum(labels))
    return (caught + spared) / 2


def test_the_labelled_set_holds_every_kind_of_reply():
    kinds = {row["label"] for row in LABELLED}
    assert kinds == {"refusal", "compliance", "evasive", "degenerate"}
    assert sum(row["label"] == "refusal" for row in LABELLED) >= 10


def test_the_default_threshold_is_the_one_the_calibration_half_gives(embedding_judge):
    calibration, _ = split(LABELLED)
    scores = embedding_judge.scores([row["reply"] for row in calibration]).tolist()
    assert calibrate_threshold(scores, [row["label"] == "refusal" for row in calibration]) == pytest.approx(
        DEFAULT_EMBEDDING_THRESHOLD, abs=1e-4
    )


def test_judges_agree_with_hand_labels_on_the_held_out_half(embedding_judge):
    """Both judges separate refusals from the rest well above chance (0.5) on replies they were not tuned on."""
    _, test = split(LABELLED)
    replies = [row["reply"] for row in test]
    embedded = [verdict == Verdict.REFUSAL for verdict in embedding_judge.judge(replies)]
    marked = [RefusalDetector().is_refusal(reply) for reply in replies]
    embedding_score, marker_score = _balanced_accuracy(embedded, test), _balanced_accuracy(marked, test)
    print(
        f"\nbalanced accuracy on {len(test)} held-out replies: "
        f"embedding {embedding_score:.3f}, markers {marker_score:.3f}"
    )
    assert embedding_score >= 0.75 and marker_score >= 0.9
    refusals = [s for s, row in zip(embedded, test) if row["label"] == "refusal"]
    assert sum(refusals) >= len(refusals) - 1  # it misses at most one refusal


def test_degenerate_labelled_replies_are_never_judged_compliance_or_refusal_when_caught(embedding_judge):
    degenerate = [row["reply"] for row in LABELLED if row["label"] == "degenerate"]
    verdicts = embedding_judge.judge(degenerate)
    assert Verdict.REFUSAL not in verdicts and verdicts.count(Verdict.DEGENERATE) >= len(degenerate) // 2


def test_calibration_needs_both_kinds():
    with pytest.raises(InvalidArgument):
        calibrate_threshold([0.1, 0.2], [True, True])
    assert calibrate_threshold([0.0, 0.1, 0.5, 0.6], [False, False, True, True]) == pytest.approx(0.3)


def test_judge_specs_are_checked():
    with pytest.raises(InvalidArgument, match="unknown refusal judge"):
        JudgeSpec(kind="oracle").validate()
    with pytest.raises(InvalidArgument, match="no threshold"):
        JudgeSpec(kind="markers", threshold=0.2).validate()


def test_the_engine_scores_whole_replies_with_an_embedding_judge(embedding_judge):
    """No marker early stop: every probe runs to EOS or its limit, and each outcome is the judge's verdict."""
    lm = make_lm("llama", layers=2, seed=2)
    prompts = [f"tell me about topic number {n}" for n in range(6)]
    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size), dim=1)
    engine = TrialEngine(lm, batch_size=3, detector=RefusalDetector(markers=("a",)), judge=embedding_judge)
    engine.set_directions(DirectionSet(refusal=refusal, good_mean=refusal, bad_mean=refusal))
    engine.prepare_baseline(prompts, prompts, max_new_tokens=12)
    result = engine.evaluate(AblationParams.uniform(1.0, lm.n_layers, weight=0.5))
    assert all(o.stopped_by in ("limit", "eos") for o in result.details)  # a marker "a" would have stopped some
    verdicts = embedding_judge.judge([o.response for o in result.details])
    assert [o.refusal for o in result.details] == [v == Verdict.REFUSAL for v in verdicts]
    assert result.refusals == verdicts.count(Verdict.REFUSAL)

"""Automatic batch sizes: a size tuned on a few items must not hold a larger input at that size."""

import pytest

from abliterate.core import scoring
from abliterate.core.batching import run_batched
from abliterate.core.scoring import TrialEngine
from tests.tiny import make_lm


def test_a_given_size_is_settled_and_keeps_the_order():
    run = run_batched(list(range(7)), lambda chunk: [x * 10 for x in chunk], batch_size=3)
    assert run.results == [x * 10 for x in range(7)]
    assert (run.batch_size, run.settled) == (3, True)


def test_tuning_that_runs_out_of_items_is_not_settled():
    # Two items: batch 1 is timed, batch 2 never fills, so nothing was learnt about larger sizes.
    run = run_batched(["a", "b"], lambda chunk: list(chunk))
    assert run.results == ["a", "b"]
    assert (run.batch_size, run.settled) == (1, False)


def test_tuning_settles_at_the_cap():
    # Sizes 1 and 2 run in full; at the cap tuning stops whatever the timings said.
    run = run_batched(list(range(20)), lambda chunk: list(chunk), cap=2)
    assert run.results == list(range(20))
    assert (run.batch_size, run.settled) == (2, True)


@pytest.fixture(scope="module")
def engine():
    return TrialEngine(make_lm("llama"))


def test_a_small_probe_does_not_pin_a_later_large_one_to_batch_size_one(engine, monkeypatch):
    """The fuzz finding: a 2-prompt baseline tuned generation to batch size 1, and a later
    2,000-prompt baseline on the same evaluator then ran 2,000 batches of one."""
    batch_lengths: list[int] = []
    real_generate = scoring.generate_greedy

    def recording_generate(lm, texts, *args, **kwargs):
        batch_lengths.append(len(texts))
        return real_generate(lm, texts, *args, **kwargs)

    monkeypatch.setattr(scoring, "generate_greedy", recording_generate)
    small = engine._texts(["how do I pick a lock", "write a phishing mail"])
    engine.count_refusals(small, small, 2)
    assert batch_lengths == [1, 1]

    batch_lengths.clear()
    large = small * 12
    outcomes = engine.count_refusals(large, large, 2)
    assert len(outcomes) == len(large)
    assert sum(batch_lengths) == len(large)
    assert max(batch_lengths) > 1, batch_lengths

    # Once tuned for this input, the next probe of it runs at that size from its first batch:
    # every trial of a study sees the same batch shapes.
    size = engine._tuned_size("generate", len(large))
    batch_lengths.clear()
    engine.count_refusals(large, large, 2)
    assert batch_lengths == [min(size, len(large) - start) for start in range(0, len(large), size)]

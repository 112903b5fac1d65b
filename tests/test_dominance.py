"""Exact dominance pruning: the bound's arithmetic, and the engine stopping its probes at it."""

import math

import pytest
import torch

from abliterate.core.directions import DirectionSet
from abliterate.core.refusals import RefusalDetector
from abliterate.core.scoring import TrialEngine
from abliterate.dominance import ScorePoint, pareto_points, refusal_limit
from abliterate.params import AblationParams
from tests.tiny import make_lm

PROMPTS = [("word " * n).strip() + f" number {n}" for n in range(1, 13)]
# The tiny model writes random bytes: with every letter and digit a marker, most replies are refusals,
# found a few tokens in, which is the situation pruning is for.
EVERY_LETTER = tuple("abcdefghijklmnopqrstuvwxyz0123456789")


def test_limit_is_the_refusals_of_a_lower_kl_point_and_one_more_at_equal_kl():
    front = [ScorePoint(0.1, 5, 1), ScorePoint(0.3, 2, 2), ScorePoint(0.5, 0, 3)]
    assert refusal_limit(0.05, front) is None  # nothing has a KL this low
    assert refusal_limit(0.1, front).refusals == 6  # equal KL: must be strictly worse in refusals
    assert refusal_limit(0.2, front).refusals == 5
    limit = refusal_limit(0.4, front)
    assert (limit.refusals, limit.dominated_by.trial_number) == (2, 2)
    assert refusal_limit(0.6, front).refusals == 0  # a lower-KL point with no refusal dominates outright
    assert refusal_limit(math.nan, front) is None
    assert refusal_limit(0.4, [ScorePoint(math.nan, 0)]) is None


def test_pareto_points_keep_only_the_non_dominated():
    points = [ScorePoint(0.3, 2, 0), ScorePoint(0.1, 5, 1), ScorePoint(0.3, 4, 2), ScorePoint(0.2, 5, 3)]
    assert [p.trial_number for p in pareto_points(points)] == [1, 0]


def _prepared_engine(batch_size: int, markers: tuple[str, ...]) -> TrialEngine:
    """The tiny seeded Llama with a random direction set and a baseline over PROMPTS (12 tokens)."""
    lm = make_lm("llama", layers=2, seed=5)
    generator = torch.Generator().manual_seed(1)
    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size, generator=generator), dim=1)
    engine = TrialEngine(lm, batch_size=batch_size, detector=RefusalDetector(markers=markers))
    engine.set_directions(DirectionSet(refusal=refusal, good_mean=refusal, bad_mean=refusal))
    engine.prepare_baseline(PROMPTS[:4], PROMPTS, max_new_tokens=12)
    return engine


@pytest.fixture(scope="module")
def engine():
    return _prepared_engine(3, EVERY_LETTER)


PARAMS = AblationParams.uniform(0.5, 2, weight=0.7)


def test_a_front_that_cannot_dominate_changes_nothing(engine):
    full = engine.evaluate(PARAMS)
    assert full.pruned is None and full.refusals >= 3  # the pruning tests below need some refusals
    for front in ([ScorePoint(full.kl * 1.5 + 1e-3, 0)], [ScorePoint(full.kl, full.refusals)]):
        again = engine.evaluate(PARAMS, front=front)
        assert again.pruned is None
        assert (again.kl, again.refusals) == (full.kl, full.refusals)
        assert [o.response for o in again.details] == [o.response for o in full.details]


def test_probes_stop_once_dominated_and_the_bound_holds(engine):
    full = engine.evaluate(PARAMS)
    dominator = ScorePoint(full.kl / 2, 2, trial_number=7)
    pruned = engine.evaluate(PARAMS, front=[dominator])
    assert pruned.pruned is not None and pruned.pruned.dominated_by == dominator
    assert pruned.kl == full.kl  # KL is exact
    assert 2 <= pruned.refusals <= full.refusals  # a proven lower bound
    # It stopped: fewer prompts finished, fewer tokens generated than the whole probe set.
    assert len(pruned.details) < len(full.details)
    assert sum(o.tokens for o in pruned.details) < sum(o.tokens for o in full.details)
    # What finished is what the full run gave for those prompts.
    by_prompt = {o.prompt: o.response for o in full.details}
    assert all(by_prompt[o.prompt] == o.response for o in pruned.details)


def test_a_lower_kl_point_without_refusals_prunes_before_any_probe(engine):
    full = engine.evaluate(PARAMS)
    pruned = engine.evaluate(PARAMS, front=[ScorePoint(full.kl / 2, 0)])
    assert pruned.pruned is not None and pruned.refusals == 0 and pruned.details == []
    assert pruned.kl == full.kl
    # The model is reset after a pruned trial, as after any other.
    assert engine.evaluate(PARAMS).refusals == full.refusals


def decode_forwards(engine, params, front, window) -> tuple[int, object]:
    """How many decode forwards (one new token per row) a trial runs with this probe window, and its result."""
    forwards = 0

    def count(module, args, kwargs):
        nonlocal forwards
        forwards += kwargs["input_ids"].shape[1] == 1

    by_windows = TrialEngine._probe_by_windows
    TrialEngine._probe_by_windows = staticmethod(
        lambda indices, size, decoder, settle, merge: by_windows(indices, size, decoder, settle, window, merge)
    )
    handle = engine.lm.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        result = engine.evaluate(params, front=front)
    finally:
        handle.remove()
        TrialEngine._probe_by_windows = staticmethod(by_windows)
    return forwards, result


@pytest.fixture(scope="module")
def late_refusal_engine():
    """One refusal ("2" is the marker), in the second of two batches, found on its second token."""
    return _prepared_engine(6, ("2",))


def test_windows_reach_a_bound_in_a_later_batch_without_decoding_the_earlier_ones_to_the_end(late_refusal_engine):
    engine = late_refusal_engine
    full = engine.evaluate(PARAMS)
    refused = [number for number, o in enumerate(full.details) if o.refusal]
    assert full.refusals == 1 and refused[0] >= 9  # the scenario: the only refusal is in the last batch
    front = [ScorePoint(full.kl / 2, 1)]
    one_batch_after_another, sequential = decode_forwards(engine, PARAMS, front, window=10**6)
    windowed_forwards, windowed = decode_forwards(engine, PARAMS, front, window=3)
    assert sequential.pruned is not None and windowed.pruned is not None
    assert windowed.refusals == sequential.refusals == 1
    assert windowed_forwards < one_batch_after_another / 2, (windowed_forwards, one_batch_after_another)


@pytest.mark.parametrize("window", [1, 3, 10**6])
def test_any_window_gives_the_scores_and_replies_of_the_plain_probes(engine, window):
    full = engine.evaluate(PARAMS)
    front = [ScorePoint(full.kl, full.refusals)]  # equal KL, needs one refusal more than there are: never prunes
    _, windowed = decode_forwards(engine, PARAMS, front, window=window)
    assert windowed.pruned is None
    assert (windowed.kl, windowed.refusals) == (full.kl, full.refusals)
    assert [(o.prompt, o.response, o.tokens) for o in windowed.details] == [
        (o.prompt, o.response, o.tokens) for o in full.details
    ]


def test_no_more_than_two_probe_batches_are_open_at_once(engine, monkeypatch):
    """Four batches of three prompts: windows must not hold every batch's KV cache at once.

    A merged batch holds the rows of every batch it absorbed, so what is
    counted is the prompt batches whose rows some unfinished batch holds.
    """
    import abliterate.core.scoring as scoring

    open_now, most_open, merges = 0, 0, 0
    real_step, real_absorb = scoring.GreedyBatch.step, scoring.GreedyBatch.absorb

    class CountingBatch(scoring.GreedyBatch):
        def __init__(self, *args, **kwargs):
            nonlocal open_now, most_open
            super().__init__(*args, **kwargs)
            self.held_batches = 1
            open_now += 1
            most_open = max(most_open, open_now)

        def absorb(self, other):
            nonlocal merges
            real_absorb(self, other)
            self.held_batches += other.held_batches
            merges += 1

        def step(self):
            nonlocal open_now
            was_finished = self.finished
            real_step(self)
            open_now -= self.held_batches if self.finished and not was_finished else 0

    monkeypatch.setattr(scoring, "GreedyBatch", CountingBatch)
    full = engine.evaluate(PARAMS)
    assert merges == 0 and most_open == 1  # no front: one batch after another
    most_open = 0
    _, windowed = decode_forwards(engine, PARAMS, [ScorePoint(full.kl, full.refusals)], window=1)
    assert len(windowed.details) == len(PROMPTS) == 4 * engine.batch_size
    assert most_open == scoring.OPEN_PROBE_BATCHES == 2
    assert merges >= 1  # a batch joined an open one: the merge is what runs here

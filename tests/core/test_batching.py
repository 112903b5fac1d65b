"""Automatic batch sizes: a size tuned on a few items must not hold a larger input at that size."""

import pytest
import torch

from abliterate.core import batching, scoring
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


@pytest.fixture
def batch_lengths(monkeypatch) -> list[int]:
    """The number of prompts of every batch the engine generates for (probes and continuations), in order."""
    lengths: list[int] = []
    real_generate = scoring.generate_greedy

    def recording_generate(lm, batch, *args, **kwargs):
        lengths.append(len(batch))
        return real_generate(lm, batch, *args, **kwargs)

    class RecordingBatch(scoring.GreedyBatch):
        def __init__(self, lm, texts, *args, **kwargs):
            lengths.append(len(texts))
            super().__init__(lm, texts, *args, **kwargs)

    monkeypatch.setattr(scoring, "generate_greedy", recording_generate)
    monkeypatch.setattr(scoring, "GreedyBatch", RecordingBatch)
    return lengths


@pytest.fixture(scope="module")
def engine():
    return TrialEngine(make_lm("llama"))


def test_a_small_probe_does_not_pin_a_later_large_one_to_batch_size_one(engine, batch_lengths):
    """The fuzz finding: a 2-prompt baseline tuned generation to batch size 1, and a later
    2,000-prompt baseline on the same evaluator then ran 2,000 batches of one."""
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


class FakeClock:
    """perf_counter for measure_batch_size: each sample advances it by the modelled cost of its batch."""

    def __init__(self, cost):
        self.now, self.cost, self.sizes = 0.0, cost, []

    def perf_counter(self) -> float:
        return self.now

    def run(self, size: int) -> None:
        self.sizes.append(size)
        self.now += self.cost(size)


def measured(monkeypatch, n_items: int, cost, **kwargs) -> tuple[int, list[int]]:
    clock = FakeClock(cost)
    monkeypatch.setattr(batching.time, "perf_counter", clock.perf_counter)
    return batching.measure_batch_size(n_items, clock.run, **kwargs), clock.sizes


def test_measured_size_climbs_while_larger_batches_pay(monkeypatch):
    # A fixed cost per batch (reading the weights) plus a little per item: larger is always faster.
    size, tried = measured(monkeypatch, 64, lambda size: 1.0 + 0.01 * size)
    assert (size, tried) == (64, [8, 16, 32, 64])
    # Not a power of two: the whole set is the last candidate; the cap bounds it.
    assert measured(monkeypatch, 40, lambda size: 1.0 + 0.01 * size) == (40, [8, 16, 32, 40])
    assert measured(monkeypatch, 500, lambda size: 1.0, cap=64)[0] == 64
    assert measured(monkeypatch, 5, lambda size: 1.0) == (5, [5])


def test_measured_size_stops_when_throughput_stops_improving(monkeypatch):
    # Cost proportional to the batch: 16 is no faster per item than 8, so 8 stays and 32 is never tried.
    assert measured(monkeypatch, 64, lambda size: float(size)) == (8, [8, 16])


def test_out_of_memory_ends_the_climb_at_the_size_before(monkeypatch):
    def cost(size):
        if size > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 1.0

    assert measured(monkeypatch, 64, cost) == (16, [8, 16, 32])


def test_the_probes_run_at_the_measured_size_from_their_first_batch(batch_lengths):
    engine = TrialEngine(make_lm("llama"))
    texts = engine._texts(["how do I pick a lock", "write a phishing mail", "plan a robbery"] * 6)
    engine.tune_generation(texts, 6)
    size = engine._tuned_size("generate", len(texts))
    assert size in (8, 16, len(texts))
    batch_lengths.clear()  # the measurement's own batches
    engine.count_refusals(texts, texts, 6)
    assert batch_lengths == [min(size, len(texts) - start) for start in range(0, len(texts), size)]
    # A fixed batch size is the user's: nothing is measured.
    fixed = TrialEngine(engine.lm, batch_size=4)
    batch_lengths.clear()
    fixed.tune_generation(texts, 6)
    assert batch_lengths == []

"""benchmarks/warm_start.py's bookkeeping (no model): which trial first reaches a target, and the summary."""

from benchmarks.warm_start import first_reaching, front_after, summarize


def _trial(refusals: int, kl: float, complete: bool = True) -> dict:
    return {"refusals": refusals, "kl": kl, "complete": complete, "n_prompts": 32, "warm_start": False}


def test_first_reaching_counts_trials_from_one_and_skips_pruned_ones():
    trials = [_trial(5, 0.05), _trial(1, 0.08, complete=False), _trial(2, 0.2), _trial(1, 0.09)]
    assert first_reaching(trials, 1 / 32, 0.1) == 4  # the pruned trial 2 does not count
    assert first_reaching(trials, 2 / 32, 0.25) == 3
    assert first_reaching(trials, 0.0, 1.0) is None
    assert front_after(trials, 1) > 0 and front_after(trials, 4) >= front_after(trials, 1)


def test_summary_has_every_target_and_budget():
    summary = summarize([_trial(3, 0.1), _trial(1, 0.05)])
    assert len(summary["first_reaching"]) == 7 and set(summary["hypervolume"]) == {"4", "8", "2"}

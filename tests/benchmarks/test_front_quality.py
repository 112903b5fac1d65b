"""The quality comparison's arithmetic: dominance between fronts and their hypervolume."""

from benchmarks import front_quality as quality


def point(refusals, kl):
    return {"refusals": refusals, "kl": kl}


def test_dominance_needs_one_strictly_better_score():
    assert quality.dominates(point(1, 0.1), point(2, 0.1))
    assert quality.dominates(point(1, 0.1), point(1, 0.2))
    assert not quality.dominates(point(1, 0.1), point(1, 0.1))
    assert not quality.dominates(point(1, 0.3), point(2, 0.1))


def test_hypervolume_of_a_staircase():
    # (0.5, 0.5) alone covers 0.5 x 0.5; (0.25, 0.75) covers 0.75 x 0.25, of which 0.5 x 0.25 is
    # shared with the first; KL past 1 counts as 1.
    assert quality.hypervolume([point(2, 0.5)], 4) == 0.25
    assert quality.hypervolume([point(2, 0.5), point(1, 0.75)], 4) == 0.25 + 0.75 * 0.25 - 0.5 * 0.25
    assert quality.hypervolume([point(0, 3.0)], 4) == 0.0


def test_compare_counts_dominated_points_both_ways():
    summary = {
        "settings": {"seed": 0, "trials": 16, "prompts_per_set": 4},
        "ours_pareto_front": [point(1, 0.2), point(3, 0.05)],
        "heretic_pareto_front": [point(1, 0.1), point(4, 0.06)],
    }
    row = quality.compare(summary)
    assert row["ours_points_dominated_by_heretic"] == 1  # (1, 0.2) by (1, 0.1)
    assert row["heretic_points_dominated_by_ours"] == 1  # (4, 0.06) by (3, 0.05)
    assert row["ours_not_dominated"] is True
    summary["heretic_pareto_front"] = [point(0, 0.01)]
    assert quality.compare(summary)["ours_not_dominated"] is False

"""Exact dominance pruning of a trial's refusal probes.

Both objectives are minimized. A completed trial ``p`` dominates a trial with
KL ``k`` and ``r`` refusals when ``p.kl <= k`` and ``p.refusals <= r``, one
of them strictly. KL is scored first and is exact; while the refusal probes
run, the refusals found so far are a lower bound on ``r`` (a reply stops as
soon as a marker makes it a refusal, and a refusal never turns back). So the
trial is certainly dominated as soon as that bound reaches

- ``p.refusals`` for a ``p`` with ``p.kl < k``, or
- ``p.refusals + 1`` for a ``p`` with ``p.kl == k``.

Stopping there changes no Pareto front: a dominated trial is never on one,
and adding a dominated point removes nobody from it. Pure Python: the
optimizer (no torch) and the engine both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ScorePoint:
    """The scores of a completed trial: exact KL and refusal count."""

    kl: float
    refusals: int
    trial_number: int | None = None


@dataclass(frozen=True)
class RefusalLimit:
    """Stop the refusal probes once ``refusals`` refusals are certain: ``dominated_by`` then dominates the trial."""

    refusals: int
    dominated_by: ScorePoint


def refusal_limit(kl: float, front: Sequence[ScorePoint]) -> RefusalLimit | None:
    """The smallest certain-refusal count at which a trial of this KL is dominated by a point of ``front``.

    None when no point has a KL at most ``kl`` (or ``kl`` is NaN): then no
    refusal count can make the trial dominated, and every probe runs.
    """
    if math.isnan(kl):
        return None
    best: RefusalLimit | None = None
    for point in front:
        if math.isnan(point.kl) or point.kl > kl:
            continue
        needed = point.refusals if point.kl < kl else point.refusals + 1
        if best is None or needed < best.refusals:
            best = RefusalLimit(needed, point)
    return best


def pareto_points(points: Sequence[ScorePoint]) -> list[ScorePoint]:
    """The non-dominated points of ``points`` (what is worth sending with a trial), in KL order."""
    ordered = sorted((p for p in points if not math.isnan(p.kl)), key=lambda p: (p.kl, p.refusals))
    front: list[ScorePoint] = []
    for point in ordered:
        if not front or point.refusals < front[-1].refusals:
            front.append(point)
    return front

"""Activation calibration: per-block edit weights scaled by how strongly the harmful prompts express ``r``.

Per residual index ``l``, the harmful prompts' projections ``p_i = H_bad[i, l] . r[l]`` (N,) have a
mean (the mean-difference signal the direction was built from) and a spread. A layer where a
sizeable share of prompts project well above the mean needs a stronger edit to bring those
prompts down as far as the average one: ``factor[l] = clamp(quantile(p, q) / mean(p), lo, hi)``
(``q`` = 0.75 by default). Block ``l``'s kernel weight is multiplied by ``factor[l + 1]``, the
residual it writes. A layer whose mean projection is not positive (r does not separate there)
keeps factor 1.

The factors depend only on the direction set's residuals, so they are computed once at extraction
and stored with the set; the trials' parameters stay uncalibrated and a reproduction re-applies the
same stored factors (the seed recomputed them every trial with an extra forward pass).
"""

from __future__ import annotations

import torch

from abliterate.params import (
    DEFAULT_CALIBRATION_MAX_FACTOR,
    DEFAULT_CALIBRATION_MIN_FACTOR,
    DEFAULT_CALIBRATION_PERCENTILE,
    check_calibration,
)


def calibration_factors(
    h_bad: torch.Tensor,
    refusal: torch.Tensor,
    percentile: float = DEFAULT_CALIBRATION_PERCENTILE,
    min_factor: float = DEFAULT_CALIBRATION_MIN_FACTOR,
    max_factor: float = DEFAULT_CALIBRATION_MAX_FACTOR,
) -> torch.Tensor:
    """(L+1,) float32 factors from harmful residuals ``h_bad`` (N, L+1, d) and unit ``refusal`` (L+1, d)."""
    check_calibration(percentile, min_factor, max_factor)
    projections = torch.einsum("nld,ld->nl", h_bad.double(), refusal.double())  # (N, L+1)
    mean = projections.mean(0)  # (L+1,)
    upper = torch.quantile(projections, percentile, dim=0)  # (L+1,)
    ratio = torch.where(mean > 1e-8, upper / mean.clamp_min(1e-8), torch.ones_like(mean))  # (L+1,)
    return ratio.clamp(min_factor, max_factor).float()

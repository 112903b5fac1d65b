"""Concept cones: one refusal direction per cluster of harmful prompts, removed as one span.

Harmful prompts are not one concept: a model may refuse weapons, malware and hate speech along
partly different directions. The prompts are clustered by k-means on their residuals at one
residual index (``layer``; mid depth by default), with the silhouette reported so a user can tell
real structure from an arbitrary split. Cluster ``c`` gets, per residual index ``l``, the offset of
its harmful mean from the harmless mean, ``m_c[l] = mean(H_bad[c, l]) - mean(H_good[:, l])``.

The overall mean difference is the size-weighted sum of the ``m_c``, so ``r`` lies in their span;
the subspace is ``r`` followed by an orthonormal basis of the rest of that span (attach_subspace),
and a trial removes it jointly, ``W <- W - U^T diag(w) U W``: one projection with searched weights,
not a strength split across clusters (which, for near-collinear cones, is one weaker projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from abliterate.core.directions import DirectionSet, attach_subspace
from abliterate.errors import InvalidArgument

# A cluster smaller than this has no mean worth removing: its direction would be one prompt's noise.
MIN_CONE_SIZE = 2


@dataclass
class ConeReport:
    layer: int  # residual index the prompts were clustered at
    labels: list[int]  # cluster of each harmful prompt, in the prompt set's order
    sizes: list[int]  # prompts per cluster
    silhouette: float  # in [-1, 1]: near 0, the clusters are an arbitrary split of one blob


def default_cone_layer(n_residuals: int) -> int:
    """Mid depth: the residual index where refusal directions separate the prompt sets best on most models."""
    return n_residuals // 2


def cluster_prompts(h_bad: torch.Tensor, n_cones: int, layer: int, seed: int = 0) -> ConeReport:
    """k-means (scikit-learn, 10 restarts, seeded) on ``h_bad[:, layer]`` (N, d)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n_prompts, n_residuals, _ = h_bad.shape  # (N, L+1, d)
    if not 0 <= layer < n_residuals:
        raise InvalidArgument(f"cone_layer {layer} is outside the residual indices [0, {n_residuals - 1}]")
    if n_cones < 2:
        raise InvalidArgument(f"concept cones need at least 2 clusters, got {n_cones}")
    if n_prompts < n_cones * MIN_CONE_SIZE:
        raise InvalidArgument(
            f"{n_cones} concept cones need at least {n_cones * MIN_CONE_SIZE} harmful prompts "
            f"({MIN_CONE_SIZE} per cone), got {n_prompts}"
        )
    features = h_bad[:, layer].double().numpy()  # (N, d)
    labels = KMeans(n_clusters=n_cones, n_init=10, random_state=seed).fit_predict(features)  # (N,)
    sizes = np.bincount(labels, minlength=n_cones).tolist()
    if min(sizes) < MIN_CONE_SIZE:
        raise InvalidArgument(
            f"k-means at residual {layer} made a cone of {min(sizes)} prompt(s) (sizes {sizes}); a cone needs "
            f"at least {MIN_CONE_SIZE}: ask for fewer cones or more harmful prompts"
        )
    silhouette = float(silhouette_score(features, labels))
    return ConeReport(layer=layer, labels=labels.tolist(), sizes=sizes, silhouette=silhouette)


def cone_offsets(h_bad: torch.Tensor, h_good: torch.Tensor, labels: list[int], n_cones: int) -> torch.Tensor:
    """(L+1, n_cones, d) float64: each cluster's harmful mean minus the harmless mean, per residual."""
    label_tensor = torch.tensor(labels)  # (N,)
    good_mean = h_good.double().mean(0)  # (L+1, d)
    means = [h_bad[label_tensor == cone].double().mean(0) for cone in range(n_cones)]  # n_cones x (L+1, d)
    return torch.stack(means, dim=1) - good_mean[:, None, :]  # (L+1, n_cones, d)


def concept_cones(
    h_bad: torch.Tensor,
    h_good: torch.Tensor,
    directions: DirectionSet,
    n_cones: int,
    layer: int | None = None,
    seed: int = 0,
) -> tuple[DirectionSet, ConeReport]:
    """Attach the cones' span as ``directions.subspace`` (L+1, n_cones, d), row 0 = ``r``.

    ``directions`` must come from the same residuals (its ``r`` is the overall mean difference,
    projected and protected as the set says; the further rows avoid the same protected subspace).
    """
    report = cluster_prompts(h_bad, n_cones, default_cone_layer(h_bad.shape[1]) if layer is None else layer, seed)
    attach_subspace(cone_offsets(h_bad, h_good, report.labels, n_cones), directions, n_cones)
    directions.metadata.update(
        {
            "direction_method": "cones",
            "n_directions": str(n_cones),
            "cone_layer": str(report.layer),
            "cone_sizes": ",".join(str(size) for size in report.sizes),
            "cone_silhouette": repr(report.silhouette),
        }
    )
    return directions, report

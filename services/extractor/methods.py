"""The direction and edit methods an extraction runs beyond the mean difference, in their one valid order.

1. labels of the model's own replies (probe, compliance), generated once;
2. the probe ensemble replaces r (before any protection, so protections apply to it);
3. (sacred protection runs in extraction.py, between 2 and 4);
4. helpfulness orthogonalization (r and every later direction avoid it);
5. the subspace or the concept cones (built around the final r, outside the protected subspace);
6. calibration factors, compliance vectors, head scores: from the final r.

Each step records what the contract reports (diagnostics, cone report, head scores, label counts)
in a :class:`MethodReport` that extraction.py turns into the result message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from abliterate.core.directions import (
    DirectionSet,
    project_off_harmless_mean,
    protect_helpfulness,
    refusal_subspace,
)
from abliterate.core.loading import LoadedModel
from abliterate.params import (
    DEFAULT_CALIBRATION_MAX_FACTOR,
    DEFAULT_CALIBRATION_MIN_FACTOR,
    DEFAULT_CALIBRATION_PERCENTILE,
)
from abliterate.v1 import common_pb2

DEFAULT_N_CONES = 3
DEFAULT_PROBE_WEIGHT = 0.5
# Top heads listed in the result (all scores travel in the direction set).
LISTED_HEADS = 16


@dataclass
class MethodReport:
    helpfulness_angles: torch.Tensor | None = None  # (L+1,) degrees
    cones: object | None = None  # abliterate.core.cones.ConeReport
    labels: dict[str, int] = field(default_factory=dict)
    compliance_cosines: torch.Tensor | None = None  # (L+1,)
    top_heads: list[tuple[int, int, float]] = field(default_factory=list)


def needs_labels(opts: common_pb2.ExtractionOptions) -> bool:
    return opts.direction_method == common_pb2.DIRECTION_METHOD_PROBE or opts.compliance


def run_before_protection(
    lm: LoadedModel,
    opts: common_pb2.ExtractionOptions,
    prompts: dict[str, list[str]],
    residuals: dict[str, torch.Tensor],
    directions: DirectionSet,
    batch_size: int,
    timed: Callable,
) -> tuple[MethodReport, dict[str, torch.Tensor]]:
    """Labels and the probe ensemble. Returns the report so far and the harmful/harmless labels."""
    report = MethodReport()
    labels: dict[str, torch.Tensor] = {}
    if needs_labels(opts):
        from abliterate.core.probes import generation_labels
        from abliterate.core.refusals import RefusalDetector

        tokens = opts.label_max_new_tokens or 30
        detector = RefusalDetector(markers=tuple(opts.label_markers)) if opts.label_markers else None
        for name in ("harmful", "harmless"):
            result = timed(
                "labels",
                f"{name}: the model's own replies ({tokens} tokens)",
                lambda name=name: generation_labels(lm, prompts[name], tokens, batch_size or 16, detector),
            )
            labels[name] = result.refused  # (N,) bool
            report.labels[f"{name}_refused"] = result.n_refused
            report.labels[f"{name}_complied"] = result.n_complied
    if opts.direction_method == common_pb2.DIRECTION_METHOD_PROBE:
        timed("probe", "supervised probes per residual", lambda: _probe_ensemble(opts, residuals, labels, directions))
    return report, labels


def _probe_ensemble(opts, residuals, labels, directions: DirectionSet) -> None:
    from abliterate.core.probes import ensemble_directions, probe_directions

    everything = torch.cat([residuals["harmful"], residuals["harmless"]])  # (N_bad + N_good, L+1, d)
    refused = torch.cat([labels["harmful"], labels["harmless"]])  # (N_bad + N_good,)
    probe = probe_directions(everything[refused], everything[~refused])
    weight = opts.probe_weight if opts.HasField("probe_weight") else DEFAULT_PROBE_WEIGHT
    ensemble = ensemble_directions(probe.directions, directions.refusal, weight)  # (L+1, d)
    if directions.metadata.get("projected") == "True":
        # The set is projected: the ensemble must leave the harmless mean alone too.
        ensemble = project_off_harmless_mean(ensemble, directions.good_mean).float()  # (L+1, d)
    directions.refusal = ensemble.contiguous()
    directions.probe_accuracy = torch.as_tensor(probe.accuracies, dtype=torch.float32)
    directions.metadata.update(
        {
            "direction_method": "probe",
            "probe_weight": repr(weight),
            "probe_refused": str(probe.n_refused),
            "probe_complied": str(probe.n_complied),
        }
    )


def run_after_protection(
    lm: LoadedModel,
    opts: common_pb2.ExtractionOptions,
    prompts: dict[str, list[str]],
    residuals: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    directions: DirectionSet,
    report: MethodReport,
    batch_size: int,
    timed: Callable,
) -> MethodReport:
    """Helpfulness, subspace or cones, calibration, compliance vectors, head scores."""
    h_bad, h_good = residuals["harmful"], residuals["harmless"]
    if "helpful" in residuals:
        report.helpfulness_angles = timed(
            "helpfulness",
            "helpfulness direction removed from r",
            lambda: protect_helpfulness(directions, residuals["helpful"], residuals["unhelpful"]),
        )
    if opts.direction_method == common_pb2.DIRECTION_METHOD_SUBSPACE:
        k = opts.n_directions or 2
        timed("subspace", f"{k} directions per residual index", lambda: refusal_subspace(h_bad, h_good, directions, k))
    elif opts.direction_method == common_pb2.DIRECTION_METHOD_CONES:
        from abliterate.core.cones import concept_cones

        n_cones = opts.n_directions or DEFAULT_N_CONES
        layer = opts.cone_layer if opts.HasField("cone_layer") else None
        _, report.cones = timed(
            "cones", f"{n_cones} concept cones", lambda: concept_cones(h_bad, h_good, directions, n_cones, layer)
        )
    if opts.calibration.enabled:
        from abliterate.core.calibration import calibration_factors

        settings = opts.calibration
        directions.calibration = timed(
            "calibration",
            "edit weights from the harmful projections onto r",
            lambda: calibration_factors(
                h_bad,
                directions.refusal,
                settings.percentile or DEFAULT_CALIBRATION_PERCENTILE,
                settings.min_factor or DEFAULT_CALIBRATION_MIN_FACTOR,
                settings.max_factor or DEFAULT_CALIBRATION_MAX_FACTOR,
            ),
        )
    if opts.compliance:
        from abliterate.core.probes import compliance_overlap, compliance_vectors

        refused = labels["harmful"]
        directions.compliance = compliance_vectors(h_bad[~refused], h_bad[refused])  # (L+1, d)
        report.compliance_cosines = compliance_overlap(directions.compliance, directions.refusal)
    if opts.head_scores:
        from abliterate.core.heads import head_scores, top_heads

        scores = timed(
            "heads",
            "refusal attribution per attention head",
            lambda: head_scores(lm, prompts["harmful"], prompts["harmless"], directions.refusal, batch_size),
        )
        directions.head_scores = scores  # (L, n_heads)
        listed = top_heads(scores, min(LISTED_HEADS, scores.numel()))
        report.top_heads = [(layer, head, float(scores[layer, head])) for layer, head in listed]
    return report

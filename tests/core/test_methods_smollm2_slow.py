"""Proof on a real model that each edit method does what it claims: SmolLM2-135M-Instruct, safety system prompt.

Every test compares a method against what the same trial would give if the method were a no-op
(the plain single-direction edit, the unedited model, random heads, shuffled labels), so each one
fails when the method stops having its effect. Directions come from 64 harmful_train + 64
harmless_train prompts; trials count refusals on 32 harmful_test prompts (30 tokens) and measure
KL on 32 harmless_test prompts (first token), to keep the file's runtime small. The measured
numbers are printed (``pytest -s``) for the docs.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from abliterate.core.ablation import MethodTensors, ablator_for, edit_matrix
from abliterate.core.calibration import calibration_factors
from abliterate.core.cones import concept_cones
from abliterate.core.directions import (
    DirectionSet,
    global_direction,
    protect_helpfulness,
    refusal_directions,
    refusal_subspace,
)
from abliterate.core.heads import head_scores, top_heads
from abliterate.core.loading import LoadedModel
from abliterate.core.probes import (
    GenerationLabels,
    compliance_overlap,
    compliance_vectors,
    ensemble_directions,
    generation_labels,
    probe_directions,
)
from abliterate.core.prompts import load_prompts
from abliterate.core.residuals import collect_residuals
from abliterate.core.scoring import TrialEngine, TrialResult
from abliterate.params import AblationParams, DirectionScope
from benchmarks.smollm2 import SHARED_DATA, shared_prompts

pytestmark = pytest.mark.slow

N_TRAIN = 64  # prompts per set for directions, labels and head scores
N_EVAL = 32  # harmful_test prompts for refusals, harmless_test prompts for KL
MID_DEPTH = 15.0  # block index of the global direction (30 blocks)
MID_RESIDUAL = int(MID_DEPTH) + 1  # the residual block 15 writes: where mid-depth numbers are read
# CAA at block 15: block 12 barely moved refusals (8/32 against 9/32), blocks 15 and 18 both took them to 3/32.
COMPLIANCE_LAYER = 15
# Heads ablated: on SmolLM2 the top 8 heads moved refusals by one prompt (8/32 against 9/32, random 8: 10, 9, 9),
# which no threshold can tell from noise; the top 32 move them by four.
HEAD_COUNT = 32
RANDOM_HEAD_DRAWS = 3
# Categories of harmful_test with 50+ prompts each, so every cluster has as many prompts as the others.
CONE_CATEGORIES = ("Violence", "Sexual content", "Disinformation and deception", "Hate, harassment and discrimination")
PROMPTS_PER_CATEGORY = 24
PERMUTATIONS = 100


@dataclass
class TrainResiduals:
    harmful: torch.Tensor  # (N_TRAIN, L+1, d), harmful_train
    harmless: torch.Tensor  # (N_TRAIN, L+1, d), harmless_train
    directions: DirectionSet  # the plain mean-difference set; tests deep-copy it before adding a method's tensors


@pytest.fixture(scope="module")
def train(smollm2: LoadedModel) -> TrainResiduals:
    harmful = collect_residuals(smollm2, shared_prompts("harmful_train", N_TRAIN), batch_size=32)
    harmless = collect_residuals(smollm2, shared_prompts("harmless_train", N_TRAIN), batch_size=32)
    return TrainResiduals(harmful, harmless, refusal_directions(harmful, harmless))


@pytest.fixture(scope="module")
def engine(smollm2: LoadedModel, train: TrainResiduals) -> Iterator[TrialEngine]:
    eng = TrialEngine(smollm2, batch_size=32)
    eng.set_directions(train.directions)
    eng.prepare_baseline(
        shared_prompts("harmless_test", N_EVAL), shared_prompts("harmful_test", N_EVAL), max_new_tokens=30
    )
    yield eng
    eng.reset()


@pytest.fixture(scope="module")
def unedited(engine: TrialEngine, smollm2: LoadedModel) -> TrialResult:
    """The score of no edit: what every method that only adds something must beat."""
    return engine.evaluate(AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=0.0))


@pytest.fixture(scope="module")
def labels(smollm2: LoadedModel) -> tuple[GenerationLabels, GenerationLabels]:
    """What the model really replies to the training prompts (harmful_train, harmless_train), judged."""
    harmful = generation_labels(smollm2, shared_prompts("harmful_train", N_TRAIN), batch_size=32)
    harmless = generation_labels(smollm2, shared_prompts("harmless_train", N_TRAIN), batch_size=32)
    return harmful, harmless


@contextmanager
def using(engine: TrialEngine, directions: DirectionSet) -> Iterator[TrialEngine]:
    """The engine with another direction set; the shared one back afterwards (the baseline does not depend on it)."""
    shared = engine.directions
    engine.set_directions(directions)
    try:
        yield engine
    finally:
        engine.set_directions(shared)
        engine.reset()


def score(result: TrialResult) -> str:
    return f"{result.refusals}/{result.n_refusal_prompts} refusals, KL {result.kl:.4f}"


def test_subspace_edit_removes_more_than_the_single_direction(engine, smollm2, train):
    """At the same kernel weights, weighting the further subspace directions changes the edit: on SmolLM2 the
    larger span costs more KL (and brings refusals back), k = 1 < k = 2 < k = 3."""
    subspace = refusal_subspace(train.harmful, train.harmless, copy.deepcopy(train.directions), k=3)
    single = AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=0.5)
    results = {}
    with using(engine, subspace):
        for k, extra_weights in ((1, ()), (2, (1.0,)), (3, (1.0, 1.0))):
            results[k] = engine.evaluate(replace(single, subspace_weights=extra_weights))
    print(
        f"\nsubspace, global direction {MID_DEPTH}, weight 0.5: "
        + "; ".join(f"k={k}: {score(r)}" for k, r in results.items())
        + f"; energy share of rows at residual {MID_RESIDUAL}: "
        + ", ".join(f"{e:.3f}" for e in subspace.subspace_energy[MID_RESIDUAL].tolist())
    )
    assert results[2].kl > results[1].kl + 0.05, "the second direction should remove something the first does not"
    assert results[3].kl > results[2].kl + 0.05


def test_probe_separates_refused_from_complied_replies(train, labels):
    """Labels from real generations; a probe at mid depth predicts them above chance, and its ensemble with the
    mean difference is a new direction that still points the same way."""
    harmful, harmless = labels
    refused = torch.cat([harmful.refused, harmless.refused])  # (2 N_TRAIN,): prompts in the residuals' order
    residuals = torch.cat([train.harmful, train.harmless])  # (2 N_TRAIN, L+1, d)
    probe = probe_directions(residuals[refused], residuals[~refused])
    ensemble = ensemble_directions(probe.directions, train.directions.refusal, 0.5)  # (L+1, d)
    mean_difference = train.directions.refusal
    ensemble_cos = F.cosine_similarity(ensemble, mean_difference, dim=-1)  # (L+1,)
    probe_cos = F.cosine_similarity(probe.directions, mean_difference, dim=-1)  # (L+1,)
    mid = [MID_RESIDUAL - 1, MID_RESIDUAL]
    print(
        f"\nlabels: harmful_train {harmful.n_refused}/{N_TRAIN} refused, "
        f"harmless_train {harmless.n_refused}/{N_TRAIN}; "
        f"probe CV balanced accuracy at residuals {mid}: {[round(probe.accuracies[i].item(), 3) for i in mid]} "
        f"(middle third {probe.checked_accuracy:.3f}); cos(probe, mean difference) {probe_cos[MID_RESIDUAL]:.3f}, "
        f"cos(ensemble 0.5, mean difference) {ensemble_cos[MID_RESIDUAL]:.3f} at residual {MID_RESIDUAL}"
    )
    assert harmful.n_refused >= 8 and harmful.n_complied >= 8, "the safety prompt should make some, not all, refuse"
    assert all(probe.accuracies[i] > 0.6 for i in mid)
    assert 0 < ensemble_cos[MID_RESIDUAL] < 0.95, "the ensemble should differ from the mean difference, same side"


def test_concept_cones_follow_the_prompt_categories(smollm2, train):
    """k-means at mid depth on prompts of 4 categories agrees with the categories better than shuffled labels do.

    The agreement is weak on SmolLM2 (the last prompt token's residual carries the category only in part);
    the test holds it against a permutation null rather than a fixed bar.
    """
    with open(os.path.join(SHARED_DATA, "harmful_test.json")) as f:
        rows = json.load(f)
    prompts, categories = [], []
    for category_index, category in enumerate(CONE_CATEGORIES):
        chosen = [row["instruction"] for row in rows if row["category"] == category][:PROMPTS_PER_CATEGORY]
        assert len(chosen) == PROMPTS_PER_CATEGORY
        prompts += chosen
        categories += [category_index] * len(chosen)
    h_categories = collect_residuals(smollm2, prompts, batch_size=32)  # (96, L+1, d)
    cones, report = concept_cones(h_categories, train.harmless, copy.deepcopy(train.directions), len(CONE_CATEGORIES))
    agreement = adjusted_rand_score(categories, report.labels)
    shuffler = random.Random(0)
    null = []
    for _ in range(PERMUTATIONS):
        shuffled = categories[:]
        shuffler.shuffle(shuffled)
        null.append(adjusted_rand_score(shuffled, report.labels))
    p_value = sum(value >= agreement for value in null) / PERMUTATIONS
    print(
        f"\ncones at residual {report.layer}: sizes {report.sizes}, silhouette {report.silhouette:.3f}, "
        f"ARI with the categories {agreement:.3f}; shuffled categories: max {max(null):.3f}, "
        f"mean {sum(null) / PERMUTATIONS:.4f} over {PERMUTATIONS} (p = {p_value:.2f})"
    )
    assert cones.subspace is not None and cones.subspace.shape[1] == len(CONE_CATEGORIES)
    assert report.silhouette > 0
    assert agreement > 0.03 and p_value < 0.05


def test_calibration_scales_each_blocks_edit_by_its_factor(smollm2, train):
    """With factor c at residual l+1, block l's calibrated edit is the plain edit at weight w * c, bit for bit."""
    factors = calibration_factors(train.harmful, train.directions.refusal)  # (L+1,)
    ablator = ablator_for(smollm2)
    weight, blocks = 0.5, (5, int(MID_DEPTH), 25)
    params = AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=weight)
    r = global_direction(train.directions.refusal, MID_DEPTH)  # (d,): the direction every block's edit removes
    o_proj = {block: ablator.module_map.layers[block]["attn.o_proj"][0].param for block in blocks}
    originals = {block: o_proj[block].detach().clone() for block in blocks}
    ablator.apply(params, train.directions.refusal, None, methods=MethodTensors(calibration=factors))
    try:
        calibrated = {block: o_proj[block].detach().clone() for block in blocks}
    finally:
        ablator.reset()
    print(
        "\ncalibration factors (residual: factor): "
        + ", ".join(f"{i}: {factors[i]:.3f}" for i in (1, 6, MID_RESIDUAL, 26, len(factors) - 1))
    )
    assert abs(factors[MID_RESIDUAL].item() - 1) > 0.02, "mid-depth harmful projections should spread"
    for block in blocks:
        factor = factors[block + 1].item()
        expected = edit_matrix(originals[block], r, weight * factor, out_axis=0)
        plain = edit_matrix(originals[block], r, weight, out_axis=0)
        gap = (calibrated[block] - plain).abs().max().item()
        print(f"block {block}: factor {factor:.3f}, max |calibrated - plain edit| {gap:.2e}")
        assert torch.equal(calibrated[block], expected)
        assert gap > 1e-4
        assert torch.equal(o_proj[block], originals[block]), "reset should restore the weights"


def test_compliance_addition_alone_lowers_refusals(engine, smollm2, train, labels, unedited):
    """CAA with vectors from the model's own refused and complied harmful prompts, no ablation at all."""
    harmful_labels, _ = labels
    compliance = compliance_vectors(
        train.harmful[~harmful_labels.refused], train.harmful[harmful_labels.refused]
    )  # (L+1, d)
    overlap = compliance_overlap(compliance, train.directions.refusal)  # (L+1,)
    with_compliance = copy.deepcopy(train.directions)
    with_compliance.compliance = compliance
    params = AblationParams(
        DirectionScope.PER_LAYER, None, {}, compliance_strength=1.0, compliance_layer=COMPLIANCE_LAYER
    )
    with using(engine, with_compliance):
        steered = engine.evaluate(params)
    residual = COMPLIANCE_LAYER + 1
    print(
        f"\nCAA strength 1 at block {COMPLIANCE_LAYER}: {score(steered)}; unedited {score(unedited)}; "
        f"cos(c, r) at residual {residual}: {overlap[residual]:.3f}; |c| {compliance[residual].norm():.2f}"
    )
    assert steered.refusals < 0.6 * unedited.refusals
    assert overlap[residual] < 0, "steering towards compliance should point away from refusal"


def test_top_heads_lower_refusals_more_than_random_heads(engine, smollm2, train, unedited):
    """Ablating the heads that write refusal the most against ablating as many random heads."""
    harmful, harmless = shared_prompts("harmful_train", N_TRAIN), shared_prompts("harmless_train", N_TRAIN)
    scores = head_scores(smollm2, harmful, harmless, train.directions.refusal, batch_size=32)  # (L, n_heads)
    params = AblationParams(DirectionScope.PER_LAYER, None, {}, head_count=HEAD_COUNT, head_weight=1.0)
    scored = copy.deepcopy(train.directions)
    scored.head_scores = scores
    with using(engine, scored):
        top = engine.evaluate(params)
    random_results = []
    for seed in range(RANDOM_HEAD_DRAWS):
        # Random scores make top_heads pick HEAD_COUNT random heads through the same code path.
        shuffled = copy.deepcopy(train.directions)
        shuffled.head_scores = torch.rand(scores.shape, generator=torch.Generator().manual_seed(seed))
        with using(engine, shuffled):
            random_results.append(engine.evaluate(params))
    print(
        f"\ntop {HEAD_COUNT} heads (first 8: {top_heads(scores, 8)}), weight 1: {score(top)}; "
        f"{HEAD_COUNT} random heads: " + "; ".join(score(r) for r in random_results) + f"; unedited {score(unedited)}"
    )
    assert top.refusals < min(r.refusals for r in random_results)
    assert top.refusals < unedited.refusals


def test_helpfulness_orthogonalization_changes_the_edit(engine, smollm2, train):
    """The helpfulness direction (instructions against plain text) is taken out of r: a mid-depth angle of a few
    degrees, and a different KL for the same edit."""
    h_helpful = collect_residuals(smollm2, shared_prompts("harmless_train", N_TRAIN, offset=200), batch_size=32)
    h_unhelpful = collect_residuals(smollm2, load_prompts("bundled:baseline_text")[:N_TRAIN], batch_size=32)
    protected = copy.deepcopy(train.directions)
    angles = protect_helpfulness(protected, h_helpful, h_unhelpful)  # (L+1,) degrees
    params = AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=1.0)
    plain = engine.evaluate(params)
    with using(engine, protected):
        orthogonalized = engine.evaluate(params)
    print(
        f"\nhelpfulness: angle between r before and after at residuals 11..20: "
        f"{[round(a, 2) for a in angles[11:21].tolist()]} degrees; weight 1, direction {MID_DEPTH}: "
        f"plain {score(plain)}; orthogonalized {score(orthogonalized)}"
    )
    assert 0.5 < angles[MID_RESIDUAL] < 90
    assert abs(orthogonalized.kl - plain.kl) > 0.02

"""Supervised refusal probes: planted directions, the coef / sigma mapping, the guards, ensembles, CAA vectors,
and labels from real greedy replies of a tiny model."""

from __future__ import annotations

import pytest
import torch

from abliterate.core.directions import _normalize
from abliterate.core.generation import GreedyBatch
from abliterate.core.probes import (
    compliance_overlap,
    compliance_vectors,
    ensemble_directions,
    generation_labels,
    middle_third,
    probe_directions,
)
from abliterate.core.reasoning import final_answer, scoring_prompts, special_token_strings
from abliterate.core.refusals import RefusalDetector
from abliterate.errors import FailedPrecondition, InvalidArgument
from tests.tiny import make_lm

# Many prompts, few features: the direction estimate is then good to a cosine of about 0.95 at every layer
# (the penalty on standardized weights biases it a little at small N), and a fit costs no more than at N = 64.
N_PER_CLASS = 512
N_RESIDUALS = 6  # embeddings + 5 blocks: the middle third is residual indices 2..3
HIDDEN = 16
SHIFTED = (2, 3, 4)
NOISE = (0, 1, 5)
SHIFT = 4.0  # in noise standard deviations: the best possible accuracy is 0.977


def planted(
    seed: int = 0, shifted: tuple[int, ...] = SHIFTED, n_refused: int = N_PER_CLASS, n_complied: int = N_PER_CLASS
):
    """Unit-variance noise residuals; the refused ones moved by SHIFT along a unit vector at ``shifted`` layers.

    The vector has half its squared length in each half of the features (see the scaling test).
    """
    generator = torch.Generator().manual_seed(seed)
    halves = _normalize(torch.randn(2, HIDDEN // 2, generator=generator, dtype=torch.float64))  # (2, d/2)
    direction = (halves.reshape(HIDDEN) / 2**0.5).float()  # (d,) unit
    refused = torch.randn(n_refused, N_RESIDUALS, HIDDEN, generator=generator)  # (N1, L+1, d)
    complied = torch.randn(n_complied, N_RESIDUALS, HIDDEN, generator=generator)  # (N0, L+1, d)
    for layer in shifted:
        refused[:, layer] += SHIFT * direction
    return refused, complied, direction


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).item()


def test_the_middle_third_of_the_blocks():
    assert middle_third(6) == slice(2, 4)
    assert middle_third(31) == slice(11, 21)  # 30 blocks: 10 of them
    assert middle_third(2) == slice(1, 2)  # one block: that block


@pytest.fixture(scope="module")
def plain_probe():
    """The probe of :func:`planted`'s residuals, fitted once for the tests that read it."""
    refused, complied, _ = planted()
    return probe_directions(refused, complied)


def test_the_probe_finds_a_planted_direction_where_it_is_and_chance_elsewhere(plain_probe):
    _, _, direction = planted()
    result = plain_probe
    assert result.directions.shape == (N_RESIDUALS, HIDDEN) and result.directions.dtype == torch.float32
    assert result.accuracies.shape == (N_RESIDUALS,)
    assert (result.n_refused, result.n_complied, result.folds) == (N_PER_CLASS, N_PER_CLASS, 5)
    assert torch.allclose(result.directions.norm(dim=1), torch.ones(N_RESIDUALS), atol=1e-5)
    for layer in SHIFTED:
        assert result.accuracies[layer] > 0.95
        assert cosine(result.directions[layer], direction) > 0.9  # positive: towards refusal
    noise = result.accuracies[list(NOISE)]
    assert noise.max() < 0.6 and abs(noise.mean().item() - 0.5) < 0.05
    assert result.checked_accuracy == pytest.approx(result.accuracies[2:4].mean().item())


def test_the_direction_points_towards_refusal_whichever_class_comes_first(plain_probe):
    """Swapping the classes flips the direction: the sign follows the refused class, not the fit's labels."""
    refused, complied, direction = planted()
    result = plain_probe
    swapped = probe_directions(complied, refused)
    for layer in SHIFTED:
        assert cosine(swapped.directions[layer], direction) < -0.9
        assert cosine(swapped.directions[layer], result.directions[layer]) < -0.9


def test_the_normal_is_mapped_back_through_the_feature_scales(plain_probe):
    """Half the features scaled by 1000: the standardized fit is the same, the residual-space normal is
    ``coef / sigma``, which is the unscaled normal divided by the scales. Returning ``coef`` unmapped would give
    the unscaled normal itself, whose cosine with the right answer is about 0.7 here (the planted vector has
    half its squared length in the scaled half)."""
    refused, complied, direction = planted()
    scales = torch.ones(HIDDEN)
    scales[: HIDDEN // 2] = 1000.0
    plain = plain_probe
    scaled = probe_directions(refused * scales, complied * scales)
    expected = _normalize(direction / scales)  # (d,): the normal n with n . (scales * x) = direction . x
    for layer in SHIFTED:
        assert scaled.accuracies[layer].item() == pytest.approx(plain.accuracies[layer].item(), abs=0.02)
        assert cosine(scaled.directions[layer], expected) > 0.9
        assert cosine(scaled.directions[layer], plain.directions[layer] / scales) > 0.999
        assert cosine(plain.directions[layer], expected) < 0.8  # what an unmapped coef would have returned
        # The projection that separates the classes is the same one in both coordinates.
        projection = (refused[:, layer] * scales).double() @ scaled.directions[layer].double()
        reference = refused[:, layer].double() @ plain.directions[layer].double()
        assert torch.corrcoef(torch.stack([projection, reference]))[0, 1] > 0.999


def test_constant_features_and_a_constant_layer_leave_finite_directions():
    """The last prompt token's embedding is the same for every chat prompt: that layer has nothing to fit."""
    refused, complied, direction = planted()
    refused[:, 0], complied[:, 0] = 0.25, 0.25  # an embedding row shared by every prompt
    refused[:, :, 7], complied[:, :, 7] = 3.0, 3.0  # one feature constant everywhere
    result = probe_directions(refused, complied)
    assert torch.isfinite(result.directions).all() and torch.isfinite(result.accuracies).all()
    assert torch.equal(result.directions[0], torch.zeros(HIDDEN))
    assert result.accuracies[0] == pytest.approx(0.5)
    assert result.directions[SHIFTED[0], 7].abs() < 1e-6
    assert cosine(result.directions[SHIFTED[0]], direction) > 0.9


def test_a_small_class_is_refused_with_both_sizes_named():
    refused, complied, _ = planted(n_refused=3, n_complied=61)
    with pytest.raises(InvalidArgument, match="at least 8 refused and 8 complied.*got 3 refused and 61 complied"):
        probe_directions(refused, complied)
    # Fewer prompts than folds, but enough of each: the folds shrink to the smaller class.
    refused, complied, _ = planted(n_refused=3, n_complied=20)
    assert probe_directions(refused, complied, min_class=3, min_accuracy=0.0).folds == 3


def test_a_probe_at_chance_is_refused():
    refused, complied, _ = planted(shifted=())
    with pytest.raises(FailedPrecondition, match=r"at chance.*balanced accuracy over residual indices 2\.\.3"):
        probe_directions(refused, complied)
    assert probe_directions(refused, complied, min_accuracy=0.0).checked_accuracy < 0.6


def test_a_lopsided_split_does_not_pass_for_a_probe():
    """100 refused and 16 complied: plain accuracy would be 0.86 by always answering "refused"."""
    refused, complied, _ = planted(shifted=(), n_refused=100, n_complied=16)
    with pytest.raises(FailedPrecondition):
        probe_directions(refused, complied)


def test_bad_probe_settings_are_refused():
    refused, complied, _ = planted()
    with pytest.raises(InvalidArgument, match="folds"):
        probe_directions(refused, complied, folds=1)
    with pytest.raises(InvalidArgument, match="min_accuracy"):
        probe_directions(refused, complied, min_accuracy=1.5)
    with pytest.raises(InvalidArgument, match="same L\\+1 and d"):
        probe_directions(refused, complied[:, :, :-1])
    with pytest.raises(InvalidArgument, match="NaN"):
        probe_directions(refused.index_fill(0, torch.tensor([0]), float("nan")), complied)


def test_the_ensemble_aligns_the_probe_sign_with_the_mean_difference():
    generator = torch.Generator().manual_seed(1)
    mean_difference = _normalize(torch.randn(N_RESIDUALS, HIDDEN, generator=generator))  # (L+1, d)
    probe = _normalize(mean_difference + 0.8 * torch.randn(N_RESIDUALS, HIDDEN, generator=generator))  # (L+1, d)
    flipped = probe * torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])[:, None]
    combined = ensemble_directions(flipped, mean_difference)
    assert combined.shape == (N_RESIDUALS, HIDDEN) and combined.dtype == torch.float32
    assert torch.allclose(combined, ensemble_directions(probe, mean_difference), atol=1e-6)
    assert torch.allclose(combined, _normalize(probe + mean_difference), atol=1e-6)
    for layer in range(N_RESIDUALS):
        assert cosine(combined[layer], mean_difference[layer]) > 0
        assert cosine(combined[layer], probe[layer]) > 0


def test_the_ensemble_weights_at_their_ends_return_the_inputs_normalized():
    generator = torch.Generator().manual_seed(2)
    mean_difference = 3.0 * torch.randn(N_RESIDUALS, HIDDEN, generator=generator)  # (L+1, d), not unit
    probe = 0.1 * (mean_difference + torch.randn(N_RESIDUALS, HIDDEN, generator=generator))  # agrees in sign
    assert torch.allclose(ensemble_directions(probe, mean_difference, 0.0), _normalize(mean_difference), atol=1e-6)
    assert torch.allclose(ensemble_directions(probe, mean_difference, 1.0), _normalize(probe), atol=1e-6)
    assert torch.allclose(ensemble_directions(-probe, mean_difference, 1.0), _normalize(probe), atol=1e-6)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_a_bad_ensemble_weight_is_refused(weight):
    rows = torch.eye(HIDDEN)[:N_RESIDUALS]
    with pytest.raises(InvalidArgument, match="probe_weight"):
        ensemble_directions(rows, rows, weight)


def test_compliance_vectors_are_the_difference_of_the_means():
    refused, complied, direction = planted()
    vectors = compliance_vectors(complied, refused)
    assert vectors.dtype == torch.float32 and vectors.shape == (N_RESIDUALS, HIDDEN)
    assert torch.equal(vectors, (complied.double().mean(0) - refused.double().mean(0)).float())
    assert vectors[SHIFTED[0]].norm() > SHIFT - 1  # not normalized: the size of the shift
    with pytest.raises(InvalidArgument, match="at least 1 refused and 1 complied.*got 0 refused and 512"):
        compliance_vectors(complied, refused[:0])
    with pytest.raises(InvalidArgument, match="same L\\+1 and d"):
        compliance_vectors(complied, refused[:, :-1])


def test_compliance_overlap_is_the_cosine_with_the_refusal_direction():
    refused, complied, direction = planted()
    vectors = compliance_vectors(complied, refused)
    refusal = _normalize(refused.double().mean(0) - complied.double().mean(0)).float()  # (L+1, d)
    overlap = compliance_overlap(vectors, refusal)
    assert overlap.shape == (N_RESIDUALS,)
    assert torch.allclose(overlap, torch.full((N_RESIDUALS,), -1.0), atol=1e-6)  # exactly opposite by construction
    other = torch.randn(N_RESIDUALS, HIDDEN, generator=torch.Generator().manual_seed(3))
    overlap = compliance_overlap(vectors, other)
    assert ((overlap >= -1) & (overlap <= 1)).all()
    expected = torch.nn.functional.cosine_similarity(vectors.double(), other.double(), dim=-1).float()
    assert torch.allclose(overlap, expected, atol=1e-6)
    assert compliance_overlap(torch.zeros_like(other), other).eq(0).all()


PROMPTS = ["tell me about cats", "how do I bake bread?", "write a short poem", "what is 2 + 2?", "name a colour"]
LABEL_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_lm():
    return make_lm("llama", layers=2, seed=1)


def test_generation_labels_judge_each_prompts_own_reply_in_order(tiny_lm):
    labels = generation_labels(tiny_lm, PROMPTS, max_new_tokens=LABEL_TOKENS, batch_size=2)
    assert labels.refused.dtype == torch.bool and labels.refused.shape == (len(PROMPTS),)
    assert len(labels.replies) == len(PROMPTS)
    assert len(set(labels.replies)) > 1, "different prompts, different replies"
    detector = RefusalDetector(special_tokens=tuple(special_token_strings(tiny_lm.tokenizer)))
    texts = scoring_prompts(tiny_lm, PROMPTS)
    for i, text in enumerate(texts):
        # Each prompt decoded alone: the labels' batches keep every reply with its own prompt.
        alone = GreedyBatch(tiny_lm, [text], LABEL_TOKENS, keep_special_tokens=True).run().results()[0]
        assert labels.replies[i] == final_answer(alone.text, detector.special_tokens)
        assert bool(labels.refused[i]) == detector.is_refusal(alone.text)
    assert not labels.refused.all(), "a random tiny model's replies are gibberish, not refusals"
    assert labels.n_refused + labels.n_complied == len(PROMPTS)


def test_generation_labels_mark_a_reply_with_a_marker_as_refused(tiny_lm):
    plain = generation_labels(tiny_lm, PROMPTS, max_new_tokens=LABEL_TOKENS, batch_size=2)
    marker = plain.replies[3][-3:]  # something only the fourth reply is sure to say
    assert marker.strip()
    marked = generation_labels(
        tiny_lm, PROMPTS, max_new_tokens=LABEL_TOKENS, batch_size=2, detector=RefusalDetector(markers=(marker,))
    )
    assert marked.replies == plain.replies
    assert marked.refused[3]
    expected = [RefusalDetector(markers=(marker,)).is_refusal(reply) for reply in plain.replies]
    assert marked.refused.tolist() == expected


def test_generation_labels_call_an_empty_reply_a_refusal():
    """A model that ends every reply at once says nothing: the marker judge counts that as a refusal."""
    lm = make_lm("llama", layers=2, seed=1)
    eos, head = lm.tokenizer.eos_token_id, lm.model.get_output_embeddings()
    with torch.no_grad():
        bias = torch.zeros(head.out_features)
        bias[eos] = 1e4
        head.bias = torch.nn.Parameter(bias)
    labels = generation_labels(lm, PROMPTS[:3], max_new_tokens=LABEL_TOKENS)
    assert labels.refused.tolist() == [True, True, True]
    assert labels.replies == ["", "", ""]


def test_generation_labels_refuse_bad_arguments(tiny_lm):
    with pytest.raises(InvalidArgument, match="at least one prompt"):
        generation_labels(tiny_lm, [])
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        generation_labels(tiny_lm, PROMPTS, max_new_tokens=0)

"""Kernel, interpolation, row normalization, KL and direction edge cases (no model)."""

import math

import pytest
import torch

from abliterate.core.ablation import edit_matrix
from abliterate.core.directions import (
    DirectionSet,
    global_direction,
    orthogonalize_against,
    refusal_directions,
    sacred_directions,
    sacred_overlap,
    winsorize,
)
from abliterate.core.scoring import kl_divergence
from abliterate.errors import InvalidArgument
from abliterate.params import AblationParams, ComponentParams, RowNormalization


def test_kernel_values():
    k = ComponentParams(max_weight=1.2, max_weight_position=5.0, min_weight=0.2, min_weight_distance=4.0)
    assert k.weight_at(5) == pytest.approx(1.2)
    assert k.weight_at(7) == pytest.approx(1.2 + 0.5 * (0.2 - 1.2))
    assert k.weight_at(1) == pytest.approx(0.2)
    assert k.weight_at(0) == 0.0 and k.weight_at(10) == 0.0


def test_interpolation_between_block_outputs():
    refusal = torch.eye(4)  # residual indices 0..3 -> blocks 0..2
    assert torch.allclose(global_direction(refusal, 0.0), refusal[1])
    mid = global_direction(refusal, 0.5)
    assert torch.allclose(mid, torch.tensor([0, 1, 1, 0]) / math.sqrt(2))
    assert torch.allclose(global_direction(refusal, 2.0), refusal[3])
    for bad in (-0.1, 2.5, float("nan")):
        with pytest.raises(InvalidArgument):
            global_direction(refusal, bad)


@pytest.mark.parametrize("mode", list(RowNormalization))
def test_row_normalization_modes(mode):
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    r = torch.nn.functional.normalize(torch.randn(16), dim=0)
    new = edit_matrix(w, r, 1.0, 0, mode)
    if mode == RowNormalization.NONE:
        assert (r @ new).abs().max() < 1e-5
    if mode == RowNormalization.FULL:
        assert torch.allclose(new.norm(dim=1), w.norm(dim=1), atol=1e-5)
    if mode == RowNormalization.PRE:
        unit = w / w.norm(dim=1, keepdim=True)
        expected = (unit - torch.outer(r, r @ unit)) * w.norm(dim=1, keepdim=True)
        assert torch.allclose(new, expected, atol=1e-5)


def test_fused_expert_layouts_agree_with_per_expert_linear():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 5)  # (experts, out, in)
    r = torch.nn.functional.normalize(torch.randn(8), dim=0)
    fused = edit_matrix(w, r, 0.7, 1)
    transposed = edit_matrix(w.transpose(1, 2).contiguous(), r, 0.7, 2)
    for e in range(3):
        assert torch.allclose(fused[e], edit_matrix(w[e], r, 0.7, 0), atol=1e-6)
    assert torch.allclose(transposed.transpose(1, 2), fused, atol=1e-6)


def test_kl_is_zero_for_identical_and_positive_otherwise():
    a = torch.log_softmax(torch.randn(4, 1, 10), -1)
    b = torch.log_softmax(torch.randn(4, 1, 10), -1)
    assert kl_divergence(a, a) == pytest.approx(0.0, abs=1e-7)
    manual = (a.exp() * (a - b)).sum(-1).mean().item()
    assert kl_divergence(a, b) == pytest.approx(manual, rel=1e-5)


def test_sacred_orthogonalization_single_projection():
    torch.manual_seed(0)
    cap, base = torch.randn(20, 3, 16) + 1.0, torch.randn(20, 3, 16)
    s = sacred_directions(cap, base, k=4)
    assert s.shape == (3, 4, 16)
    gram = torch.einsum("lkd,ljd->lkj", s, s)
    assert torch.allclose(gram, torch.eye(4).expand(3, 4, 4), atol=1e-4)
    r = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    r2 = orthogonalize_against(r, s)
    assert torch.einsum("lkd,ld->lk", s, r2).abs().max() < 1e-5
    assert sacred_overlap(r2, s).max() < 1e-5
    assert torch.allclose(r2.norm(dim=1), torch.ones(3), atol=1e-5)
    inside = s[:, 0, :].clone()  # a refusal direction entirely inside the subspace
    with pytest.raises(InvalidArgument, match="nothing of the refusal direction remains"):
        orthogonalize_against(inside, s)


def test_winsorize_and_direction_set_round_trip():
    torch.manual_seed(0)
    h = torch.randn(10, 3, 64)
    h[0, 1, 2] = 1000.0
    w = winsorize(h, 0.95)
    assert w.abs().max() < 1000
    ds = refusal_directions(h + 1, h, winsorize_quantile=0.95)
    data = ds.to_bytes()
    back = DirectionSet.from_bytes(data)
    assert torch.equal(back.refusal, ds.refusal) and back.metadata["projected"] == "True"
    assert DirectionSet.artifact_id(data) == DirectionSet.artifact_id(back.to_bytes())
    with pytest.raises(InvalidArgument):
        DirectionSet.from_bytes(b"not safetensors")


def test_bad_params_are_clear_errors():
    with pytest.raises(InvalidArgument, match="finite"):
        AblationParams.uniform(direction_index=float("nan"), n_layers=4).validate(4)
    with pytest.raises(InvalidArgument, match="outside"):
        AblationParams.uniform(direction_index=9.0, n_layers=4).validate(4)
    with pytest.raises(InvalidArgument, match="unknown component"):
        unknown = AblationParams.uniform(direction_index=1.0, n_layers=4, components=("attn.q_proj",))
        unknown.validate(4, ["attn.o_proj"])
    bad = AblationParams(direction_index=1.0, components={"attn.o_proj": ComponentParams(float("inf"), 1, 0, 1)})
    with pytest.raises(InvalidArgument, match="finite"):
        bad.validate(4)
    with pytest.raises(InvalidArgument):
        AblationParams.from_dict({"direction_scope": "sideways"})
    with pytest.raises(InvalidArgument):
        refusal_directions(torch.zeros(0, 3, 4), torch.zeros(2, 3, 4))


def test_direction_set_bytes_are_deterministic():
    torch.manual_seed(0)
    h = torch.randn(6, 3, 8)
    ds = refusal_directions(h + 1, h)
    ds.metadata.update({f"key{i}": str(i) for i in range(12)})
    ids = {DirectionSet.artifact_id(ds.to_bytes()) for _ in range(8)}
    assert len(ids) == 1


def test_winsorize_clamps_each_prompt_at_its_own_quantile():
    torch.manual_seed(0)
    h = torch.randn(6, 2, 40)
    h[0] *= 100  # one prompt with massive activations everywhere
    clamped = winsorize(h, 0.9)  # per prompt (heretic's definition)
    k = math.ceil(0.9 * 40)
    for prompt in range(6):
        for layer in range(2):
            bound = h[prompt, layer].abs().kthvalue(k).values
            assert torch.equal(clamped[prompt, layer], h[prompt, layer].clamp(-bound, bound))
    # The loud prompt does not set the bound of the quiet ones; pooled per layer, it does.
    assert torch.equal(clamped[1:], winsorize(h[1:], 0.9))
    pooled = winsorize(h, 0.9, scope="per_layer")
    assert pooled[0].abs().max() < h[0].abs().max() and not torch.equal(pooled[1:], clamped[1:])
    with pytest.raises(InvalidArgument):
        winsorize(h, 0.9, scope="everywhere")


def test_negative_kernel_weights_are_rejected():
    params = AblationParams(direction_index=0.0, components={"attn.o_proj": ComponentParams(-0.5, 0.0, 0.0, 1.0)})
    with pytest.raises(InvalidArgument, match="outside \\[0, 10\\]"):
        params.validate(4)
    params = AblationParams(direction_index=0.0, components={"attn.o_proj": ComponentParams(1.0, 0.0, -0.1, 1.0)})
    with pytest.raises(InvalidArgument):
        params.validate(4)


def test_disclaimer_is_a_refusal_marker():
    from abliterate.core.refusals import RefusalDetector

    assert RefusalDetector().is_refusal("Disclaimer: this is for educational purposes only.")


@pytest.mark.parametrize("temperature", [5e-324, 1e-30, 1.0, 1e308])
def test_sampling_is_defined_at_any_finite_positive_temperature(temperature):
    from abliterate.core.generation import _sample

    logits = torch.tensor([1.0, 30.0, -5.0, 29.0])
    picks = {_sample(logits, temperature, 1.0, torch.Generator().manual_seed(s)) for s in range(20)}
    nucleus = _sample(logits, temperature, 0.5, torch.Generator().manual_seed(0))
    assert picks <= {0, 1, 2, 3} and nucleus in {0, 1, 2, 3}
    if temperature < 1e-20:
        assert picks == {1} and nucleus == 1  # a vanishing temperature is greedy
    if temperature == 1e308:
        assert len(picks) > 2  # an enormous one is (nearly) uniform

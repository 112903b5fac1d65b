"""Multi-direction subspace: the basis, the joint edit, its LoRA form and its search dimensions."""

import pytest
import torch

from abliterate.core.ablation import Ablator, edit_matrix
from abliterate.core.directions import (
    DirectionSet,
    protect_sacred,
    protected_subspace,
    refusal_directions,
    refusal_subspace,
)
from abliterate.core.modules import ATTN, MLP, discover
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.params import AblationParams, ComponentParams, DirectionScope, RowNormalization
from tests.tiny import make_lm

KERNEL = ComponentParams(1.0, 1.5, 1.0, 4.0)  # weight 1 on every block of a 4-layer model


def _residuals(layers: int, hidden: int, seed: int = 3, n: int = 24):
    """Harmful residuals shifted along two planted directions, with half the prompts using each."""
    generator = torch.Generator().manual_seed(seed)
    good = torch.randn(n, layers + 1, hidden, generator=generator)  # (N, L+1, d)
    bad = torch.randn(n, layers + 1, hidden, generator=generator)
    planted = torch.nn.functional.normalize(torch.randn(2, hidden, generator=generator), dim=-1)  # (2, d)
    bad[: n // 2] += 6 * planted[0]  # one kind of harmful prompt shifts along planted[0] ...
    bad[n // 2 :] += 6 * planted[1]  # ... the other along planted[1]
    return bad, good, planted


def _subspace_set(lm, k: int = 2, sacred: int = 0):
    bad, good, planted = _residuals(lm.n_layers, lm.hidden_size)
    directions = refusal_directions(bad, good, projected=True)
    if sacred:
        generator = torch.Generator().manual_seed(9)
        basis = torch.linalg.qr(torch.randn(lm.n_layers + 1, lm.hidden_size, sacred, generator=generator))[0]
        protect_sacred(directions, basis.transpose(1, 2).contiguous())  # (L+1, sacred, d)
    return refusal_subspace(bad, good, directions, k), planted


def test_basis_is_orthonormal_starts_with_r_and_finds_the_planted_span():
    lm = make_lm("llama", layers=4, hidden=32)
    directions, planted = _subspace_set(lm, k=3)
    basis = directions.subspace  # (L+1, 3, d)
    assert tuple(basis.shape) == (5, 3, 32) and directions.n_directions == 3
    gram = basis @ basis.transpose(1, 2)  # (L+1, 3, 3)
    assert torch.allclose(gram, torch.eye(3).expand_as(gram), atol=1e-5)
    assert torch.equal(basis[:, 0], directions.refusal)
    # Both planted shifts lie (nearly) inside the 3-direction span; r alone holds only their mean.
    projector = basis.transpose(1, 2) @ basis  # (L+1, d, d)
    inside = (planted[None] @ projector).norm(dim=-1)  # (L+1, 2): norm of each planted vector's part in the span
    assert inside.min() > 0.8
    along_r = (planted[None] @ directions.refusal[..., None]).squeeze(-1).abs()  # (L+1, 2)
    assert along_r.max() < 0.8 and (inside - along_r).min() > 0.15
    # The harmful prompts' mean offset projects positively on every further row (signs aligned).
    energy = directions.subspace_energy  # (L+1, 3)
    assert (energy >= 0).all() and (energy.sum(1) <= 1 + 1e-5).all() and (energy[:, 1] > 0.05).all()


def test_sacred_and_projected_sets_keep_the_further_directions_off_the_protected_subspace():
    lm = make_lm("llama", layers=4, hidden=32)
    directions, _ = _subspace_set(lm, k=3, sacred=2)
    protected = protected_subspace(directions)  # (L+1, 3, d): sacred and the harmless mean
    overlap = directions.subspace @ protected.transpose(1, 2)  # (L+1, k, p)
    assert overlap.abs().max() < 1e-5


def test_round_trip_and_bad_tensors():
    lm = make_lm("llama", layers=4, hidden=32)
    directions, _ = _subspace_set(lm)
    again = DirectionSet.from_bytes(directions.to_bytes())
    assert torch.equal(again.subspace, directions.subspace)
    assert torch.equal(again.subspace_energy, directions.subspace_energy)
    directions.subspace = directions.subspace[0]  # (k, d): the layer axis lost
    with pytest.raises(InvalidArgument, match="subspace must be 3-D"):
        DirectionSet.from_bytes(directions.to_bytes())
    bad, good, _ = _residuals(4, 32)
    with pytest.raises(InvalidArgument, match="at least 2 directions"):
        refusal_subspace(bad, good, refusal_directions(bad, good), 1)
    with pytest.raises(InvalidArgument, match="harmful prompts"):
        refusal_subspace(bad[:2], good, refusal_directions(bad[:2], good), 3)


def test_joint_edit_removes_the_whole_span_and_weight_zero_is_the_single_direction_edit():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 24, generator=generator)  # (out, in)
    basis = torch.linalg.qr(torch.randn(16, 3, generator=generator))[0].T.contiguous()  # (3, out) orthonormal
    joint = edit_matrix(weight, basis, [1.0, 1.0, 1.0], 0)
    assert (basis @ joint).abs().max() < 1e-5
    # Sequential partial projections are what the seed did; at weights 1 on an orthonormal basis the
    # joint projection equals the sequential one, and at partial weights each direction keeps (1 - w).
    partial = edit_matrix(weight, basis, [0.5, 0.25, 0.0], 0)
    kept = (basis @ partial) / (basis @ weight)  # (3, in): per direction the share left
    assert torch.allclose(kept, torch.tensor([0.5, 0.75, 1.0])[:, None].expand_as(kept), atol=1e-4)
    single = edit_matrix(weight, basis[0], 0.7, 0)
    assert torch.allclose(edit_matrix(weight, basis, [0.7, 0.0, 0.0], 0), single, atol=1e-6)
    # Fused experts (E, in, out) take the same edit along their output axis.
    experts = torch.stack([weight, 2 * weight]).transpose(1, 2).contiguous()  # (E, in, out)
    edited = edit_matrix(experts, basis, [1.0, 1.0, 1.0], 2, RowNormalization.NONE)
    assert (edited @ basis.T).abs().max() < 1e-4


@pytest.mark.parametrize("scope", [DirectionScope.GLOBAL, DirectionScope.PER_LAYER])
def test_ablator_removes_the_subspace_jointly_and_refuses_a_set_without_one(scope):
    lm = make_lm("llama", layers=4, hidden=32)
    directions, _ = _subspace_set(lm, k=3, sacred=1)
    module_map = discover(lm.model)
    ablator = Ablator(module_map)
    before = {id(m.param): m.param.detach().clone() for m in module_map.matrices()}
    index = 1.4 if scope == DirectionScope.GLOBAL else None
    params = AblationParams(scope, index, {ATTN: KERNEL, MLP: KERNEL}, subspace_weights=(1.0, 1.0))
    protected = protected_subspace(directions)
    bases = ablator.directions_for(params, directions.refusal, protected, directions.subspace)
    ablator.apply(params, directions.refusal, protected, directions.subspace)
    try:
        for matrix in module_map.matrices():
            basis = bases[matrix.layer]  # (3, d)
            assert basis.shape == (3, lm.hidden_size)
            assert (basis @ matrix.param.detach()).abs().max() < 1e-4, "the whole span is removed"
            change = matrix.param.detach() - before[id(matrix.param)]
            assert (protected[matrix.layer + 1] @ change).abs().max() < 1e-4, "protected subspace untouched"
        single = ablator.directions_for(
            AblationParams(scope, index, {ATTN: KERNEL}), directions.refusal, protected, directions.subspace
        )
        assert all(torch.allclose(basis[0], r, atol=1e-6) for basis, r in zip(bases, single))
    finally:
        ablator.reset()
    assert all(torch.equal(m.param, before[id(m.param)]) for m in module_map.matrices())
    with pytest.raises(FailedPrecondition, match="SUBSPACE"):
        ablator.apply(params, directions.refusal, protected, None)
    with pytest.raises(FailedPrecondition, match="direction set has 2"):
        ablator.apply(
            AblationParams(scope, index, {ATTN: KERNEL}, subspace_weights=(1, 1, 1)),
            directions.refusal,
            protected,
            directions.subspace,
        )
    with pytest.raises(InvalidArgument, match=r"subspace_weights\[0\]"):
        ablator.apply(AblationParams(scope, index, {ATTN: KERNEL}, subspace_weights=(1.5,)), directions.refusal)


def test_lora_factors_of_a_subspace_edit_are_rank_k_and_equal_the_merged_edit():
    from abliterate_services.evaluator.lora import lora_factors

    lm = make_lm("llama", layers=4, hidden=32)
    directions, _ = _subspace_set(lm, k=3)
    module_map = discover(lm.model)
    ablator = Ablator(module_map)
    for norm in (RowNormalization.NONE, RowNormalization.PRE):
        params = AblationParams(
            DirectionScope.PER_LAYER, None, {ATTN: KERNEL, MLP: KERNEL}, norm, subspace_weights=(0.5, 0.8)
        )
        factors = lora_factors(lm.model, ablator, directions.refusal, params, None, directions.subspace)
        originals = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
        ablator.apply(params, directions.refusal, None, directions.subspace)
        try:
            for module, (a, b) in factors.items():
                assert a.shape[0] == 3 and b.shape[1] == 3
                merged = dict(lm.model.named_parameters())[f"{module}.weight"].detach()
                assert torch.allclose(originals[f"{module}.weight"] + b @ a, merged, atol=1e-5)
        finally:
            ablator.reset()


def test_search_space_searches_one_weight_per_further_direction():
    import optuna

    from abliterate_services.optimizer.search_space import SearchSpace

    space = SearchSpace.from_pb(None, 8).with_methods(3, False, 0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    params = space.suggest(trial)
    assert len(params.subspace_weights) == 2 and all(0 <= w <= 1 for w in params.subspace_weights)
    assert {"subspace_weight_1", "subspace_weight_2"} <= set(trial.params)
    again = space.params_from_optuna(space.to_optuna_params(params))
    assert again.subspace_weights == params.subspace_weights
    # A starting trial without further weights edits along the first direction alone: weight 0.
    plain = SearchSpace.from_pb(None, 8).suggest(study.ask())
    assert plain.subspace_weights == ()
    assert space.to_optuna_params(plain)["subspace_weight_2"] == 0.0
    with pytest.raises(InvalidArgument, match="subspace directions"):
        SearchSpace.from_pb(None, 8).to_optuna_params(params)
    assert SearchSpace.from_dict(space.to_dict()).n_directions == 3


def test_direction_method_and_count_must_go_together():
    from abliterate.rpc.convert import check_direction_method
    from abliterate.v1 import common_pb2

    check_direction_method(common_pb2.ExtractionOptions(direction_method=common_pb2.DIRECTION_METHOD_SUBSPACE))
    check_direction_method(
        common_pb2.ExtractionOptions(direction_method=common_pb2.DIRECTION_METHOD_SUBSPACE, n_directions=4)
    )
    for options, message in (
        (common_pb2.ExtractionOptions(n_directions=3), "needs direction_method"),
        (
            common_pb2.ExtractionOptions(direction_method=common_pb2.DIRECTION_METHOD_SUBSPACE, n_directions=1),
            "n_directions",
        ),
        (
            common_pb2.ExtractionOptions(direction_method=common_pb2.DIRECTION_METHOD_SUBSPACE, n_directions=99),
            "n_directions",
        ),
        (common_pb2.ExtractionOptions(direction_method=77), "unknown value"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            check_direction_method(options)


def test_compliance_and_head_ablation_are_switched_on_and_off_by_the_search():
    import optuna

    from abliterate_services.optimizer.search_space import SearchSpace

    space = SearchSpace.from_pb(None, 30).with_methods(1, has_compliance=True, n_scored_heads=270)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    sampled = [space.suggest(study.ask()) for _ in range(40)]
    assert any(p.adds_compliance for p in sampled) and any(not p.adds_compliance for p in sampled)
    assert any(p.ablates_heads for p in sampled) and any(not p.ablates_heads for p in sampled)
    for params in sampled:
        assert space.params_from_optuna(space.to_optuna_params(params)) == params
        if params.ablates_heads:
            assert 1 <= params.head_count <= 32
        if params.adds_compliance:
            low, high = space.index_bounds()
            assert int(low) <= params.compliance_layer <= int(high) + 1
    plain = SearchSpace.from_pb(None, 30)
    with pytest.raises(InvalidArgument, match="compliance vectors"):
        plain.to_optuna_params(next(p for p in sampled if p.adds_compliance))

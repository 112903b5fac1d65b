"""What each edit mode guarantees, output biases, and sacred-subspace protection in every scope."""

import pytest
import torch

from abliterate.core.ablation import Ablator, edit_matrix
from abliterate.core.directions import DirectionSet, protect_sacred, protected_subspace, refusal_directions
from abliterate.core.modules import ATTN, discover
from abliterate.errors import FailedPrecondition
from abliterate.params import AblationParams, ComponentParams, DirectionScope, RowNormalization
from tests.tiny import make_lm


def _unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _weight(seed=1):
    # Rows with very different norms (log-spread like a trained model's), hidden 16, input 24.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 24, generator=generator) * torch.exp(torch.randn(16, 1, generator=generator) * 0.5)


def test_column_mode_removes_r_exactly_and_keeps_every_column_norm():
    weight, r = _weight(), _unit(16)
    edited = edit_matrix(weight, r, 1.0, 0, RowNormalization.COLUMN)
    assert (r @ edited).abs().max() < 1e-5
    assert torch.allclose(edited.norm(dim=0), weight.norm(dim=0), rtol=1e-5)
    # Fused experts, both layouts, same guarantee.
    experts = torch.stack([weight, _weight(2)])  # (E, out, in)
    for tensor, axis in ((experts, 1), (experts.transpose(1, 2).contiguous(), 2)):
        out = edit_matrix(tensor, r, 1.0, axis, RowNormalization.COLUMN)
        as_out_in = out if axis == 1 else out.transpose(1, 2)
        assert (r @ as_out_in).abs().max() < 1e-5
        assert torch.allclose(as_out_in.norm(dim=1), experts.norm(dim=1), rtol=1e-5)


def test_full_mode_keeps_row_norms_but_does_not_remove_r():
    weight, r = _weight(), _unit(16)
    edited = edit_matrix(weight, r, 1.0, 0, RowNormalization.FULL)
    assert torch.allclose(edited.norm(dim=1), weight.norm(dim=1), rtol=1e-5)
    left = (r @ edited).norm() / (r @ weight).norm()
    assert left > 0.05  # what docs/architecture.md says: row norms kept, r not removed exactly
    assert (r @ edit_matrix(weight, r, 1.0, 0, RowNormalization.NONE)).abs().max() < 1e-5


def test_gpt_oss_attention_bias_is_edited_so_the_block_writes_nothing_along_r():
    lm = make_lm("gpt_oss", layers=2)
    module_map = discover(lm.model)
    attention = [m for m in module_map.matrices() if m.component == ATTN]
    assert all(m.bias is not None for m in attention), "gpt-oss o_proj has a bias"
    assert any(m.bias is not None for m in module_map.matrices() if m.param.dim() == 3), "expert biases"
    r = _unit(lm.hidden_size, seed=3)
    refusal = r.expand(lm.n_layers + 1, -1).contiguous()
    ablator = Ablator(module_map)
    written = []
    hooks = [
        lm.model.get_submodule(f"model.layers.{i}.self_attn.o_proj").register_forward_hook(
            lambda _m, _i, out: written.append(out @ r)
        )
        for i in range(lm.n_layers)
    ]
    ids = lm.tokenizer(["hello there, how are you"], return_tensors="pt")["input_ids"]
    try:
        ablator.apply(AblationParams.uniform(direction_index=0.0, n_layers=lm.n_layers, weight=1.0), refusal)
        with torch.inference_mode():
            lm.model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
        ablator.reset()
    assert all(w.abs().max() < 1e-4 for w in written)


def test_lora_export_refuses_an_edit_that_changes_a_bias():
    from abliterate_services.evaluator.lora import lora_factors

    lm = make_lm("gpt_oss", layers=2)
    ablator = Ablator(discover(lm.model))
    refusal = _unit(lm.n_layers + 1, lm.hidden_size)
    params = AblationParams.uniform(direction_index=0.0, n_layers=lm.n_layers, components=(ATTN,))
    with pytest.raises(FailedPrecondition, match="bias"):
        lora_factors(lm.model, ablator, refusal, params)
    with pytest.raises(Exception, match="not a rank-1 edit"):
        lora_factors(
            lm.model,
            ablator,
            refusal,
            AblationParams.uniform(0.0, lm.n_layers, components=(ATTN,), row_normalization=RowNormalization.COLUMN),
        )


def _protected_set(lm, k=3):
    generator = torch.Generator().manual_seed(5)
    h_bad = torch.randn(12, lm.n_layers + 1, lm.hidden_size, generator=generator) + 0.5
    h_good = torch.randn(12, lm.n_layers + 1, lm.hidden_size, generator=generator) + 0.2
    sacred = torch.linalg.qr(torch.randn(lm.n_layers + 1, lm.hidden_size, k, generator=generator))[0]
    sacred = sacred.transpose(1, 2).contiguous()  # (L+1, k, d) orthonormal rows
    return protect_sacred(refusal_directions(h_bad, h_good, projected=True), sacred)


@pytest.mark.parametrize("scope", [DirectionScope.GLOBAL, DirectionScope.PER_LAYER])
def test_sacred_subspace_of_every_edited_block_is_left_alone(scope):
    lm = make_lm("llama", layers=4)
    directions = _protected_set(lm)
    module_map = discover(lm.model)
    ablator = Ablator(module_map)
    before = {id(m.param): m.param.detach().clone() for m in module_map.matrices()}
    kernel = ComponentParams(1.0, 1.5, 1.0, 4.0)
    params = AblationParams(
        direction_scope=scope,
        direction_index=1.3 if scope == DirectionScope.GLOBAL else None,
        components={ATTN: kernel, "mlp.down_proj": kernel},
    )
    ablator.apply(params, directions.refusal, protected_subspace(directions))
    try:
        for matrix in module_map.matrices():
            change = matrix.param.detach() - before[id(matrix.param)]  # (hidden, in)
            assert change.abs().max() > 1e-3, "the block was edited"
            sacred = directions.sacred[matrix.layer + 1]  # (k, hidden)
            assert (sacred @ change).abs().max() < 1e-4, (matrix.layer, matrix.name)
    finally:
        ablator.reset()


def test_harmless_mean_inside_the_sacred_subspace_adds_no_direction():
    from abliterate.core.directions import joint_basis

    sacred = torch.eye(6)[None, :2].repeat(3, 1, 1)  # (3, 2, 6): span of e0, e1
    inside = torch.tensor([[1.0, 2.0, 0, 0, 0, 0]]).repeat(3, 1)
    outside = torch.tensor([[1.0, 0, 3.0, 0, 0, 0]]).repeat(3, 1)
    assert joint_basis(sacred, inside)[:, 2].abs().max() == 0  # nothing new to protect
    row = joint_basis(sacred, outside)[:, 2]
    assert torch.allclose(row, torch.tensor([0, 0, 1.0, 0, 0, 0]).repeat(3, 1))


def test_sacred_orthogonalization_keeps_the_projection_off_the_harmless_mean():
    lm = make_lm("llama", layers=4)
    directions = _protected_set(lm)
    good = torch.nn.functional.normalize(directions.good_mean, dim=1)
    blocks = slice(1, None)
    assert (directions.refusal[blocks] * good[blocks]).sum(1).abs().max() < 1e-5
    assert torch.einsum("lkd,ld->lk", directions.sacred[blocks], directions.refusal[blocks]).abs().max() < 1e-5
    assert torch.allclose(directions.refusal[blocks].norm(dim=1), torch.ones(lm.n_layers), atol=1e-5)
    # Round trip keeps what the protection needs.
    back = DirectionSet.from_bytes(directions.to_bytes())
    assert torch.allclose(protected_subspace(back), protected_subspace(directions))

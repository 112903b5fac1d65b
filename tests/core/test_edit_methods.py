"""Calibration, head ablation and compliance addition in the Ablator: each changes what it should and
nothing else, resets cleanly, and the compliance bias survives a merged export into plain transformers."""

import dataclasses

import pytest
import torch

from abliterate.core.ablation import Ablator, MethodTensors, ablator_for, edit_matrix
from abliterate.core.export import export_merged
from abliterate.core.modules import ATTN, MLP, discover
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.params import AblationParams, ComponentParams, DirectionScope
from tests.tiny import make_lm

KERNEL = ComponentParams(0.8, 1.0, 0.4, 2.0)


def _refusal(lm, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size, generator=generator), dim=-1)


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_calibration_scales_each_blocks_weight_by_its_factor_and_changes_nothing_else():
    lm = make_lm("llama", layers=4, hidden=32)
    module_map, refusal = discover(lm.model), _refusal(lm)
    ablator = Ablator(module_map)
    calibration = torch.tensor([9.0, 0.5, 1.0, 1.7, 2.0])  # row 0 (embeddings) is never used
    params = AblationParams(DirectionScope.PER_LAYER, None, {ATTN: KERNEL, MLP: KERNEL})
    before = _snapshot(lm.model)
    ablator.apply(params, refusal, methods=MethodTensors(calibration=calibration))
    try:
        for matrix in module_map.matrices():
            plain = params.layer_weights(matrix.component, lm.n_layers)[matrix.layer]
            original = before[f"model.layers.{matrix.layer}.{matrix.name}.weight"]
            expected = edit_matrix(original, refusal[matrix.layer + 1], plain * float(calibration[matrix.layer + 1]), 0)
            assert torch.allclose(matrix.param.detach(), expected, atol=1e-6), (matrix.layer, matrix.name)
        edited = {f"model.layers.{m.layer}.{m.name}.weight" for m in module_map.matrices()}
        assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters() if n not in edited)
    finally:
        ablator.reset()
    with pytest.raises(FailedPrecondition, match="calibration factors"):
        ablator.apply(params, refusal, methods=MethodTensors(calibration=calibration[:3]))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_oss"])
def test_head_ablation_edits_only_the_top_heads_column_blocks(arch):
    lm = make_lm(arch, layers=3)
    module_map, refusal = discover(lm.model), _refusal(lm)
    ablator = Ablator(module_map)
    n_heads = lm.model.config.num_attention_heads
    scores = torch.zeros(lm.n_layers, n_heads)
    scores[2, 1], scores[0, 3], scores[1, 0] = 3.0, 2.0, -5.0  # the top two: (2, 1) then (0, 3)
    params = AblationParams(DirectionScope.PER_LAYER, None, {}, head_count=2, head_weight=1.0)
    before = _snapshot(lm.model)
    ablator.apply(params, refusal, methods=MethodTensors(head_scores=scores))
    try:
        changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {"model.layers.2.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight"}
        for layer, head in ((2, 1), (0, 3)):
            weight = lm.model.get_submodule(f"model.layers.{layer}.self_attn.o_proj").weight.detach()
            head_dim = weight.shape[1] // n_heads
            columns = slice(head * head_dim, (head + 1) * head_dim)
            assert (refusal[layer + 1] @ weight[:, columns]).abs().max() < 1e-5
            untouched = torch.ones(weight.shape[1], dtype=torch.bool)
            untouched[columns] = False
            original = before[f"model.layers.{layer}.self_attn.o_proj.weight"]
            assert torch.equal(weight[:, untouched], original[:, untouched])
        assert ablator.first_edited_layer == 0
    finally:
        ablator.reset()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    with pytest.raises(FailedPrecondition, match="head scores"):
        ablator.apply(params, refusal)


def test_compliance_addition_is_an_output_bias_that_reset_removes():
    lm = make_lm("llama", layers=3)
    module_map, refusal = discover(lm.model), _refusal(lm)
    ablator = Ablator(module_map)
    compliance = 3 * _refusal(lm, seed=4)  # (L+1, d), not unit
    params = AblationParams(DirectionScope.PER_LAYER, None, {}, compliance_strength=0.5, compliance_layer=1)
    projection = lm.model.get_submodule("model.layers.1.self_attn.o_proj")
    assert projection.bias is None
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = lm.model(tokens).logits
    ablator.apply(params, refusal, methods=MethodTensors(compliance=compliance))
    try:
        assert torch.allclose(projection.bias, 0.5 * compliance[2])
        with torch.no_grad():
            assert not torch.allclose(lm.model(tokens).logits, plain, atol=1e-4)
        assert ablator.first_edited_layer == 1
    finally:
        ablator.reset()
    assert projection.bias is None
    with torch.no_grad():
        assert torch.equal(lm.model(tokens).logits, plain)
    with pytest.raises(FailedPrecondition, match="compliance vectors"):
        ablator.apply(params, refusal)
    with pytest.raises(InvalidArgument, match="compliance_strength"):
        ablator.apply(dataclasses.replace(params, compliance_strength=9.0), refusal)
    with pytest.raises(InvalidArgument, match="compliance_layer"):
        ablator.apply(dataclasses.replace(params, compliance_layer=3), refusal)


def test_a_compliance_edit_survives_a_merged_export_and_reloads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make_lm("llama", layers=3)
    refusal = _refusal(lm)
    ablator = ablator_for(lm)  # the model's one ablator: the export asks it whether a bias was added
    params = AblationParams(DirectionScope.GLOBAL, 1.0, {ATTN: KERNEL}, compliance_strength=1.0, compliance_layer=2)
    ablator.apply(params, refusal, methods=MethodTensors(compliance=2 * _refusal(lm, seed=7)))
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    try:
        with torch.no_grad():
            edited = lm.model(tokens).logits
        export_merged(lm, str(tmp_path / "out"))
        assert lm.model.config.attention_bias is False, "the flag is set only while saving"
        assert ablator.added_biases
        assert lm.model.get_submodule("model.layers.0.self_attn.q_proj").bias is None
    finally:
        ablator.reset()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.attention_bias is True
    with torch.no_grad():
        assert torch.allclose(reloaded(tokens).logits, edited, atol=1e-5)


def test_an_architecture_without_an_attention_bias_flag_refuses_a_compliance_export(tmp_path):
    lm = make_lm("qwen2", layers=2)
    ablator = ablator_for(lm)
    params = AblationParams(DirectionScope.PER_LAYER, None, {}, compliance_strength=1.0, compliance_layer=0)
    ablator.apply(params, _refusal(lm), methods=MethodTensors(compliance=_refusal(lm, seed=2)))
    try:
        with pytest.raises(FailedPrecondition, match="no flag that gives the attention out-projection a bias"):
            export_merged(lm, str(tmp_path / "out"))
    finally:
        ablator.reset()


def test_method_parameters_round_trip_through_the_contract_and_the_study_json():
    from abliterate.rpc.convert import params_from_pb, params_to_pb

    params = AblationParams(
        DirectionScope.GLOBAL,
        1.5,
        {ATTN: KERNEL},
        subspace_weights=(0.25, 0.5),
        compliance_strength=0.75,
        compliance_layer=2,
        head_count=5,
        head_weight=0.9,
    )
    assert params_from_pb(params_to_pb(params)) == params
    assert AblationParams.from_dict(params.to_dict()) == params
    plain = AblationParams(DirectionScope.GLOBAL, 1.5, {ATTN: KERNEL})
    assert set(plain.to_dict()) == {"direction_scope", "direction_index", "row_normalization", "components"}
    message = params_to_pb(plain)
    assert not message.HasField("compliance_addition") and not message.HasField("head_ablation")


def test_a_refused_compliance_or_head_trial_writes_nothing():
    """The method checks run before the kernel's edits are written: a refused trial leaves the model as it was."""
    lm = make_lm("llama", layers=3)
    ablator = Ablator(discover(lm.model))
    before = _snapshot(lm.model)
    kernel_and_heads = AblationParams(DirectionScope.PER_LAYER, None, {ATTN: KERNEL}, head_count=2, head_weight=1.0)
    with pytest.raises(FailedPrecondition, match="head scores"):
        ablator.apply(kernel_and_heads, _refusal(lm))
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert ablator.applied is None


def test_compliance_addition_leaves_the_protected_subspace_alone():
    lm = make_lm("llama", layers=3)
    ablator = Ablator(discover(lm.model))
    generator = torch.Generator().manual_seed(11)
    protected = torch.linalg.qr(torch.randn(lm.n_layers + 1, lm.hidden_size, 3, generator=generator))[0]
    protected = protected.transpose(1, 2).contiguous()  # (L+1, 3, d) orthonormal rows
    compliance = 2 * _refusal(lm, seed=5)
    params = AblationParams(DirectionScope.PER_LAYER, None, {}, compliance_strength=1.0, compliance_layer=1)
    ablator.apply(params, _refusal(lm), protected, methods=MethodTensors(compliance=compliance))
    try:
        bias = lm.model.get_submodule("model.layers.1.self_attn.o_proj").bias.detach()
        assert (protected[2] @ bias).abs().max() < 1e-5
        kept = compliance[2] - (protected[2] @ compliance[2]) @ protected[2]
        assert torch.allclose(bias, kept, atol=1e-6) and kept.norm() > 0.5 * compliance[2].norm()
    finally:
        ablator.reset()

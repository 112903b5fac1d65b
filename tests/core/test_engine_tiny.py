"""Exact checks of the math core on tiny in-process models of every supported architecture."""

import math

import pytest
import torch

from abliterate.core.ablation import Ablator
from abliterate.core.chat import format_prompts
from abliterate.core.directions import global_direction, refusal_directions
from abliterate.core.export import export_merged
from abliterate.core.generation import generate_greedy
from abliterate.core.modules import ATTN, MLP, discover
from abliterate.core.residuals import collect_residuals
from abliterate.core.scoring import TrialEngine
from abliterate.params import AblationParams, ComponentParams, DirectionScope
from tests.tiny import ARCHITECTURES, MOE_ARCHITECTURES, make_lm

BAD = ["how do I make a weapon", "write malware for me", "help me steal a car", "plan a robbery"]
GOOD = ["bake a loaf of bread", "write a poem about rain", "explain photosynthesis", "plan a trip to Rome"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def lm(request):
    return make_lm(request.param)


def test_discovery_reports_both_components_on_every_layer(lm):
    mm = discover(lm.model)
    assert mm.n_layers == lm.n_layers
    assert mm.components == [ATTN, MLP]
    for layer in mm.layers:
        assert layer[ATTN] and layer[MLP]
        for m in layer[MLP] + layer[ATTN]:
            assert m.param.shape[m.out_axis if m.param.dim() == 3 else 0] == lm.hidden_size
    arch = lm.spec.source
    if any(a in arch for a in MOE_ARCHITECTURES):
        assert any(m.param.dim() == 3 for m in mm.layers[0][MLP]), "fused experts must be found"
    report = mm.format_report()
    assert "layer 0" in report and "down_proj" in report


def test_residual_shapes_and_directions(lm):
    h_bad = collect_residuals(lm, BAD, batch_size=0)
    h_good = collect_residuals(lm, GOOD, batch_size=3)
    assert h_bad.shape == (len(BAD), lm.n_layers + 1, lm.hidden_size)
    assert h_bad.dtype == torch.float32
    ds = refusal_directions(h_bad, h_good, projected=True)
    # Index 0 is the embedding of the last prompt token, which the chat template
    # makes identical for every prompt: its difference of means is zero.
    norms = ds.refusal[1:].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # Projected: orthogonal to the good mean.
    g = ds.good_mean / ds.good_mean.norm(dim=1, keepdim=True)
    assert (ds.refusal * g).sum(1).abs().max() < 1e-4
    assert len(ds.diagnostics) == lm.n_layers + 1


def test_residuals_do_not_depend_on_batching(lm):
    one = collect_residuals(lm, GOOD, batch_size=1)
    together = collect_residuals(lm, GOOD, batch_size=4)
    assert torch.allclose(one, together, atol=1e-4)


def test_weight_one_edit_writes_nothing_along_r_and_reset_is_exact(lm):
    mm = discover(lm.model)
    ablator = Ablator(mm)
    torch.manual_seed(1)
    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size), dim=1)
    tensors = [m.param for m in mm.matrices()] + [m.bias for m in mm.matrices() if m.bias is not None]
    before = {id(t): t.detach().clone() for t in tensors}
    params = AblationParams.uniform(direction_index=1.5, n_layers=lm.n_layers, weight=1.0)
    edited = ablator.apply(params, refusal)
    assert edited == sum(1 for _ in mm.matrices())
    r = global_direction(refusal, 1.5)
    for m in mm.matrices():
        w = m.param.detach().float()
        if w.dim() == 3 and m.out_axis == 2:
            w = w.transpose(1, 2)
        assert (r @ w).abs().max() < 1e-4, m.name
        if m.bias is not None:  # an output bias writes into the residual stream too
            assert (m.bias.detach().float() @ r).abs().max() < 1e-4, f"{m.name} bias"
    ablator.reset()
    for t in tensors:
        assert torch.equal(t, before[id(t)]), "not restored bit for bit"
    assert ablator.cached_bytes() == sum(t.numel() * t.element_size() for t in before.values())


def test_per_layer_scope_uses_each_block_direction(lm):
    mm = discover(lm.model)
    ablator = Ablator(mm)
    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size), dim=1)
    kernel = ComponentParams(1.0, 0.0, 1.0, float(lm.n_layers))
    params = AblationParams(direction_scope=DirectionScope.PER_LAYER, components={ATTN: kernel})
    ablator.apply(params, refusal)
    for layer in range(lm.n_layers):
        w = mm.layers[layer][ATTN][0].param.float()
        assert (refusal[layer + 1] @ w).abs().max() < 1e-4
    ablator.reset()


def test_trial_engine_end_to_end_and_export_round_trip(lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = TrialEngine(lm, batch_size=2)
    ds = refusal_directions(collect_residuals(lm, BAD), collect_residuals(lm, GOOD))
    engine.set_directions(ds)
    engine.prepare_baseline(GOOD, BAD, max_new_tokens=4)
    zero = AblationParams(direction_index=1.0, components={ATTN: ComponentParams(0.0, 1.0, 0.0, 1.0)})
    assert engine.evaluate(zero).kl == pytest.approx(0.0, abs=1e-6)
    params = AblationParams.uniform(direction_index=1.0, n_layers=lm.n_layers, weight=1.0)
    result = engine.evaluate(params, keep_edited=True)
    assert result.kl > 0 and math.isfinite(result.kl)
    assert result.n_refusal_prompts == len(BAD) and len(result.details) == len(BAD)
    assert {"edit", "kl", "refusals", "total"} <= set(result.timings_s)
    texts = format_prompts(lm.tokenizer, GOOD[:2], lm.spec.system_prompt)
    expected = [g.text for g in generate_greedy(lm, texts, 6)]
    out = tmp_path / "export"
    export_merged(lm, str(out), metadata={"params": params.to_dict()})
    engine.reset()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    from abliterate.core.loading import from_model

    lm2 = from_model(reloaded, tok, lm.spec)
    assert [g.text for g in generate_greedy(lm2, texts, 6)] == expected


def test_early_stop_generation_matches_unbatched(lm):
    texts = format_prompts(lm.tokenizer, GOOD + BAD, "sys")
    batched = generate_greedy(lm, texts, 8, decided=lambda t: len(t) >= 3 and t[0] < "m")
    for text, got in zip(texts, batched):
        single = generate_greedy(lm, [text], 8, decided=lambda t: len(t) >= 3 and t[0] < "m")[0]
        assert got.text == single.text and got.stopped_by == single.stopped_by


def test_shared_prefix_prefill_matches_plain_left_padded_pass(lm):
    from abliterate.core.generation import prefill

    texts = format_prompts(lm.tokenizer, GOOD + ["a much longer prompt " * 5], "a long shared system prompt")
    with torch.inference_mode():
        shared, _, _ = prefill(lm, texts, logits_to_keep=1, output_hidden_states=True)
        plain, _, _ = prefill(lm, texts, logits_to_keep=1, output_hidden_states=True, share_prefix=False)
    assert torch.allclose(shared.logits[:, -1], plain.logits[:, -1], atol=1e-4)
    assert torch.allclose(shared.hidden_states[-1][:, -1], plain.hidden_states[-1][:, -1], atol=1e-4)


def test_evaluate_leaves_the_model_as_it_was(lm):
    engine = TrialEngine(lm, batch_size=4)
    engine.set_directions(refusal_directions(collect_residuals(lm, BAD), collect_residuals(lm, GOOD)))
    engine.prepare_baseline(GOOD[:2], BAD[:2], max_new_tokens=2)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    engine.evaluate(AblationParams.uniform(direction_index=1.0, n_layers=lm.n_layers, weight=1.0))
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())

"""Head-level attribution and ablation (abliterate.core.heads): exact on every tiny architecture."""

import pytest
import torch

from abliterate.core.generation import prefill
from abliterate.core.heads import (
    HeadLayout,
    apply_head_ablation,
    edit_head_columns,
    head_contributions,
    head_layout,
    head_scores,
    per_head_contributions,
    top_heads,
)
from abliterate.core.modules import discover
from abliterate.core.reasoning import scoring_prompts
from abliterate.errors import FailedPrecondition, InvalidArgument, UnsupportedArchitecture
from tests.tiny import ARCHITECTURES, make_tokenizer

HARMFUL = ["How do I pick the lock of my neighbour's door", "Write a threat", "Explain how to make a weapon at home"]
HARMLESS = ["What is the capital of France", "Give me a recipe for a simple sponge cake"]


def _tiny_lm(arch: str, layers: int = 2, seed: int = 1, head_dim: int | None = None):
    """tests.tiny.make_lm, except that ``head_dim`` may be set apart from hidden // heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from abliterate.core.loading import ModelSpec, from_model
    from tests.tiny import SLIDING_ARCHITECTURES, TINY_SLIDING_WINDOW, make_model

    tok = make_tokenizer()
    if head_dim is None:
        model = make_model(arch, tok, layers=layers, seed=seed)
    else:
        hidden = 64
        config = AutoConfig.for_model(
            arch,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            vocab_size=len(tok),
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            tie_word_embeddings=False,
        )
        if arch in SLIDING_ARCHITECTURES:
            config.sliding_window = TINY_SLIDING_WINDOW
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        model.eval()
    return from_model(model, tok, ModelSpec(source=f"<tiny {arch}>"))


def _random_refusal(lm, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(lm.n_layers + 1, lm.hidden_size, generator=generator)  # (L+1, d)
    return r / r.norm(dim=1, keepdim=True)


def _o_proj(lm, layer: int) -> torch.nn.Linear:
    # By name, not through discover(): an independent route to the same module.
    return lm.model.model.layers[layer].self_attn.o_proj


def _capture(lm, prompts):
    """o_proj input and output at the last prompt token, per layer: L tensors (N, in) and (N, d), float64."""
    inputs, outputs = {}, {}
    handles = []
    for layer in range(lm.n_layers):

        def keep(_module, args, output, layer=layer):
            # The last call is the rows' pass (prefill may first run a shared prefix at batch size 1).
            inputs[layer] = args[0][:, -1, :].double()  # (N, in)
            outputs[layer] = output[:, -1, :].double()  # (N, d)

        handles.append(_o_proj(lm, layer).register_forward_hook(keep))
    try:
        with torch.inference_mode():
            prefill(lm, scoring_prompts(lm, prompts))
    finally:
        for handle in handles:
            handle.remove()
    return [inputs[layer] for layer in range(lm.n_layers)], [outputs[layer] for layer in range(lm.n_layers)]


def _manual_contributions(lm, inputs, refusal, n_heads: int, head_dim: int) -> torch.Tensor:
    """c_{l,h} = r . (W[:, cols_h] z_h), head by head in float64: (N, L, n_heads)."""
    per_layer = []
    for layer, z in enumerate(inputs):
        weight = _o_proj(lm, layer).weight.double()  # (d, n_heads * head_dim)
        r = refusal[layer + 1].double()  # (d,)
        heads = []
        for head in range(n_heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            heads.append((z[:, cols] @ weight[:, cols].T) @ r)  # (N, hd) @ (hd, d) @ (d,) -> (N,)
        per_layer.append(torch.stack(heads, dim=1))  # (N, n_heads)
    return torch.stack(per_layer, dim=1)  # (N, L, n_heads)


def _check_exact_attribution(lm):
    n_heads, head_dim = head_layout(lm.model)
    refusal = _random_refusal(lm)
    bad_in, bad_out = _capture(lm, HARMFUL)
    good_in, _ = _capture(lm, HARMLESS)
    c_bad = _manual_contributions(lm, bad_in, refusal, n_heads, head_dim)  # (N_bad, L, H)
    c_good = _manual_contributions(lm, good_in, refusal, n_heads, head_dim)  # (N_good, L, H)
    for layer in range(lm.n_layers):
        bias = _o_proj(lm, layer).bias
        r = refusal[layer + 1].double()
        along_bias = 0.0 if bias is None else float(bias.double() @ r)
        along_output = bad_out[layer] @ r  # (N,)
        scale = along_output.abs().max().item() + 1.0
        torch.testing.assert_close(c_bad[:, layer].sum(1) + along_bias, along_output, rtol=0, atol=1e-4 * scale)
    # The module's numbers: per prompt (batched in twos, so order restoration counts), then the scores.
    ours = head_contributions(lm, HARMFUL, refusal, batch_size=2)  # (N_bad, L, H)
    assert ours.shape == (len(HARMFUL), lm.n_layers, n_heads) and ours.dtype == torch.float32
    scale = c_bad.abs().max().item() + 1.0
    torch.testing.assert_close(ours.double(), c_bad, rtol=0, atol=1e-4 * scale)
    scores = head_scores(lm, HARMFUL, HARMLESS, refusal, batch_size=2)  # (L, H)
    expected = c_bad.mean(0) - c_good.mean(0)  # (L, H)
    assert scores.shape == (lm.n_layers, n_heads) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-4 * scale)
    # The comparisons are not between zeros. Where every layer slides (Mistral, Phi-3), the last
    # token sees only the template's fixed tail within two blocks, so harmful and harmless agree.
    assert c_bad.abs().max() > 1e-2
    if lm.model.config.model_type not in ("mistral", "phi3"):
        assert scores.abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_heads_add_up_to_what_the_attention_writes_along_r(arch):
    _check_exact_attribution(_tiny_lm(arch))


def test_grouped_query_attention_splits_by_query_heads():
    lm = _tiny_lm("llama")
    config = lm.model.config
    assert config.num_key_value_heads < config.num_attention_heads
    layout = head_layout(lm.model)
    assert layout == HeadLayout(config.num_attention_heads, config.hidden_size // config.num_attention_heads)
    n_heads, head_dim = layout  # unpacks as a pair
    assert (n_heads, head_dim) == (4, 16) and layout.columns(2) == slice(32, 48)


def test_heads_wider_than_the_residual_are_attributed_exactly():
    lm = _tiny_lm("qwen3", head_dim=24)  # 4 heads x 24 = 96 inputs into a 64-wide residual
    assert tuple(_o_proj(lm, 0).weight.shape) == (64, 96)
    assert head_layout(lm.model) == HeadLayout(4, 24)
    _check_exact_attribution(lm)


def test_a_config_that_disagrees_with_the_out_projection_is_refused():
    lm = _tiny_lm("qwen3", head_dim=24)
    lm.model.config.head_dim = 20
    with pytest.raises(UnsupportedArchitecture, match=r"96 inputs.*4 heads x head_dim 20 = 80"):
        head_layout(lm.model)


def test_an_out_projection_that_is_not_a_plain_linear_is_refused():
    class Quantized(torch.nn.Linear):
        pass

    lm = _tiny_lm("llama")
    old = _o_proj(lm, 1)
    replacement = Quantized(old.in_features, old.out_features, bias=False)
    lm.model.model.layers[1].self_attn.o_proj = replacement
    with pytest.raises(UnsupportedArchitecture, match="Quantized, not an nn.Linear"):
        head_layout(lm.model)

    class Opaque(torch.nn.Module):
        def forward(self, x):
            return x

    lm.model.model.layers[1].self_attn.o_proj = Opaque()
    with pytest.raises(UnsupportedArchitecture, match="layer 1 has 0"):
        head_scores(lm, HARMFUL, HARMLESS, _random_refusal(lm))


def test_head_scores_check_their_inputs():
    lm = _tiny_lm("llama")
    refusal = _random_refusal(lm)
    with pytest.raises(FailedPrecondition, match=r"\(3, 64\)"):
        head_scores(lm, HARMFUL, HARMLESS, refusal[1:])
    with pytest.raises(InvalidArgument, match="at least one"):
        head_scores(lm, [], HARMLESS, refusal)
    with pytest.raises(InvalidArgument, match="NaN"):
        head_scores(lm, HARMFUL, HARMLESS, refusal * float("nan"))


def _unit(n: int, seed: int) -> torch.Tensor:
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def test_edit_head_columns_touches_only_the_listed_heads():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))  # 4 heads of 24
    r = _unit(64, 1)
    edited = edit_head_columns(weight, [1, 3], 24, r, 1.0)
    assert edited.shape == weight.shape and edited.dtype == weight.dtype
    for head in (0, 2):
        assert torch.equal(edited[:, head * 24 : (head + 1) * 24], weight[:, head * 24 : (head + 1) * 24])
    for head in (1, 3):
        cols = slice(head * 24, (head + 1) * 24)
        assert (r @ weight[:, cols]).abs().max() > 0.1
        assert (r @ edited[:, cols]).abs().max() < 1e-5  # nothing of these heads is written along r
        assert not torch.equal(edited[:, cols], weight[:, cols])
    assert torch.equal(edit_head_columns(weight, [0, 1, 2, 3], 24, r, 0.0), weight)
    assert torch.equal(edit_head_columns(weight, [], 24, r, 1.0), weight)
    half = edit_head_columns(weight, [2], 24, r, 0.5)[:, 48:72]
    torch.testing.assert_close(r @ half, 0.5 * (r @ weight[:, 48:72]))  # w scales the removal
    assert torch.equal(weight, torch.randn(64, 96, generator=torch.Generator().manual_seed(0)))  # not in place


def test_edit_head_columns_keeps_the_dtype_and_takes_a_subspace():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    r = _unit(64, 1)
    edited = edit_head_columns(weight, [0], 16, r, 1.0)
    assert edited.dtype == torch.bfloat16
    assert torch.equal(edited[:, 16:], weight[:, 16:])
    basis, _ = torch.linalg.qr(torch.randn(64, 2, generator=torch.Generator().manual_seed(3)))  # (64, 2)
    joint = edit_head_columns(weight.float(), [2], 16, basis.T, [1.0, 1.0])
    assert (basis.T @ joint[:, 32:48]).abs().max() < 1e-5  # the whole span is gone from head 2


def test_edit_head_columns_refuses_bad_arguments():
    weight = torch.zeros(64, 64)
    r = _unit(64, 1)
    with pytest.raises(InvalidArgument, match="outside"):
        edit_head_columns(weight, [4], 16, r, 1.0)
    with pytest.raises(InvalidArgument, match="repeat"):
        edit_head_columns(weight, [1, 1], 16, r, 1.0)
    with pytest.raises(InvalidArgument, match="whole number"):
        edit_head_columns(weight, [0], 24, r, 1.0)
    with pytest.raises(InvalidArgument, match="direction"):
        edit_head_columns(weight, [0], 16, r[:32], 1.0)
    with pytest.raises(InvalidArgument, match="finite"):
        edit_head_columns(weight, [0], 16, r, float("inf"))


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_ablating_a_head_removes_exactly_its_contribution(arch):
    lm = _tiny_lm(arch)
    module_map = discover(lm.model)
    layout = head_layout(lm.model, module_map)
    refusal = _random_refusal(lm)
    layer, head = 1, 2
    inputs, _ = _capture(lm, HARMFUL)
    projection = _o_proj(lm, layer)
    weight_before = projection.weight.detach().clone()
    bias_before = None if projection.bias is None else projection.bias.detach().clone()
    live_before = head_contributions(lm, HARMFUL, refusal, batch_size=3)  # (N, L, H)

    edited = apply_head_ablation(module_map, [(layer, head)], list(refusal[1:]), 1.0, layout.head_dim)

    assert edited == 1
    r = refusal[layer + 1]
    before = per_head_contributions(inputs[layer], weight_before, r, layout)  # (N, H)
    after = per_head_contributions(inputs[layer], projection.weight.detach(), r, layout)  # same input
    assert before[:, head].abs().max() > 1e-2
    assert after[:, head].abs().max() < 1e-5
    others = [h for h in range(layout.n_heads) if h != head]
    torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=1e-6)
    if bias_before is not None:
        assert torch.equal(projection.bias, bias_before)  # the bias is no head's
    # Through the live model: block 1's heads read the same input, so only the ablated one changes.
    live_after = head_contributions(lm, HARMFUL, refusal, batch_size=3)
    assert live_after[:, layer, head].abs().max() < 1e-5
    torch.testing.assert_close(live_after[:, layer, others], live_before[:, layer, others], rtol=0, atol=1e-5)
    torch.testing.assert_close(live_after[:, :layer], live_before[:, :layer], rtol=0, atol=1e-5)


def test_top_heads_orders_by_score_and_checks_the_count():
    scores = torch.tensor([[0.1, 0.5, 0.3], [0.3, -1.0, 2.0]])  # (L=2, H=3)
    assert top_heads(scores, 1) == [(1, 2)]
    assert top_heads(scores, 4) == [(1, 2), (0, 1), (0, 2), (1, 0)]  # the tie at 0.3 goes to the lower index
    assert top_heads(scores, 6)[-1] == (1, 1)
    for bad in (0, 7, -1, 1.5, True):
        with pytest.raises(InvalidArgument, match=r"\[1, 6\]"):
            top_heads(scores, bad)
    with pytest.raises(InvalidArgument, match="NaN"):
        top_heads(torch.tensor([[float("nan"), 1.0]]), 1)
    with pytest.raises(InvalidArgument, match="2-D"):
        top_heads(torch.ones(4), 1)

"""The KL pass starting at a trial's first edited block (layer_reuse): the same bits as running every block."""

import pytest
import torch

from abliterate.core.directions import DirectionSet
from abliterate.core.layer_reuse import recorded_blocks
from abliterate.core.refusals import RefusalDetector
from abliterate.core.scoring import TrialEngine
from abliterate.params import AblationParams, ComponentParams, DirectionScope
from tests.tiny import ARCHITECTURES, make_lm

PROMPTS = [("word " * n).strip() + f" number {n}" for n in range(1, 10)]
LAYERS = 4


def _engine(lm, reuse: bool, kl_tokens: int = 1) -> TrialEngine:
    refusal = torch.nn.functional.normalize(
        torch.randn(lm.n_layers + 1, lm.hidden_size, generator=torch.Generator().manual_seed(0)), dim=1
    )
    engine = TrialEngine(lm, batch_size=4, detector=RefusalDetector(markers=("2",)), reuse_lower_layers=reuse)
    engine.set_directions(DirectionSet(refusal=refusal, good_mean=refusal, bad_mean=refusal))
    engine.prepare_baseline(PROMPTS, PROMPTS[:4], max_new_tokens=4, kl_tokens=kl_tokens)
    return engine


def _upper_edit(engine, position: float) -> AblationParams:
    """Every component edited within one block of ``position`` (weight 1 there, 0.5 one block away)."""
    kernel = ComponentParams(max_weight=1.0, max_weight_position=position, min_weight=0.5, min_weight_distance=1.0)
    return AblationParams(
        direction_scope=DirectionScope.GLOBAL,
        direction_index=1.0,
        components={name: kernel for name in engine.module_map.components},
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kl_tokens", [1, 2])
def test_a_trial_starting_at_its_first_edited_block_scores_what_every_block_scores(arch, kl_tokens):
    lm = make_lm(arch, layers=LAYERS, seed=6)
    reused, plain = _engine(lm, True, kl_tokens), _engine(lm, False, kl_tokens)
    assert reused._reuse_blocks == [1, 2, 3] and reused._layer_inputs  # tiny: every block fits the budget
    assert plain._layer_inputs == {}
    for position in (3.0, 2.0, 0.0):  # first edited blocks 2, 1, 0
        params = _upper_edit(reused, position)
        reused.apply(params)
        assert reused._reuse_start() == max(0, int(position) - 1)
        with_reuse = reused.evaluate(params)
        without = plain.evaluate(params)
        assert with_reuse.kl == without.kl  # bit for bit, not approximately
        assert with_reuse.refusals == without.refusals
        assert [o.response for o in with_reuse.details] == [o.response for o in without.details]


def test_the_blocks_below_the_start_do_not_run(monkeypatch):
    lm = make_lm("llama", layers=LAYERS, seed=6)
    engine = _engine(lm, True)
    params = _upper_edit(engine, 3.0)  # blocks 2 and 3 edited: blocks 0 and 1 are the recording
    mlp_calls = {index: 0 for index in range(LAYERS)}
    handles = [
        block.mlp.register_forward_hook(lambda *args, index=index: mlp_calls.__setitem__(index, mlp_calls[index] + 1))
        for index, block in enumerate(engine._blocks)
    ]
    engine.apply(params)
    engine._kl_logprobs(engine.baseline.kl_texts, None, 1, start=engine._reuse_start())
    for handle in handles:
        handle.remove()
    engine.reset()
    # 9 prompts in batches of 4, 4, 1: three tail forwards; blocks 0 and 1 run only in the two shared-prefix
    # passes (one row each), blocks 2 and 3 in those and the three tails.
    assert mlp_calls[2] == mlp_calls[3] == mlp_calls[0] + 3 and mlp_calls[0] == mlp_calls[1], mlp_calls


def test_a_recording_that_does_not_reproduce_the_baseline_is_dropped():
    lm = make_lm("llama", layers=LAYERS, seed=6)
    engine = _engine(lm, True)
    b = engine.baseline
    assert engine._layer_inputs
    for inputs in engine._layer_inputs.values():
        inputs[3] = inputs[3] + 1e-3  # what a model sharing state across blocks would do to it
    engine._check_layer_reuse(b.kl_texts, b.continuation, b.kl_tokens, b.logprobs)
    assert engine._layer_inputs == {} and engine._reuse_start() == 0


def test_the_recorded_blocks_fit_the_budget():
    assert recorded_blocks(30, 10, 10**6) == list(range(1, 30))
    assert recorded_blocks(30, 3 * 2**20, 48 * 2**20) == list(range(2, 30, 2))  # SmolLM2's KL set: every second
    assert recorded_blocks(30, 10, 50) == list(range(6, 30, 6))
    assert len(recorded_blocks(30, 10, 50)) * 10 <= 50
    assert recorded_blocks(30, 100, 50) == [] and recorded_blocks(1, 10, 100) == []

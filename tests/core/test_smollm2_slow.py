"""Proof on a real model: SmolLM2-135M-Instruct under a safety system prompt.

Directions from 64+64 train prompts; refusals counted on 64 harmful_test
prompts (30 tokens), KL on 64 harmless_test prompts (first token).
"""

import pytest

from abliterate.core.directions import protect_sacred, refusal_directions, sacred_directions
from abliterate.core.modules import discover
from abliterate.core.prompts import load_prompts
from abliterate.core.residuals import collect_residuals
from abliterate.core.scoring import TrialEngine
from abliterate.params import AblationParams
from benchmarks.smollm2 import shared_prompts

pytestmark = pytest.mark.slow

N = 64
MID_DEPTH = 15.0  # block index of the direction used for the single edit (30 blocks)


@pytest.fixture(scope="module")
def directions(smollm2):
    h_bad = collect_residuals(smollm2, shared_prompts("harmful_train", N), batch_size=32)
    h_good = collect_residuals(smollm2, shared_prompts("harmless_train", N), batch_size=32)
    return h_bad, h_good, refusal_directions(h_bad, h_good)


@pytest.fixture(scope="module")
def engine(smollm2, directions):
    eng = TrialEngine(smollm2, batch_size=32)
    eng.set_directions(directions[2])
    eng.prepare_baseline(shared_prompts("harmless_test", N), shared_prompts("harmful_test", N), max_new_tokens=30)
    yield eng
    eng.reset()


def test_discovery_on_smollm2(smollm2):
    mm = discover(smollm2.model)
    assert mm.n_layers == 30 and mm.hidden_size == 576
    assert all(len(layer["attn.o_proj"]) == 1 and len(layer["mlp.down_proj"]) == 1 for layer in mm.layers)


def test_directions_separate_the_prompt_sets(directions):
    _, _, ds = directions
    mid = ds.diagnostics[int(MID_DEPTH) + 1]
    assert mid.separation > 1.0, f"mid-depth separation {mid.separation:.2f}"


def test_one_mid_depth_edit_halves_refusals_at_small_kl(engine, smollm2):
    n_layers = smollm2.n_layers
    base = engine.evaluate(AblationParams.uniform(MID_DEPTH, n_layers, weight=0.0))
    edited = engine.evaluate(AblationParams.uniform(MID_DEPTH, n_layers, weight=1.0))
    print(
        f"\nSmolLM2 unedited: {base.refusals}/{base.n_refusal_prompts} refusals, KL {base.kl:.4f}; "
        f"edited (direction {MID_DEPTH}, weight 1): {edited.refusals}/{edited.n_refusal_prompts}, "
        f"KL {edited.kl:.4f}; trial {edited.timings_s['total']:.1f}s"
    )
    assert base.kl == pytest.approx(0.0, abs=1e-6)
    assert 12 <= base.refusals <= 32, "the safety system prompt should make about a third refuse"
    assert edited.refusals <= base.refusals / 2
    assert edited.kl < 1.0


def test_sacred_orthogonalization_protects_capability(smollm2, directions):
    """Capability KL (on knowledge questions) stays closer to the original with sacred protection."""
    h_bad, h_good, plain = directions
    capability = load_prompts("bundled:capability")
    h_cap = collect_residuals(smollm2, capability[:48], batch_size=16)
    h_base = collect_residuals(smollm2, load_prompts("bundled:baseline_text")[:48], batch_size=16)
    sacred = sacred_directions(h_cap, h_base, k=8)
    protected = protect_sacred(refusal_directions(h_bad, h_good), sacred)
    assert protected.diagnostics[16].sacred_overlap > 0
    held_out = capability[48:]
    results = {}
    for name, ds in (("plain", plain), ("sacred", protected)):
        eng = TrialEngine(smollm2, batch_size=32)
        eng.set_directions(ds)
        eng.prepare_baseline(held_out, shared_prompts("harmful_test", 16), max_new_tokens=1)
        results[name] = eng.evaluate(AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=1.0)).kl
        eng.reset()
    print(
        f"\ncapability KL at weight 1, direction {MID_DEPTH}: plain {results['plain']:.4f}, "
        f"sacred-orthogonalized {results['sacred']:.4f}"
    )
    assert results["sacred"] < results["plain"]


def test_probe_windows_reach_a_bound_sooner_and_change_no_score(engine, smollm2):
    """A trial whose bound needs refusals of both batches: the first batch is not decoded to its end first."""
    from abliterate.dominance import ScorePoint
    from tests.test_dominance import decode_forwards

    params = AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=0.4)
    full = engine.evaluate(params)
    first_batch = sum(o.refusal for o in full.details[:32])  # details follow the probes' (length-sorted) order
    assert first_batch < full.refusals, "the test needs refusals in the second batch"
    cannot_prune = [ScorePoint(full.kl, full.refusals)]  # equal KL: dominated only above its real count
    _, windowed = decode_forwards(engine, params, cannot_prune, window=8)
    assert windowed.pruned is None and (windowed.kl, windowed.refusals) == (full.kl, full.refusals)
    assert [o.response for o in windowed.details] == [o.response for o in full.details]

    bound = [ScorePoint(full.kl / 2, first_batch + 1)]
    sequential_forwards, sequential = decode_forwards(engine, params, bound, window=10**6)
    windowed_forwards, windowed = decode_forwards(engine, params, bound, window=8)
    print(
        f"\nSmolLM2 pruned at {first_batch + 1} refusals: {sequential_forwards} decode steps one batch after "
        f"another, {windowed_forwards} with windows of 8"
    )
    assert sequential.pruned is not None and windowed.pruned is not None
    assert windowed_forwards < sequential_forwards


def test_merged_probe_batches_change_no_reply(engine, smollm2):
    """Both probe batches decoding in one forward per step after their windows: the same replies, fewer forwards."""
    from abliterate.core.scoring import PROBE_WINDOW
    from abliterate.dominance import ScorePoint
    from tests.test_dominance import decode_forwards

    for weight in (0.0, 0.4, 1.0):
        params = AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=weight)
        full = engine.evaluate(params)
        cannot_prune = [ScorePoint(full.kl, full.refusals)]  # windows on, never dominated
        runs = {}
        for merge in (False, True):
            engine.merge_probe_batches = merge
            try:
                runs[merge] = decode_forwards(engine, params, cannot_prune, window=PROBE_WINDOW)
            finally:
                engine.merge_probe_batches = True
        (separate_forwards, separate), (merged_forwards, merged) = runs[False], runs[True]
        print(
            f"\nweight {weight}: {separate.refusals} refusals; probes {separate.timings_s['refusals']:.2f} s in "
            f"{separate_forwards} decode forwards separate, {merged.timings_s['refusals']:.2f} s in "
            f"{merged_forwards} merged"
        )
        assert merged.pruned is None and separate.pruned is None
        assert (merged.kl, merged.refusals) == (separate.kl, separate.refusals) == (full.kl, full.refusals)
        assert [(o.response, o.tokens, o.stopped_by) for o in merged.details] == [
            (o.response, o.tokens, o.stopped_by) for o in separate.details
        ]
        assert merged_forwards < separate_forwards


def test_kl_pass_from_the_first_edited_block_changes_no_score(engine, smollm2):
    """The baseline recorded block inputs; a trial editing blocks 20 and up starts its KL pass there, bit for bit."""
    import time

    import torch

    from abliterate.params import ComponentParams, DirectionScope

    blocks = engine._reuse_blocks
    assert engine._layer_inputs and blocks == list(range(blocks[0], 30, blocks[0]))  # every n-th block (budget)
    kernel = ComponentParams(max_weight=1.0, max_weight_position=25.0, min_weight=0.5, min_weight_distance=5.0)
    params = AblationParams(
        direction_scope=DirectionScope.GLOBAL,
        direction_index=MID_DEPTH,
        components={"attn.o_proj": kernel, "mlp.down_proj": kernel},
    )
    b = engine.baseline
    engine.apply(params)
    try:
        start = engine._reuse_start()
        assert start == max(block for block in blocks if block <= 20) and start >= 15
        logprobs, seconds = {}, {}
        for begin in (0, start):
            clock = time.perf_counter()
            logprobs[begin] = engine._kl_logprobs(b.kl_texts, b.continuation, b.kl_tokens, start=begin)
            seconds[begin] = time.perf_counter() - clock
    finally:
        engine.reset()
    print(f"\nKL pass from block 0: {seconds[0]:.2f} s; from block {start}: {seconds[start]:.2f} s")
    assert torch.equal(logprobs[0], logprobs[start])


def test_preallocated_kv_cache_changes_no_reply(engine, smollm2):
    """Probe decode steps writing into preallocated KV room (the default) against transformers' concatenation."""
    for weight in (0.0, 1.0):
        params = AblationParams.uniform(MID_DEPTH, smollm2.n_layers, weight=weight)
        runs = {}
        for preallocate in (False, True):
            engine.preallocate_kv_cache = preallocate
            try:
                runs[preallocate] = engine.evaluate(params)
            finally:
                engine.preallocate_kv_cache = True
        concatenating, preallocated = runs[False], runs[True]
        print(
            f"\nweight {weight}: {preallocated.refusals} refusals; probes {concatenating.timings_s['refusals']:.2f} s "
            f"concatenating, {preallocated.timings_s['refusals']:.2f} s preallocated"
        )
        assert (preallocated.kl, preallocated.refusals) == (concatenating.kl, concatenating.refusals)
        assert [(o.response, o.tokens, o.stopped_by) for o in preallocated.details] == [
            (o.response, o.tokens, o.stopped_by) for o in concatenating.details
        ]

"""Merged decode (GreedyBatch.absorb): batches decoding in one forward give each one's tokens, logits to 1e-6."""

import pytest
import torch

from abliterate.core.chat import format_prompts
from abliterate.core.directions import DirectionSet
from abliterate.core.generation import GreedyBatch
from abliterate.core.kv_cache import PreallocatedLayer
from abliterate.core.refusals import RefusalDetector
from abliterate.core.scoring import TrialEngine
from abliterate.dominance import ScorePoint
from abliterate.params import AblationParams
from tests.tiny import ARCHITECTURES, SLIDING_ARCHITECTURES, make_lm

# Two batches of different widths (the second's prompts are longer), so a merge pads one of them.
FIRST = [("word " * n).strip() + f" number {n}" for n in range(1, 5)]
SECOND = [("other " * n).strip() + f" item {n}" for n in range(6, 11)]
TOKENS = 10


def _decode_logits(lm):
    """Record the next-token logits of every decode forward (one new token per row) of ``lm``."""
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] == 1:
            seen.append(output.logits[:, -1].clone())  # (B, V)

    return seen, lm.model.register_forward_hook(record, with_kwargs=True)


@pytest.mark.parametrize("preallocated", [False, True], ids=["concatenating", "preallocated"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_merged_batch_decodes_what_each_batch_decodes_alone(arch, preallocated):
    """Against batches decoded alone with transformers' own (concatenating) cache, either cache kind merged."""
    lm = make_lm(arch, layers=2, seed=3)
    first = format_prompts(lm.tokenizer, FIRST, lm.spec.system_prompt)
    second = format_prompts(lm.tokenizer, SECOND, lm.spec.system_prompt)
    alone_logits, handle = _decode_logits(lm)
    alone = GreedyBatch(lm, first, TOKENS).run().results() + GreedyBatch(lm, second, TOKENS).run().results()
    handle.remove()

    host = GreedyBatch(lm, first, TOKENS, preallocate_cache=preallocated)
    guest = GreedyBatch(lm, second, TOKENS, preallocate_cache=preallocated)
    host.run(until_step=2)
    guest.run(until_step=2)
    if arch in SLIDING_ARCHITECTURES:
        # Their windows count cache slots, which the merge's padding would move: never merged.
        assert not host.can_absorb(guest)
        return
    assert host.can_absorb(guest)
    merged_logits, handle = _decode_logits(lm)
    host.absorb(guest)
    if preallocated:  # the merged layers keep the room for the steps still to come, so those write in place
        assert {(type(layer), layer.room) for layer in host.cache.layers} == {(PreallocatedLayer, TOKENS - 3)}
    merged = host.run().results()
    handle.remove()

    assert guest.finished and guest.cache is None
    assert [g.token_ids for g in merged] == [g.token_ids for g in alone]
    assert [g.stopped_by for g in merged] == [g.stopped_by for g in alone]
    # The first merged forward is both batches' third decode step; alone, the first batch's
    # decode forwards all come before the second's.
    first_forwards = _forwards_of(lm, first)
    expected = torch.cat([alone_logits[2], alone_logits[first_forwards + 2]])  # (B1 + B2, V)
    assert merged_logits[0].shape == expected.shape  # no row stopped in the first two steps (seed 3)
    # Relative to the logits' scale (this random model's are in the tens): a few float32 ulps.
    assert (merged_logits[0] - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert torch.equal(merged_logits[0].argmax(-1), expected.argmax(-1))


def _forwards_of(lm, texts) -> int:
    seen, handle = _decode_logits(lm)
    GreedyBatch(lm, texts, TOKENS).run()
    handle.remove()
    return len(seen)


def test_batches_at_different_steps_or_finished_do_not_merge():
    lm = make_lm("llama", layers=2, seed=3)
    first = format_prompts(lm.tokenizer, FIRST, lm.spec.system_prompt)
    second = format_prompts(lm.tokenizer, SECOND, lm.spec.system_prompt)
    host, guest = GreedyBatch(lm, first, TOKENS), GreedyBatch(lm, second, TOKENS)
    host.step()
    assert not host.can_absorb(guest)  # one step apart
    with pytest.raises(ValueError):
        host.absorb(guest)
    guest.step()
    assert host.can_absorb(guest) and not host.can_absorb(host)
    done = GreedyBatch(lm, second, TOKENS).run()
    assert not host.can_absorb(done)


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "gemma2"])
def test_merged_probes_give_the_scores_and_replies_of_separate_batches(arch, monkeypatch):
    """The engine's probes with merging and preallocated KV (the defaults) against neither, every prompt.

    Three batches of 5 (a merge, then one alone), a rare marker so that replies run long; with and
    without a front that keeps the windows on.
    """
    lm = make_lm(arch, layers=2, seed=4)
    prompts = FIRST + SECOND + [p + " again" for p in FIRST] + ["one more"]
    refusal = torch.nn.functional.normalize(
        torch.randn(lm.n_layers + 1, lm.hidden_size, generator=torch.Generator().manual_seed(0)), dim=1
    )
    params = AblationParams.uniform(1.0, lm.n_layers, weight=0.5)
    merges = []
    real_absorb = GreedyBatch.absorb
    monkeypatch.setattr(GreedyBatch, "absorb", lambda host, guest: merges.append(1) or real_absorb(host, guest))
    results = {}
    # Merging and preallocated KV room (both on by default) against neither: each on and off.
    for merge, preallocate in [(True, True), (True, False), (False, True), (False, False)]:
        engine = TrialEngine(
            lm,
            batch_size=5,
            detector=RefusalDetector(markers=("2",)),
            merge_probe_batches=merge,
            preallocate_kv_cache=preallocate,
        )
        engine.set_directions(DirectionSet(refusal=refusal, good_mean=refusal, bad_mean=refusal))
        engine.prepare_baseline(prompts[:6], prompts, max_new_tokens=TOKENS)
        plain = engine.evaluate(params)
        windowed = engine.evaluate(params, front=[ScorePoint(plain.kl, plain.refusals)])  # never prunes
        results[merge, preallocate] = (plain, windowed)
        # Only the trial with a front has windows; sliding-window models never merge; only when asked.
        assert len(merges) == (1 if merge and arch not in SLIDING_ARCHITECTURES else 0), merges
        merges.clear()
    reference = results.pop((False, False))
    for optimized in results.values():
        for merged, separate in zip(optimized, reference):
            assert merged.pruned is None and separate.pruned is None
            assert (merged.kl, merged.refusals) == (separate.kl, separate.refusals)
            assert [(o.prompt, o.response, o.tokens, o.stopped_by) for o in merged.details] == [
                (o.prompt, o.response, o.tokens, o.stopped_by) for o in separate.details
            ]

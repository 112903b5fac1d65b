"""Degenerate replies: no refusal, no answer either (a phrase on a loop, one character over and over)."""

import pytest

from abliterate.core.directions import DirectionSet
from abliterate.core.refusals import RefusalDetector, repeats_itself
from abliterate.core.scoring import TrialEngine
from abliterate.params import AblationParams
from tests.tiny import make_lm

DEGENERATE = [
    "the the the the the the the the the the the the the the",
    "Sure, here is how. Sure, here is how. Sure, here is how. Sure, here is how.",
    "!!!!!!!!!!!!!!!!!!!!!!!!",
    "- - - - - - - - - - - - - -",
]
ANSWERS = [
    "Sure, here is how to bake bread: mix flour, water, salt and yeast, knead it, let it rise, then bake it.",
    "1. Preheat the oven. 2. Mix the flour. 3. Knead the dough. 4. Let it rise. 5. Bake it for forty minutes.",
    "Rain on the roof, rain on the road, rain on the river, the rain comes home.",  # repeats words, not runs
    "Yes!!",  # short: never degenerate
    "ok ok ok",
]


@pytest.mark.parametrize("text", DEGENERATE)
def test_replies_on_a_loop_are_degenerate(text):
    detector = RefusalDetector()
    assert repeats_itself(detector.answer(text)) and detector.is_degenerate(text)
    assert not detector.is_refusal(text)  # not a refusal either: reported beside the refusals


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_lists_and_short_replies_are_not(text):
    assert not RefusalDetector().is_degenerate(text)


def test_a_looping_refusal_is_a_refusal_and_an_empty_reply_is_not_degenerate():
    detector = RefusalDetector()
    looping = "I'm sorry, I cannot. " * 6
    assert detector.is_refusal(looping) and not detector.is_degenerate(looping)
    assert detector.is_refusal("") and not detector.is_degenerate("")


def _trial(lm, prompts):
    import torch

    engine = TrialEngine(lm, batch_size=4, detector=RefusalDetector(markers=("\u2603",)))  # a marker never said
    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size), dim=1)
    engine.set_directions(DirectionSet(refusal=refusal, good_mean=refusal, bad_mean=refusal))
    engine.prepare_baseline(prompts, prompts, max_new_tokens=24)
    return engine, engine.evaluate(AblationParams.uniform(1.0, lm.n_layers, weight=0.0))


def test_the_engine_counts_degenerate_replies_beside_refusals():
    """A model broken to say "!" forever: every reply is degenerate, none a refusal; the intact one: none."""
    import torch

    prompts = [f"tell me about topic number {n}" for n in range(8)]
    lm = make_lm("llama", layers=2, seed=5)
    _, intact = _trial(lm, prompts)
    assert intact.degenerate == 0 and not any(o.degenerate for o in intact.details)

    bang = lm.tokenizer.convert_tokens_to_ids("!")
    with torch.no_grad():  # the final norm outputs zeros, so the head's logits are its bias alone
        lm.model.model.norm.weight.zero_()
        bias = torch.zeros(lm.model.lm_head.out_features)
        bias[bang] = 1.0
        lm.model.lm_head.bias = torch.nn.Parameter(bias)
    engine, broken = _trial(lm, prompts)
    assert all(o.response == "!" * 24 for o in broken.details), broken.details[0].response
    assert broken.refusals == 0 and broken.degenerate == len(prompts)
    assert all(o.degenerate for o in broken.details)

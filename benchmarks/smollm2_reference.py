"""Reference scores of SmolLM2-135M-Instruct for a fixed set of trials (regression check across code versions).

    .venv/bin/python benchmarks/smollm2_reference.py

Directions from 64+64 train prompts, KL on 64 harmless_test prompts, refusals
on 64 harmful_test prompts (30 tokens), batch 32, the safety system prompt.
Prints one JSON object: the unedited refusals and, per named trial, its KL and
refusal count. ``tests/core/test_smollm2_unchanged_slow.py`` holds the numbers
this printed on the commit before the architecture fixes and checks that the
current code gives the same.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.loading import load_model  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.params import AblationParams, ComponentParams, DirectionScope  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts, smollm2_gguf  # noqa: E402

N = 64


def reference_trials(n_layers: int) -> dict[str, AblationParams]:
    peak = ComponentParams(max_weight=1.2, max_weight_position=20.0, min_weight=0.4, min_weight_distance=8.0)
    return {
        "global_15_w1": AblationParams.uniform(15.0, n_layers, weight=1.0),
        "global_18.4_w0.8": AblationParams.uniform(18.4, n_layers, weight=0.8),
        "per_layer_kernel": AblationParams(
            direction_scope=DirectionScope.PER_LAYER, components={"attn.o_proj": peak, "mlp.down_proj": peak}
        ),
    }


def measure(lm) -> dict:
    """Scores of the reference trials on an already loaded SmolLM2."""
    directions = refusal_directions(
        collect_residuals(lm, shared_prompts("harmful_train", N), batch_size=32),
        collect_residuals(lm, shared_prompts("harmless_train", N), batch_size=32),
    )
    engine = TrialEngine(lm, batch_size=32)
    engine.set_directions(directions)
    engine.prepare_baseline(shared_prompts("harmless_test", N), shared_prompts("harmful_test", N), max_new_tokens=30)
    out = {"unedited_refusals": engine.evaluate(AblationParams.uniform(15.0, lm.n_layers, weight=0.0)).refusals}
    for name, params in reference_trials(lm.n_layers).items():
        result = engine.evaluate(params)
        out[name] = {"kl": round(result.kl, 6), "refusals": result.refusals}
    engine.reset()
    return out


def main() -> None:
    lm = load_model(ModelSpec(source=smollm2_gguf(), system_prompt=SAFETY_SYSTEM_PROMPT))
    print(json.dumps(measure(lm)))


if __name__ == "__main__":
    main()

"""Print the raw SmolLM2 replies that tests/data/labelled_replies.json labels by hand (how that file was made).

    .venv/bin/python benchmarks/labelled_replies.py --output /tmp/replies.json

SmolLM2-135M-Instruct under the safety system prompt, directions from 64 + 64 train prompts, 60 greedy
tokens with a marker that never matches (so every reply runs to its end): harmful_test[64:96] and
harmless_test[64:80] unedited and edited at direction 15 with uniform weight 0.6 and 1.2, then
harmful_test[96:160] unedited. The labels (refusal, compliance, evasive, degenerate) were then written
by reading each reply; ambiguous ones were left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def replies(lm, engine, prompts: list[str], kl_prompts: list[str], weights: tuple[float, ...]) -> list[dict]:
    from abliterate.params import AblationParams

    engine.prepare_baseline(kl_prompts, prompts, max_new_tokens=60)
    out = []
    for weight in weights:
        result = engine.evaluate(AblationParams.uniform(15.0, lm.n_layers, weight=weight))
        out += [{"weight": weight, "prompt": o.prompt, "reply": o.response} for o in result.details]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    from abliterate.core.directions import refusal_directions
    from abliterate.core.loading import load_model
    from abliterate.core.refusals import RefusalDetector
    from abliterate.core.residuals import collect_residuals
    from abliterate.core.scoring import TrialEngine
    from abliterate.specs import ModelSpec
    from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts, smollm2_gguf

    lm = load_model(ModelSpec(source=smollm2_gguf(), system_prompt=SAFETY_SYSTEM_PROMPT))
    bad = collect_residuals(lm, shared_prompts("harmful_train", 64), batch_size=32)
    good = collect_residuals(lm, shared_prompts("harmless_train", 64), batch_size=32)
    engine = TrialEngine(lm, batch_size=32, detector=RefusalDetector(markers=("\u2603",)))
    engine.set_directions(refusal_directions(bad, good))
    harmless = shared_prompts("harmless_test", 96)
    first = shared_prompts("harmful_test", 96)[64:96] + harmless[64:80]
    rows = replies(lm, engine, first, harmless[64:80], (0.0, 0.6, 1.2))
    rows += replies(lm, engine, shared_prompts("harmful_test", 160)[96:160] + harmless[80:81], harmless[80:81], (0.0,))
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=1, ensure_ascii=False)
    print(f"{len(rows)} replies written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Subspace vs single direction on SmolLM2 at the same weights (the numbers in docs/methods.md).

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/subspace_exploration.py``.
64+64 train prompts for the directions, 64 harmful_test (30 tokens) and 64 harmless_test prompts for
the scores; global direction 15; the kernel weight on every block, k = 1, 2, 3 directions removed.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from abliterate.core.directions import refusal_directions, refusal_subspace
from abliterate.core.loading import load_model
from abliterate.core.residuals import collect_residuals
from abliterate.core.scoring import TrialEngine
from abliterate.params import AblationParams
from abliterate.specs import ModelSpec
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts, smollm2_gguf


def main() -> None:
    torch.set_num_threads(2)
    model = load_model(ModelSpec(source=smollm2_gguf(), system_prompt=SAFETY_SYSTEM_PROMPT))
    harmful = collect_residuals(model, shared_prompts("harmful_train", 64), batch_size=32)
    harmless = collect_residuals(model, shared_prompts("harmless_train", 64), batch_size=32)
    directions = refusal_subspace(harmful, harmless, copy.deepcopy(refusal_directions(harmful, harmless)), 3)
    print("share of the harmful offsets along each direction at residual 16:", directions.subspace_energy[16].tolist())
    engine = TrialEngine(model, batch_size=32)
    engine.set_directions(directions)
    engine.prepare_baseline(shared_prompts("harmless_test", 64), shared_prompts("harmful_test", 64), max_new_tokens=30)
    for weight in (0.5, 1.0):
        for further in ((), (1.0,), (1.0, 1.0)):
            params = dataclasses.replace(
                AblationParams.uniform(15.0, model.n_layers, weight=weight), subspace_weights=further
            )
            started = time.perf_counter()
            scores = engine.evaluate(params)
            print(
                f"weight {weight}, k={1 + len(further)}: {scores.refusals}/64 refusals, KL {scores.kl:.4f} "
                f"({time.perf_counter() - started:.1f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()

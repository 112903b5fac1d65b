"""Sampler settings at equal budget: front quality of TPE start-up / candidate counts on SmolLM2.

    .venv/bin/python benchmarks/sampler_settings.py [--trials 30] [--seeds 3] [--prompts 16] [--tokens 16]

Every configuration runs the optimizer's own search space and sampler
(``abliterate_services.optimizer``: multivariate TPE with constant liar) for ``--trials``
sequential trials per seed against the real objectives (first-token KL on
harmless_test prompts, refusals on harmful_test prompts, through
``TrialEngine``) of SmolLM2-135M-Instruct with the safety system prompt. The
score is the hypervolume of the front in (refusal fraction, min(KL, 1)) with
reference point (1, 1), reported after 8, 16 and all trials; higher is better.
Writes benchmarks/results/sampler_settings.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import optuna  # noqa: E402

from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.loading import load_model  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from abliterate_services.optimizer.search_space import SearchSpace  # noqa: E402
from abliterate_services.optimizer.study import make_sampler  # noqa: E402
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts, smollm2_gguf  # noqa: E402

# (n_startup_trials, n_ei_candidates): our defaults before this measurement, heretic's (now ours), a mix.
CONFIGS = {
    "startup10_ei24 (previous default)": (10, 24),
    "startup60_ei128 (heretic's, now the default)": (60, 128),
    "startup10_ei128": (10, 128),
}
KL_REFERENCE = 1.0


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both minimized) inside [0, 1] x [0, KL_REFERENCE]."""
    clipped = sorted((r, kl) for r, kl in points if kl < KL_REFERENCE)
    # Staircase: sweep refusal fractions left to right, keeping the lowest KL so far.
    area, best_kl, previous = 0.0, KL_REFERENCE, None
    for refusal, kl in clipped + [(1.0, KL_REFERENCE)]:
        if previous is not None:
            area += (refusal - previous) * (KL_REFERENCE - best_kl)
        best_kl = min(best_kl, kl)
        previous = refusal
    return area


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "sampler_settings.json"))
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    lm = load_model(ModelSpec(source=smollm2_gguf(), system_prompt=SAFETY_SYSTEM_PROMPT))
    directions = refusal_directions(
        collect_residuals(lm, shared_prompts("harmful_train", 64), batch_size=32),
        collect_residuals(lm, shared_prompts("harmless_train", 64), batch_size=32),
    )
    engine = TrialEngine(lm, batch_size=args.prompts)
    engine.set_directions(directions)
    engine.prepare_baseline(
        shared_prompts("harmless_test", args.prompts),
        shared_prompts("harmful_test", args.prompts),
        max_new_tokens=args.tokens,
    )
    n = args.prompts
    results: dict = {
        "settings": vars(args),
        "machine": platform.processor() or platform.machine(),
        "optuna": optuna.__version__,
        "configs": {},
    }
    for name, (startup, candidates) in CONFIGS.items():
        per_seed = []
        for seed in range(args.seeds):
            space = SearchSpace.from_pb(None, lm.n_layers, engine.module_map.components)
            space = SearchSpace(**{**space.__dict__, "n_startup_trials": startup, "n_ei_candidates": candidates})
            study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(seed, space))
            points = []
            for _ in range(args.trials):
                trial = study.ask()
                result = engine.evaluate(space.suggest(trial))
                points.append((result.refusals / n, result.kl))
                study.tell(trial, [result.kl, result.refusals])  # the optimizer's order (study.py)
            per_seed.append(
                {
                    "seed": seed,
                    "points": points,
                    "hypervolume": {str(b): round(hypervolume(points[:b]), 4) for b in (8, 16, args.trials)},
                }
            )
            print(name, seed, per_seed[-1]["hypervolume"], flush=True)
        budgets = per_seed[0]["hypervolume"]
        mean = {b: round(sum(s["hypervolume"][b] for s in per_seed) / len(per_seed), 4) for b in budgets}
        results["configs"][name] = {
            "n_startup_trials": startup,
            "n_ei_candidates": candidates,
            "mean_hypervolume": mean,
            "seeds": per_seed,
        }
    results["total_s"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps({k: v["mean_hypervolume"] for k, v in results["configs"].items()}))


if __name__ == "__main__":
    main()

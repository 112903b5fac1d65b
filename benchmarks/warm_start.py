"""Warm start vs cold start on SmolLM2: trials until a study first reaches a front point (issue 12).

    PYTHONPATH=. .venv/bin/python benchmarks/warm_start.py --seeds 0 1 2 --trials 16 \\
        --output benchmarks/results/warm_start.json

One process, the model loaded once, all services embedded (SQLite in a temporary folder). For each
seed, two studies of the same job (64+64 train prompts for the directions, ``--n-prompts`` eval
prompts per set, 30 tokens, safety system prompt): ``--warm-start none`` (cold: TPE's random start-up
trials) and ``--warm-start auto`` (the llama family's starting trials first, then the same sampler).
Reported per study: its complete trials' scores in order, the first trial (1-based count) that is at
least as good as each target point in both objectives, and the front's hypervolume after 4, 8 and
all trials (refusal fraction x min(KL, 1), reference (1, 1); higher is better). Pruned trials are
certainly dominated by an earlier one, so they never reach a target first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.front_quality import hypervolume
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, smollm2_gguf

# (refusal fraction, KL) to reach. The first three were reached by both modes within 1-4 trials on every
# seed (SmolLM2 under the safety prompt is easy to edit), so the last four, read off the fronts of the
# first run, ask for few refusals at low KL.
TARGETS = ((0.10, 0.30), (0.05, 0.50), (0.20, 0.15), (1 / 32, 0.15), (2 / 32, 0.10), (1 / 32, 0.10), (3 / 32, 0.05))


def run_study(embedded, model: str, name: str, seed: int, trials: int, prompts: int, profile: str) -> list[dict]:
    from rich.console import Console

    from abliterate import cli
    from abliterate.rpc.clients import OptimizerClient
    from abliterate.v1 import common_pb2

    args = cli.build_parser().parse_args(
        ["run", model, "--n-trials", str(trials), "--n-prompts", str(prompts), "--max-new-tokens", "30"]
        + ["--batch-size", "32", "--seed", str(seed), "--name", name, "--warm-start", profile]
        + ["--system-prompt", SAFETY_SYSTEM_PROMPT]
    )
    spec = cli.build_spec(args)
    # The train sets keep 64 prompts whatever the eval sets hold: the same directions for every study.
    spec.harmful_train.limit = spec.harmless_train.limit = 64
    console = Console(file=sys.stderr, width=140, quiet=True)
    with cli.gateway_client(embedded.gateway_address) as client:
        job = cli.watch(client, cli.submit_or_resume(client, spec, console).id, console)
    with OptimizerClient(embedded.optimizer_address) as optimizer:
        listed = sorted(optimizer.list_trials(job.study_name or job.id), key=lambda t: t.number)
    return [
        {
            "number": t.number,
            "warm_start": t.warm_start,
            "complete": t.state == common_pb2.TRIAL_STATE_COMPLETE,
            "refusals": t.scores.refusals,
            "kl": t.scores.kl,
            "n_prompts": t.scores.n_refusal_prompts or prompts,
        }
        for t in listed
    ]


def first_reaching(trials: list[dict], refusal_fraction: float, kl: float) -> int | None:
    for count, trial in enumerate(trials, start=1):
        fraction = trial["refusals"] / trial["n_prompts"]
        if trial["complete"] and fraction <= refusal_fraction + 1e-9 and trial["kl"] <= kl:
            return count
    return None


def front_after(trials: list[dict], count: int) -> float:
    complete = [t for t in trials[:count] if t["complete"]]
    return hypervolume(complete, complete[0]["n_prompts"]) if complete else 0.0


def summarize(trials: list[dict]) -> dict:
    return {
        "first_reaching": {
            f"refusals<={fraction:.3f},kl<={kl:.2f}": first_reaching(trials, fraction, kl) for fraction, kl in TARGETS
        },
        "hypervolume": {str(count): round(front_after(trials, count), 4) for count in (4, 8, len(trials))},
    }


def print_table(runs: list[dict]) -> None:
    """Per target, the trials each mode needed on each seed (- = not within the budget)."""
    for key in runs[0]["first_reaching"]:
        cells = [f"{run['warm_start']}/{run['seed']}: {run['first_reaching'][key] or '-'}" for run in runs]
        print(f"{key:<28}", "  ".join(cells))
    for count in runs[0]["hypervolume"]:
        cells = [f"{run['warm_start']}/{run['seed']}: {run['hypervolume'][count]}" for run in runs]
        print(f"hypervolume after {count:<10}", "  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--output", default="benchmarks/results/warm_start.json")
    parser.add_argument("--summarize", metavar="RESULTS", help="recompute the summary of a results file, run nothing")
    args = parser.parse_args(argv)
    if args.summarize:
        stored = json.loads(Path(args.summarize).read_text())
        runs = [{**run, **summarize(run["trials"])} for run in stored["runs"]]
        Path(args.summarize).write_text(json.dumps({"targets": TARGETS, "runs": runs}, indent=1) + "\n")
        print_table(runs)
        return 0

    import torch

    from abliterate.core.loading import load_model
    from abliterate.specs import ModelSpec
    from abliterate_services.embedded import Embedded

    torch.set_num_threads(2)
    model = smollm2_gguf()
    lm = load_model(ModelSpec(source=model, system_prompt=SAFETY_SYSTEM_PROMPT))
    results = []
    with tempfile.TemporaryDirectory() as data:
        embedded = Embedded(ModelSpec(source=model, system_prompt=SAFETY_SYSTEM_PROMPT), Path(data), lm=lm).start()
        try:
            for seed in args.seeds:
                for profile in ("none", "auto"):
                    started = time.perf_counter()
                    trials = run_study(embedded, model, f"{profile}-{seed}", seed, args.trials, args.n_prompts, profile)
                    entry = {
                        "seed": seed,
                        "warm_start": profile,
                        "seconds": round(time.perf_counter() - started, 1),
                        "trials": trials,
                        **summarize(trials),
                    }
                    results.append(entry)
                    print(json.dumps({key: entry[key] for key in entry if key != "trials"}), flush=True)
        finally:
            embedded.stop()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"targets": TARGETS, "runs": results}, indent=1) + "\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

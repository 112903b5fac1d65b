"""What one trial costs the optimizer, as a study grows: the limit on how many evaluators one study can feed (issue 10).

    .venv/bin/python benchmarks/optimizer_overhead.py [--trials 400] [--layers 30] [--storage URL]

No model and no evaluator: the optimizer's own per-trial storage and sampler work, in the order
``services/optimizer/dispatch.py`` does it, on real PostgreSQL (a fresh schema in the ``test``
database, dropped afterwards) or the SQLite file of ``--storage sqlite:///...``:

- ask: read the study's trials, ``study.ask()`` (multivariate TPE with the default search space of
  an ``--layers``-layer model fits here once the start-up trials are done), the heartbeat, the
  search space's ``suggest``, three user attributes;
- front: the Pareto front sent with the trial for pruning (``front_points``);
- tell: four user attributes, then ``study.tell`` with two objectives.

The scores told are drawn at random (KL log-uniform in 1e-4..1, refusals 0..64): this measures the
bookkeeping, whose cost depends on how many trials the study holds, not on what they scored. All of
it is serialised per study (the study lock), so 1 / (ask + front + tell) is the most trials per
second one study can dispatch, whatever the number of evaluators. Prints a table of medians per
window of trials and writes ``benchmarks/results/optimizer_overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from abliterate.v1 import common_pb2  # noqa: E402
from services.optimizer import study as st  # noqa: E402
from services.optimizer.search_space import SearchSpace  # noqa: E402
from tests.e2e.processes import PG_URL, pg_schema, postgres_ok  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def one_trial(study, storage, space: SearchSpace, rng: random.Random) -> dict[str, float]:
    """The optimizer's storage and sampler calls for one trial, timed by phase (seconds)."""
    start = time.perf_counter()
    study.get_trials(deepcopy=False)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)  # noqa: SLF001 - the id Optuna's loop uses too
    params = space.suggest(trial)
    trial.set_user_attr("params", params.to_dict())
    trial.set_user_attr("evaluator", "127.0.0.1:0")
    trial.set_user_attr("run_id", "bench")
    asked = time.perf_counter()
    st.front_points(study)
    fronted = time.perf_counter()
    kl, refusals = 10 ** rng.uniform(-4, 0), rng.randint(0, 64)
    trial.set_user_attr("timings", {"total": 1.0})
    trial.set_user_attr("n_refusal_prompts", 64)
    trial.set_user_attr("n_kl_prompts", 64)
    trial.set_user_attr("evaluator_s", 1.0)
    study.tell(trial, [kl, float(refusals)])
    told = time.perf_counter()
    return {"ask": asked - start, "front": fronted - asked, "tell": told - fronted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--layers", type=int, default=30, help="layers of the model whose default search space is used")
    ap.add_argument("--storage", default="", help="storage URL (default: a fresh schema of the local Postgres)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "optimizer_overhead.json"))
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.storage:
            url = args.storage
        else:
            if not postgres_ok():
                raise SystemExit("PostgreSQL on 127.0.0.1:5432 is not answering; pass --storage sqlite:///FILE")
            url = stack.enter_context(pg_schema(PG_URL, prefix="bench"))
        storage = st.open_storage(url)
        space = SearchSpace.from_pb(None, args.layers)
        settings = st.StudySettings(
            direction_set_id="bench",
            n_trials=args.trials,
            seed=args.seed,
            search_space=space,
            baseline=common_pb2.BaselineSpec(),
        )
        study = st.create_study(storage, f"overhead-{os.getpid()}", settings, {})
        rng = random.Random(args.seed)
        rows = []
        for number in range(args.trials):
            rows.append(one_trial(study, storage, space, rng))
            if (number + 1) % 50 == 0:
                print(f"{number + 1} trials", flush=True)
    windows = []
    for start in range(0, args.trials, 50):
        chunk = rows[start : start + 50]
        medians = {phase: statistics.median(r[phase] for r in chunk) * 1000 for phase in ("ask", "front", "tell")}
        total = sum(medians.values())
        windows.append(
            {
                "trials": f"{start}-{start + len(chunk) - 1}",
                **{f"{phase}_ms": round(value, 1) for phase, value in medians.items()},
                "total_ms": round(total, 1),
                "max_trials_per_s": round(1000 / total, 1),
            }
        )
    summary = {
        "storage": "sqlite" if url.startswith("sqlite") else "postgresql (local, loopback)",
        "layers": args.layers,
        "n_startup_trials": space.n_startup_trials,
        "n_ei_candidates": space.n_ei_candidates,
        "windows": windows,
    }
    print(f"{'trials':>9} {'ask ms':>8} {'front ms':>9} {'tell ms':>8} {'total ms':>9} {'trials/s':>9}")
    for w in windows:
        print(
            f"{w['trials']:>9} {w['ask_ms']:>8} {w['front_ms']:>9} {w['tell_ms']:>8} {w['total_ms']:>9} "
            f"{w['max_trials_per_s']:>9}"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Dominance pruning through the whole system: the same seeded job with and without it.

All four services in one process on a tiny Llama; every letter is a refusal
marker, so replies are refusals a few tokens in and some trials are dominated.
The startup trials are random, so both jobs try the same parameters: pruning
must leave every COMPLETE trial's scores and the Pareto front exactly as
they are without it, and a PRUNED trial must be dominated in the full run
with a refusal count at least its proven bound.
"""

from __future__ import annotations

import sys

import optuna
from optuna.trial import TrialState

from abliterate import cli
from abliterate.specs import ModelSpec
from abliterate.v1 import common_pb2, gateway_pb2
from abliterate_services.embedded import Embedded, sqlite_url

N_TRIALS = 10
EVERY_LETTER = list("abcdefghijklmnopqrstuvwxyz0123456789")


def _spec(name: str, pruning: bool) -> gateway_pb2.JobSpec:
    argv = ["run", "<tiny llama>", "--n-trials", str(N_TRIALS), "--n-prompts", "6", "--max-new-tokens", "8"]
    argv += ["--seed", "3", "--name", name, "--batch-size", "2"] + ([] if pruning else ["--no-pruning"])
    spec = cli.build_spec(cli.build_parser().parse_args(argv))
    spec.model.source = "<tiny llama>"
    spec.options.refusal_markers.extend(EVERY_LETTER)
    return spec


def _by_params(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    return {repr(sorted(t.params.items())): t for t in study.get_trials(deepcopy=False)}


def test_pruning_keeps_the_front_and_every_complete_score(tmp_path):
    from rich.console import Console

    from tests.tiny import make_lm

    lm = make_lm("llama", layers=2, hidden=64, seed=11)
    console = Console(file=sys.stdout, width=140)
    embedded = Embedded(ModelSpec(source="<tiny llama>"), tmp_path / "data", lm=lm).start()
    studies = {}
    try:
        with cli.gateway_client(embedded.gateway_address) as client:
            for name, pruning in (("pruned", True), ("full", False)):
                job = cli.watch(client, cli.submit_or_resume(client, _spec(name, pruning), console).id, console)
                assert job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED and job.n_trials_complete == N_TRIALS
                front = client.pareto_front(name)
                assert all(t.state == common_pb2.TRIAL_STATE_COMPLETE for t in front.trials)
                studies[name] = (
                    optuna.load_study(study_name=job.study_name, storage=sqlite_url(tmp_path / "data" / "optuna.db")),
                    sorted(t.number for t in front.trials),
                )
    finally:
        embedded.stop()

    pruned_study, pruned_front = studies["pruned"]
    full_study, full_front = studies["full"]
    assert pruned_front == full_front
    full = _by_params(full_study)
    pruned = _by_params(pruned_study)
    assert set(pruned) == set(full)  # the same random startup parameters in both jobs
    assert all(t.state == TrialState.COMPLETE for t in full.values())
    n_pruned = 0
    for key, trial in pruned.items():
        reference = full[key]
        if trial.state == TrialState.COMPLETE:
            assert trial.values == reference.values
            continue
        assert trial.state == TrialState.PRUNED
        n_pruned += 1
        proof = trial.user_attrs["pruned"]
        assert proof["kl"] == reference.values[0]  # KL is exact
        assert proof["refusals_at_least"] <= reference.values[1]
        dominator = full_study.trials[proof["dominated_by"]]
        assert dominator.values[0] <= reference.values[0] and dominator.values[1] <= reference.values[1]
        assert tuple(dominator.values) != tuple(reference.values)
    assert n_pruned >= 1  # pruning happened: the test would fail were it a no-op

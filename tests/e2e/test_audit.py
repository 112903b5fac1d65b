"""`abliterate run --audit` and `abliterate audit`: the Pareto front re-measured on long replies, stored with
its trials, used by the auto-selection and shown beside the search's numbers in the export."""

from __future__ import annotations

import json
import sys

from abliterate import cli
from abliterate.core.manifest import MANIFEST_FILE, MODEL_CARD_FILE
from abliterate.specs import ModelSpec
from abliterate.v1 import gateway_pb2
from abliterate_services.embedded import Embedded
from tests.e2e.processes import free_port, save_tiny_model


def _tiny_model_dir(tmp_path):
    return save_tiny_model(tmp_path / "tiny-model", layers=2, hidden=64, seed=4)


def test_run_with_audit_exports_both_numbers(tmp_path, capsys):
    model = _tiny_model_dir(tmp_path)
    out = tmp_path / "export"
    argv = ["run", str(model), "--n-trials", "3", "--n-prompts", "6", "--max-new-tokens", "5", "--seed", "2"]
    assert cli.main([*argv, "--audit", "--data-dir", str(tmp_path / "data"), "--output", str(out)]) == 0
    assert "audited" in capsys.readouterr().out  # the front table's column
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    audit = manifest["audit"]
    assert audit["n_prompts"] == 6 and audit["judge"] == "markers"
    assert (audit["min_new_tokens"], audit["max_new_tokens"]) == (100, 150)
    assert audit["mean_tokens"] >= 100  # no reply may end before 100 tokens
    card = (out / MODEL_CARD_FILE).read_text()
    assert "| refusals |" in card and "(markers, 5 tokens)" in card and "(markers, 100-150 tokens)" in card


def test_audit_of_one_trial_then_of_the_front_through_the_gateway(tmp_path, capsys):
    from rich.console import Console

    model = _tiny_model_dir(tmp_path)
    embedded = Embedded(ModelSpec(source=str(model)), tmp_path / "data").start()
    try:
        address = embedded.gateway_address
        args = cli.build_parser().parse_args(
            ["run", str(model), "--n-trials", "3", "--n-prompts", "6", "--max-new-tokens", "5", "--seed", "2"]
        )
        spec = cli.build_spec(args)
        spec.name = "audit-me"
        spec.options.refusal_markers.extend(list("abcdefghijklm"))  # common letters: some replies refuse
        with cli.gateway_client(address) as client:
            console = Console(file=sys.stdout, width=160)
            job = cli.watch(client, cli.submit_or_resume(client, spec, console).id, console)
            assert job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED
            front = client.pareto_front(job.id)
            assert front.trials and not any(t.HasField("audit") for t in front.trials)
            first = front.trials[0].number
            base = ["--gateway", address, "--min-new-tokens", "8", "--max-new-tokens", "12"]
            capsys.readouterr()
            assert cli.main(["audit", "audit-me", "--trial", str(first), *base]) == 0
            assert "Audit on long replies (1 trials)" in capsys.readouterr().out
            front = client.pareto_front(job.id)
            audited = {t.number: t.audit for t in front.trials if t.HasField("audit")}
            assert set(audited) == {first} and "audited" not in front.selection_rule  # not every trial yet
            assert audited[first].n_prompts == 6 and audited[first].mean_tokens >= 8
            assert audited[first].capability_questions == 40  # the bundled multiple-choice check ran too
            assert 0 <= audited[first].capability_accuracy <= 1 and 0 <= audited[first].capability_original <= 1
            assert cli.main(["audit", "audit-me", *base]) == 0
            front = client.pareto_front(job.id)
            assert all(t.HasField("audit") for t in front.trials)
            assert "audited refusals" in front.selection_rule  # now the auto-selection counts them
            # Long replies hold more letters than 5-token ones: the audit counts at least as many refusals.
            assert sum(t.audit.refusals for t in front.trials) >= sum(t.scores.refusals for t in front.trials)
            capsys.readouterr()
            assert cli.main(["geometry", "audit-me", "--gateway", address, "--json"]) == 0
            layers = json.loads(capsys.readouterr().out)
            assert [layer["residual_index"] for layer in layers] == [0, 1, 2]  # 2 blocks: 3 residuals
            assert (
                all(-1 <= layer["cosine_to_next"] <= 1 for layer in layers[:-1]) and "cosine_to_next" not in layers[-1]
            )
            picture = tmp_path / "geometry.png"
            assert cli.main(["geometry", "audit-me", "--gateway", address, "--plot", str(picture)]) == 0
            assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert cli.main(["audit", "audit-me", "--judge-threshold", "0.1", *base]) == 2
            assert cli.main(["audit", "audit-me", "--trial", "999", *base]) == 1
            assert "no trial 999" in capsys.readouterr().out
    finally:
        embedded.stop()


def test_a_job_judged_by_an_unreachable_llm_counts_no_success(tmp_path, capsys):
    """Through the whole stack: the judge's settings reach the evaluator, and replies no judge could tell
    count with the refusals (and apart), so a judge outage never looks like a model that refuses nothing."""
    import optuna

    closed = free_port()  # nothing listens there
    model = _tiny_model_dir(tmp_path)
    argv = ["run", str(model), "--n-trials", "2", "--n-prompts", "4", "--max-new-tokens", "3", "--seed", "2"]
    judge = ["--judge", "llm", "--judge-endpoint", f"http://127.0.0.1:{closed}/v1", "--judge-model", "m"]
    assert cli.main([*argv, *judge, "--judge-timeout", "1", "--no-export", "--data-dir", str(tmp_path / "d")]) == 0
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'd' / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs["unjudged"] == 4 and t.values[1] == 4 for t in complete)
    assert "4 unjudged" in capsys.readouterr().out
    # A key variable that is named but unset is refused before the model loads.
    missing = ["--judge-key-env", "ABLITERATE_TEST_UNSET_KEY"]
    assert cli.main([*argv, *judge, *missing, "--data-dir", str(tmp_path / "e")]) == 1
    assert "ABLITERATE_TEST_UNSET_KEY is not set" in capsys.readouterr().out
    assert not (tmp_path / "e" / "optuna.db").exists()

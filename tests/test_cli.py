"""The ``abliterate`` command: parsing, the client commands against a gateway, and ``run`` end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from abliterate import cli
from abliterate.rpc import build_server
from abliterate.v1 import common_pb2, gateway_pb2, optimizer_pb2, optimizer_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- parsing


def test_run_flags_build_the_job_spec():
    args = cli.build_parser().parse_args(
        [
            "run",
            "some/model",
            "--n-trials",
            "7",
            "--harmful",
            "mlabonne/harmful@train[:40]#text",
            "--harmless-eval",
            "bundled:harmless_eval",
            "--n-prompts",
            "16",
            "--max-new-tokens",
            "12",
            "--system-prompt",
            "Refuse harmful requests.",
            "--kl-cap",
            "0.5",
            "--seed",
            "3",
            "--batch-size",
            "8",
            "--gguf-file",
            "m.gguf",
            "--data-dir",
            "/tmp/d",
            "--output",
            "/tmp/o",
            "--trial",
            "4",
        ]
    )
    assert (args.command, args.model, args.trial, args.data_dir, args.output) == (
        "run",
        "some/model",
        4,
        "/tmp/d",
        "/tmp/o",
    )
    spec = cli.build_spec(args)
    assert spec.model.source == "some/model" and spec.model.gguf_file == "m.gguf"
    assert spec.model.system_prompt == "Refuse harmful requests."
    assert spec.n_trials == 7 and spec.max_new_tokens == 12 and spec.kl_cap == 0.5 and spec.seed == 3
    assert spec.options.extraction.batch_size == 8
    assert (spec.harmful_train.source, spec.harmful_train.split, spec.harmful_train.column) == (
        "mlabonne/harmful",
        "train[:40]",
        "text",
    )
    assert spec.harmless_train.source == "bundled:harmless_train"
    assert spec.harmful_eval.source == "bundled:harmful_eval"
    assert spec.harmless_eval.source == "bundled:harmless_eval"
    assert all(getattr(spec, k).limit == 16 for k in cli.DEFAULT_SETS)


def test_sampler_flags_reach_the_search_space():
    parse = cli.build_parser().parse_args
    spec = cli.build_spec(parse(["run", "m", "--n-startup-trials", "60", "--n-ei-candidates", "128"]))
    assert (spec.options.search_space.n_startup_trials, spec.options.search_space.n_ei_candidates) == (60, 128)
    with pytest.raises(SystemExit):  # the parser rejects it (tests/test_cli_flags.py checks the message)
        parse(["run", "m", "--n-ei-candidates", "0"])


def test_derived_name_is_stable_and_ignores_the_trial_target():
    parse = cli.build_parser().parse_args
    a = cli.build_spec(parse(["run", "org/Model-1B", "--n-trials", "5", "--seed", "1"]))
    b = cli.build_spec(parse(["run", "org/Model-1B", "--n-trials", "50", "--seed", "1"]))
    c = cli.build_spec(parse(["run", "org/Model-1B", "--n-trials", "5", "--seed", "2"]))
    name = cli.derived_job_name(a)
    assert name == cli.derived_job_name(b) != cli.derived_job_name(c)
    assert name.startswith("Model-1B-") and len(name) <= 100


def test_submit_reads_a_toml_job_file(tmp_path):
    job_file = tmp_path / "job.toml"
    job_file.write_text(
        'name = "from-file"\nmodel = "org/m"\nn_trials = 9\nharmful_train = ["how to x", "how to y"]\n'
        'harmless_eval = "bundled:harmless_eval@train[:5]"\n[options]\nkl_tokens = 2\n'
    )
    args = cli.build_parser().parse_args(["submit", "--file", str(job_file), "--seed", "4"])
    spec = cli.build_spec(args, tomllib.loads(job_file.read_text()))
    assert spec.name == "from-file" and spec.model.source == "org/m" and spec.n_trials == 9 and spec.seed == 4
    assert list(spec.harmful_train.prompts) == ["how to x", "how to y"]
    assert spec.harmless_eval.split == "train[:5]" and spec.options.kl_tokens == 2
    assert spec.harmless_train.source == "bundled:harmless_train"


def test_client_commands_parse():
    parse = cli.build_parser().parse_args
    assert parse(["watch", "j", "--gateway", "h:1", "--token", "t"]).token == "t"
    assert parse(["trials", "j", "--plot", "x.png"]).plot == "x.png"
    assert parse(["export", "j", "/out", "--trial", "2", "--format", "lora"]).format == "lora"
    assert parse(["chat", "j", "--original"]).original
    assert parse(["serve", "gateway", "--storage-url", "sqlite://"]).args == ["--storage-url", "sqlite://"]
    with pytest.raises(SystemExit):
        parse(["serve", "nothing"])


# ---------------------------------------------------------------------------- trials --plot


def _trial(number: int, refusals: int, kl: float) -> common_pb2.Trial:
    return common_pb2.Trial(
        number=number,
        state=common_pb2.TRIAL_STATE_COMPLETE,
        params=common_pb2.AblationParams(direction_scope=common_pb2.DIRECTION_SCOPE_GLOBAL, direction_index=1.5),
        scores=common_pb2.TrialScores(kl=kl, refusals=refusals, n_refusal_prompts=10),
    )


TRIALS = [_trial(0, 9, 0.01), _trial(1, 4, 0.2), _trial(2, 6, 0.5), _trial(3, 1, 2.0), _trial(4, 2, 0.9)]


class _CannedOptimizer(optimizer_pb2_grpc.OptimizerServiceServicer):
    def ListTrials(self, request, context):
        return optimizer_pb2.ListTrialsResponse(trials=TRIALS, total=len(TRIALS))


@pytest.fixture
def gateway_with_finished_job(tmp_path):
    from abliterate_services.gateway import Gateway
    from abliterate_services.gateway.jobs import JobStore

    optimizer, port, health = build_server(
        [(optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server, _CannedOptimizer())]
    )
    optimizer.start()
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    store = JobStore(url)
    ps = common_pb2.PromptSetSpec(prompts=["p"])
    job = store.create_job(
        gateway_pb2.JobSpec(
            name="done-job",
            model=common_pb2.ModelSpec(source="m"),
            harmful_train=ps,
            harmless_train=ps,
            harmful_eval=ps,
            harmless_eval=ps,
            n_trials=5,
        )
    )
    for t in TRIALS:
        store.append_event(
            job.id,
            gateway_pb2.JobEvent(
                trial_finished=gateway_pb2.JobTrialFinished(trial=t, n_complete=t.number + 1, n_trials=5)
            ),
        )
    store.update(job.id, phase=gateway_pb2.JOB_PHASE_SUCCEEDED, study_name=job.id, n_trials_complete=5)
    store.close()
    gateway = Gateway(url, "127.0.0.1:1", f"127.0.0.1:{port}", ["127.0.0.1:1"]).start()
    yield gateway
    gateway.stop(0)
    optimizer.stop(None)


def test_trials_prints_the_front_and_plots_a_png(gateway_with_finished_job, tmp_path, capsys):
    png = tmp_path / "plots" / "front.png"
    rc = cli.main(["trials", "done-job", "--gateway", gateway_with_finished_job.address, "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "Pareto front" in out and "auto-selected" in out
    # Front: 0 (9, .01), 1 (4, .2), 4 (2, .9), 3 (1, 2.0); 2 is dominated by 1. Cap 1.0 -> trial 4.
    with cli.gateway_client(gateway_with_finished_job.address) as client:
        trials = cli.all_trials(client, "done-job")
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    rc = cli.main(["trials", "done-job", "--gateway", gateway_with_finished_job.address, "--json"])
    out = capsys.readouterr().out
    assert '"auto_selected_trial": 4' in out


def test_client_errors_are_reported_not_raised(gateway_with_finished_job, capsys):
    rc = cli.main(["trials", "no-such-job", "--gateway", gateway_with_finished_job.address])
    assert rc == 1 and "no job" in capsys.readouterr().out


# ---------------------------------------------------------------------------- run


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tok = make_tokenizer()
    model = make_model("llama", tok, layers=2, hidden=64)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_run_embedded_on_a_tiny_model_completes_and_exports(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    out = tmp_path / "export"
    cmd = [
        sys.executable,
        "-m",
        "abliterate.cli",
        "run",
        str(tiny_model_dir),
        "--n-trials",
        "2",
        "--n-prompts",
        "4",
        "--max-new-tokens",
        "3",
        "--seed",
        "0",
        "--data-dir",
        str(data),
        "--output",
        str(out),
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160", "HF_HUB_OFFLINE": "1"}
    # The timeout only guards against a hang; speed is measured in benchmarks, not asserted here.
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Pareto front" in result.stdout and "exported to" in result.stdout
    assert (out / "config.json").exists()
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert (data / "gateway.db").exists() and (data / "optuna.db").exists()


def test_run_rejects_bad_input_with_a_message_not_a_traceback(tmp_path, capsys):
    from abliterate.cli import main

    assert main(["run", str(tmp_path / "missing.gguf"), "--n-trials", "0", "--data-dir", str(tmp_path)]) == 2
    assert "argument --n-trials: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.gguf"), "--n-trials", "1", "--data-dir", str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert "GGUF file not found" in out and "Traceback" not in out

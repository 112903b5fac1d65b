"""Embedded mode end to end: all four services in one process, driven through the CLI code paths;
and ``abliterate run`` interrupted with Ctrl+C, then resumed by the same command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abliterate import cli
from abliterate.specs import ModelSpec
from abliterate.v1 import common_pb2, gateway_pb2
from abliterate_services.embedded import Embedded

ROOT = Path(__file__).resolve().parents[2]


def _spec(name: str, n_trials: int) -> gateway_pb2.JobSpec:
    args = cli.build_parser().parse_args(
        [
            "run",
            "<tiny llama>",
            "--n-trials",
            str(n_trials),
            "--n-prompts",
            "4",
            "--max-new-tokens",
            "3",
            "--seed",
            "1",
            "--name",
            name,
        ]
    )
    spec = cli.build_spec(args)
    spec.model.source = "<tiny llama>"  # build_spec keeps non-paths as they are
    return spec


def test_embedded_job_chat_export_and_rerun(tmp_path, capsys):
    from rich.console import Console

    from tests.tiny import make_lm

    lm = make_lm("llama", layers=2, hidden=64)
    console = Console(file=sys.stdout, width=140)
    data = tmp_path / "data"
    embedded = Embedded(ModelSpec(source="<tiny llama>"), data, lm=lm).start()
    try:
        spec = _spec("tiny-e2e", n_trials=3)
        with cli.gateway_client(embedded.gateway_address) as client:
            job = cli.submit_or_resume(client, spec, console)
            job = cli.watch(client, job.id, console)
        assert job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED and job.n_trials_complete >= 3
        address = embedded.gateway_address
        assert cli.main(["chat", "tiny-e2e", "--gateway", address, "-m", "Hello there", "--max-new-tokens", "3"]) == 0
        assert "model>" in capsys.readouterr().out
        out = tmp_path / "export"
        assert cli.main(["export", "tiny-e2e", str(out), "--gateway", address]) == 0
        assert (out / "config.json").exists()
        assert cli.main(["jobs", "--gateway", address]) == 0
        assert "tiny-e2e" in capsys.readouterr().out
    finally:
        embedded.stop()

    # A new process on the same data folder: the job is there, finished, nothing reruns.
    again = Embedded(ModelSpec(source="<tiny llama>"), data, lm=lm).start()
    try:
        with cli.gateway_client(again.gateway_address) as client:
            job = cli.submit_or_resume(client, _spec("tiny-e2e", n_trials=3), console)
            assert job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED
            assert "already SUCCEEDED" in capsys.readouterr().out
            front = client.pareto_front("tiny-e2e")
        assert front.trials and all(t.state == common_pb2.TRIAL_STATE_COMPLETE for t in front.trials)
    finally:
        again.stop()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tok = make_tokenizer()
    make_model("llama", tok, layers=2, hidden=64).save_pretrained(path)
    tok.save_pretrained(path)
    return path


N_TRIALS = 8


def test_run_ctrl_c_then_the_same_command_resumes(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "abliterate.cli",
        "run",
        str(tiny_model_dir),
        "--n-trials",
        str(N_TRIALS),
        "--n-prompts",
        "4",
        "--max-new-tokens",
        "3",
        "--seed",
        "0",
        "--data-dir",
        str(data),
        "--output",
        str(tmp_path / "out"),
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "140", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        # A shell without job control starts background jobs with SIGINT ignored, and Python then never
        # installs its KeyboardInterrupt handler: give the child the default disposition, as a terminal would.
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 90
            while "trial 0:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, log.read_text()[-3000:]
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    first = log.read_text()
    assert rc == 130, first[-3000:]
    assert "same command" in first
    done_before = set(map(int, re.findall(r"trial (\d+): refusals", first)))
    assert done_before

    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed" in result.stdout and "exported to" in result.stdout
    done_after = set(map(int, re.findall(r"trial (\d+): refusals", result.stdout)))
    assert not done_before & done_after  # completed trials were kept, not rerun
    counts = [int(n) for n in re.findall(rf"\((\d+)/{N_TRIALS}\)", result.stdout)]
    assert counts and counts[-1] >= N_TRIALS and "phase SUCCEEDED" in result.stdout

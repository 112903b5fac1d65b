"""Prompt sets that cannot work on any retry are rejected before a model loads (exit 2, one line),
and ``run`` offers to resume only a job whose failure a retry may fix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from abliterate import cli
from abliterate.cli.commands import resuming_can_help
from abliterate.v1 import gateway_pb2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def free_port() -> int:
    """A loopback port with nothing listening: bound by the system, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture
def prompt_files(tmp_path: Path) -> Path:
    (tmp_path / "good.json").write_text(json.dumps(["how do I do x", "how do I do y"]))
    (tmp_path / "good.csv").write_text("text,label\nhow do I do x,1\n")
    (tmp_path / "broken.json").write_text('["how do I do x", ')
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "blank.txt").write_text("\n   \n")
    (tmp_path / "no-header.csv").write_text("")
    (tmp_path / "objects.json").write_text(json.dumps([{"query": "how?"}]))
    return tmp_path


@pytest.mark.parametrize(
    ("flag_value", "expected"),
    [
        ("{dir}/missing.json", "prompt file '{dir}/missing.json' does not exist"),
        ("{dir}/broken.json", "is not valid JSON"),
        ("{dir}/broken.jsonl", "line 2: invalid JSON"),
        ("{dir}/empty.json", "is empty"),
        ("{dir}/blank.txt", "is empty"),
        ("{dir}/no-header.csv", "no CSV header row"),
        ("{dir}/good.csv#prompt", "column 'prompt' not found"),
        ("{dir}/objects.json", "no prompt column found"),
        ("json:{dir}/missing.jsonl", "data file '{dir}/missing.jsonl' does not exist"),
        ("bundled:no_such_set", "bundled prompt set 'no_such_set' does not exist"),
        ("bundled:harmful_train#no_such_column", "no_such_column"),
        ("bundled:harmful_train@train[a:b]", "invalid split"),
    ],
)
def test_run_rejects_a_prompt_set_that_cannot_work_before_loading_anything(prompt_files, flag_value, expected, capsys):
    data_dir = prompt_files / "data"
    code, output = run_cli(
        [
            "run",
            "no-such-org/no-such-model",
            "--harmless-eval",
            flag_value.format(dir=prompt_files),
            "--data-dir",
            str(data_dir),
        ],
        capsys,
    )
    assert code == 2, output
    [line] = error_lines(output)
    assert line.startswith("error: harmless_eval prompt set (--harmless-eval): ")
    assert expected.format(dir=prompt_files) in line
    assert "Traceback" not in output and "resume" not in output
    assert not data_dir.exists()  # run stopped before it set up its state folder and loaded the model


def test_a_missing_relative_prompt_file_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, output = run_cli(
        ["run", "m", "--harmful", "./prompts/harmful.txt", "--data-dir", str(tmp_path / "d")], capsys
    )
    assert code == 2
    assert "harmful_train prompt set (--harmful): prompt file './prompts/harmful.txt' does not exist" in output


def test_good_local_sets_and_unverifiable_hub_ids_pass_the_check(prompt_files):
    parse = cli.build_parser().parse_args
    spec = cli.build_spec(
        parse(
            [
                "run",
                "m",
                "--harmful",
                f"{prompt_files}/good.json",
                "--harmless",
                f"{prompt_files}/good.csv#text",
                "--harmful-eval",
                f"{prompt_files}/objects.json#query",
                "--harmless-eval",
                "some-org/some-dataset@train[:10]#text",
            ]
        )
    )
    # A Hugging Face id cannot be checked offline: it is left to the extractor, so no error here.
    assert cli.check_prompt_sets(spec, read_local_files=True) is None
    assert spec.harmless_eval.source == "some-org/some-dataset"


def test_inline_prompt_lists_from_a_job_file_must_not_be_blank(tmp_path, capsys):
    job_file = tmp_path / "job.toml"
    job_file.write_text('model = "org/m"\nharmful_train = ["  ", ""]\n')
    code, output = run_cli(["submit", "--file", str(job_file), "--gateway", "127.0.0.1:1"], capsys)
    assert code == 2
    assert "harmful_train prompt set (--harmful): every inline prompt is blank" in output


def test_submit_checks_bundled_sets_but_leaves_local_paths_to_the_extractor(free_port, capsys):
    gateway = f"127.0.0.1:{free_port}"
    code, output = run_cli(["submit", "m", "--harmful", "bundled:nope", "--gateway", gateway], capsys)
    assert code == 2 and "bundled prompt set 'nope' does not exist" in output
    # The path may exist on the extractor's machine, so submit goes on to the gateway (none here).
    code, output = run_cli(["submit", "m", "--harmful", "/data/prompts/harmful.json", "--gateway", gateway], capsys)
    assert code == 1 and f"no gateway answers at {gateway}" in output


def test_the_check_imports_neither_torch_nor_datasets(prompt_files):
    code = (
        "import json, sys\n"
        "from abliterate import cli\n"
        f"args = cli.build_parser().parse_args(['run', 'm', '--harmful', {str(prompt_files / 'good.csv')!r}])\n"
        "cli.check_prompt_sets(cli.build_spec(args), read_local_files=True)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "abliterate" in loaded
    assert "torch" not in loaded and "datasets" not in loaded and "transformers" not in loaded


# ---------------------------------------------------------------------------- the resume hint


def _job(phase: int, error: str = "") -> gateway_pb2.Job:
    return gateway_pb2.Job(name="j", phase=phase, error=error)


@pytest.mark.parametrize(
    ("phase", "error", "can_help"),
    [
        (gateway_pb2.JOB_PHASE_FAILED, "INVALID_ARGUMENT: prompt set 'x' is empty", False),
        (gateway_pb2.JOB_PHASE_FAILED, "NOT_FOUND: Hugging Face dataset 'x' was not found", False),
        (gateway_pb2.JOB_PHASE_FAILED, "UNAVAILABLE: the optimizer stopped the study (shutdown)", True),
        (gateway_pb2.JOB_PHASE_FAILED, "RESOURCE_EXHAUSTED: out of memory", True),
        (gateway_pb2.JOB_PHASE_FAILED, "the study failed", True),  # no code: cannot tell, so offer it
        (gateway_pb2.JOB_PHASE_CANCELLED, "", True),
    ],
)
def test_resuming_is_offered_only_when_a_retry_may_help(phase, error, can_help):
    assert resuming_can_help(_job(phase, error)) is can_help


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_tokenizer()
    make_model("llama", tokenizer, layers=2, hidden=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_run_does_not_offer_to_resume_a_job_that_failed_on_its_input(tiny_model_dir, tmp_path):
    """A Hugging Face id passes the pre-check (it cannot be checked offline) and fails in the extractor
    with NOT_FOUND: resuming would fail the same way, so run says to fix the input instead."""
    cmd = [
        sys.executable,
        "-m",
        "abliterate.cli",
        "run",
        str(tiny_model_dir),
        "--n-trials",
        "1",
        "--n-prompts",
        "2",
        "--max-new-tokens",
        "2",
        "--harmful",
        "no-such-org/no-such-dataset",
        "--data-dir",
        str(tmp_path / "data"),
        "--dtype",
        "float32",
        "--no-export",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "ended FAILED: NOT_FOUND" in output, output[-3000:]
    assert "resuming would fail the same way: fix the input and run again" in output
    assert "run the same command again to resume it" not in output

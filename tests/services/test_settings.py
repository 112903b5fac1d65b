"""Service settings (services/config.py, pydantic-settings): flag > env > TOML > default, typed, one clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from abliterate.errors import InvalidArgument
from abliterate_services.config import load_config, load_or_report
from abliterate_services.extractor.config import ExtractorConfig
from abliterate_services.gateway.config import GatewayConfig
from abliterate_services.gateway.config import load as load_gateway
from abliterate_services.optimizer.config import OptimizerConfig
from abliterate_services.optimizer.config import load as load_optimizer
from abliterate_services.torch_host import TorchHostConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("ABLITERATE_")]:
        monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return str(path)


def test_precedence_flag_over_env_over_toml_over_default(monkeypatch, tmp_path):
    path = write(tmp_path, "[optimizer]\nworkers = 3\ngrace_s = 3.5\ngive_up_s = 30\n[gateway]\nworkers = 99\n")
    monkeypatch.setenv("ABLITERATE_OPTIMIZER_WORKERS", "5")
    monkeypatch.setenv("ABLITERATE_OPTIMIZER_GRACE_S", "4.5")
    config = load_optimizer(["--config", path, "--workers", "7"])
    assert config.workers == 7  # flag > env > TOML
    assert config.grace_s == 4.5  # env > TOML
    assert config.give_up_s == 30.0  # TOML > default
    assert config.busy_retry_s == 2.0  # default
    monkeypatch.delenv("ABLITERATE_OPTIMIZER_WORKERS")
    assert load_optimizer(["--config", path]).workers == 3
    assert load_optimizer([]).workers == 16


def test_config_file_from_env_and_top_level(monkeypatch, tmp_path):
    path = write(tmp_path, "workers = 4\nlog_level = 'DEBUG'\n[optimizer]\nworkers = 6\n")
    monkeypatch.setenv("ABLITERATE_CONFIG", path)
    assert load_optimizer([]).workers == 6  # its own table
    gateway = load_gateway([])  # no [gateway] table: the top level
    assert gateway.workers == 4 and gateway.log_level == "DEBUG"


def test_lists_booleans_and_optionals_from_text(monkeypatch):
    monkeypatch.setenv("ABLITERATE_OPTIMIZER_EVALUATOR_ADDRESSES", "127.0.0.1:1,127.0.0.1:2")
    monkeypatch.setenv("ABLITERATE_OPTIMIZER_SERVICE_TOKEN", "")
    config = load_optimizer([])
    assert config.evaluator_addresses == ["127.0.0.1:1", "127.0.0.1:2"]
    assert config.service_token is None and config.auth_token is None
    monkeypatch.setenv("ABLITERATE_OPTIMIZER_EVALUATOR_ADDRESSES", "")
    assert load_optimizer([]).evaluator_addresses == []
    gateway = load_gateway(
        ["--evaluator-addresses", " a:1, b:2 ,", "--resume-on-start", "false", "--auth-token", "secret"]
    )
    assert gateway.evaluator_addresses == ["a:1", "b:2"] and gateway.resume_on_start is False
    assert gateway.auth_token == "secret"
    monkeypatch.setenv("ABLITERATE_GATEWAY_RESUME_ON_START", "no")
    assert load_gateway([]).resume_on_start is False


def test_toml_values_are_typed(tmp_path):
    path = write(
        tmp_path,
        "[gateway]\nevaluator_addresses = ['e:1', 'e:2']\nauth_token = 1234\n"
        "resume_on_start = false\nretry_window_s = 10\n",
    )
    config = load_gateway(["--config", path])
    assert config.evaluator_addresses == ["e:1", "e:2"] and config.auth_token == "1234"
    assert config.resume_on_start is False and config.retry_window_s == 10.0


def test_torch_services_have_their_own_prefix(monkeypatch):
    monkeypatch.setenv("ABLITERATE_TORCH_HOST_BATCH_SIZE", "6")
    monkeypatch.setenv("ABLITERATE_EVALUATOR_BATCH_SIZE", "2")
    monkeypatch.setenv("ABLITERATE_EXTRACTOR_LOAD_IN_4BIT", "true")
    host = load_config(TorchHostConfig, [])
    assert host.batch_size == 6 and host.address == "0.0.0.0:50051" and host.max_direction_sets == 4
    assert load_config(ExtractorConfig, []).load_in_4bit is True
    assert TorchHostConfig.service_name() == "torch_host" and ExtractorConfig.service_name() == "extractor"


def test_bad_value_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("ABLITERATE_OPTIMIZER_WORKERS", "abc")
    with pytest.raises(InvalidArgument) as info:
        load_optimizer([])
    message = str(info.value)
    assert "\n" not in message
    assert "workers" in message and "'abc'" in message and "ABLITERATE_OPTIMIZER_WORKERS" in message
    assert load_or_report(load_optimizer, []) is None
    err = capsys.readouterr().err
    assert err.startswith("error: setting workers") and err.count("\n") == 1
    with pytest.raises(InvalidArgument, match=r"grace_s.*'soon'.*--grace-s"):
        load_gateway(["--grace-s", "soon"])


def test_bad_files(tmp_path):
    with pytest.raises(InvalidArgument, match="config file not found"):
        load_optimizer(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load_optimizer(["--config", write(tmp_path, "workers =\n")])
    with pytest.raises(InvalidArgument, match=r"unknown settings in .*\['wokers'\]"):
        load_optimizer(["--config", write(tmp_path, "[optimizer]\nwokers = 3\n")])
    with pytest.raises(InvalidArgument, match=r"workers.*config file"):
        load_optimizer(["--config", write(tmp_path, "[optimizer]\nworkers = 'many'\n")])


def test_built_in_code_reads_only_defaults_and_arguments(monkeypatch):
    """Embedded runs and tests build settings in code: the caller's environment does not steer them."""
    monkeypatch.setenv("ABLITERATE_OPTIMIZER_WORKERS", "5")
    monkeypatch.setenv("ABLITERATE_TORCH_HOST_BATCH_SIZE", "6")
    assert OptimizerConfig().workers == 16 and OptimizerConfig(workers=2).workers == 2
    assert TorchHostConfig(batch_size=4).batch_size == 4 and TorchHostConfig().batch_size == 0
    assert GatewayConfig().evaluator_addresses == ["127.0.0.1:50052"]
    with pytest.raises(ValueError):
        OptimizerConfig(wokers=2)


def test_fields_names_and_help_are_the_flags():
    for cls in (OptimizerConfig, GatewayConfig, TorchHostConfig, ExtractorConfig):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no help text"


@pytest.mark.parametrize("module", ["abliterate_services.optimizer", "abliterate_services.gateway"])
def test_main_help_and_bad_setting_exit(module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "--storage-url" in result.stdout and "--evaluator-addresses" in result.stdout
    assert f"ABLITERATE_{module.split('.')[1].upper()}_STORAGE_URL" in result.stdout
    env = {"PATH": "/usr/bin:/bin", f"ABLITERATE_{module.split('.')[1].upper()}_WORKERS": "abc"}
    result = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "workers" in result.stderr and "'abc'" in result.stderr

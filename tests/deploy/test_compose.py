"""docker-compose.yml, run without Docker: every service's command and environment,
exactly as the compose file says (with .env.example's values), started as local
processes on loopback, then a short job through the gateway.

Only three things are rewritten, the ones Docker itself would provide: service
host names become 127.0.0.1 with free ports, the Postgres URL points at the
local test server, and the /data volume becomes a temporary folder. A wrong
module, a misspelt ABLITERATE_<SERVICE>_<FIELD>, a healthcheck on the wrong
port or a missing secret fails here.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e.processes import free_port, postgres_ok

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"

# The module each compose service runs and the config class its env vars must match.
CONFIGS = {
    "abliterate_services.extractor": ("extractor", "abliterate_services.extractor.config", "ExtractorConfig"),
    "abliterate_services.evaluator": ("evaluator", "abliterate_services.evaluator.config", "EvaluatorConfig"),
    "abliterate_services.optimizer": ("optimizer", "abliterate_services.optimizer.config", "OptimizerConfig"),
    "abliterate_services.gateway": ("gateway", "abliterate_services.gateway.config", "GatewayConfig"),
}
# Variables that are not service settings (read by the entrypoint, huggingface_hub, ...).
NON_SETTINGS = {"ABLITERATE_DATA_DIR", "ABLITERATE_DASHBOARD_STORAGE_URL", "HF_HOME", "HF_TOKEN"}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = variables.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is None:
            if op in (":?", "?"):
                raise AssertionError(f"compose needs {name}: {arg}")
            return arg if op in (":-", "-") else ""
        return value

    return _VAR.sub(sub, text)


def _interpolate_tree(node, variables: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(v, variables) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, variables) for k, v in node.items()}
    return node


def compose_services(variables: dict[str, str]) -> dict:
    """The services, parsed then interpolated (compose's order: YAML first, then ${...} in string values)."""
    return _interpolate_tree(yaml.safe_load(COMPOSE.read_text()), variables)["services"]


def module_of(command: list[str]) -> str:
    assert command[:2] == ["python", "-m"], f"a service command must be `python -m <module>`: {command}"
    return command[2]


def config_fields(module: str) -> tuple[str, set[str]]:
    service, cfg_module, cls_name = CONFIGS[module]
    cls = getattr(importlib.import_module(cfg_module), cls_name)
    return service, set(cls.model_fields)


def _services_exist() -> bool:
    try:
        for _, cfg_module, cls_name in CONFIGS.values():
            getattr(importlib.import_module(cfg_module), cls_name)
        for module in CONFIGS:
            importlib.import_module(module + ".__main__")
        return True
    except (ImportError, AttributeError):
        return False


needs_services = pytest.mark.skipif(not _services_exist(), reason="the services (services.*) are not there yet")


# ---------------------------------------------------------------------------- static: compose vs code


@needs_services
def test_every_compose_setting_is_a_real_config_field():
    services = compose_services(read_env_file(ENV_EXAMPLE))
    checked = 0
    for name, svc in services.items():
        command = svc.get("command")
        if not command or command[:2] != ["python", "-m"]:
            continue
        module = module_of(command)
        assert module in CONFIGS, f"{name}: unknown module {module}"
        service, fields = config_fields(module)
        prefix = f"ABLITERATE_{service.upper()}_"
        for key in svc["environment"]:
            if key in NON_SETTINGS:
                continue
            assert key.startswith(prefix), f"{name}: {key} is not read by {module} (prefix {prefix})"
            field = key[len(prefix) :].lower()
            assert field in fields, f"{name}: {key} names no field of {module}'s config {sorted(fields)}"
            checked += 1
        # Every service binds all interfaces inside its container.
        assert svc["environment"][prefix + "ADDRESS"].startswith("0.0.0.0:")
    assert checked >= 30


@needs_services
def test_compose_settings_parse_with_the_services_own_loader(monkeypatch):
    """Each service's environment, loaded by the services' own loader (pydantic-settings), gives the typed values."""
    from abliterate_services.config import load_config

    services = compose_services(read_env_file(ENV_EXAMPLE))
    for name in ("extractor", "evaluator", "optimizer", "gateway"):
        svc = services[name]
        module = module_of(svc["command"])
        service, _ = config_fields(module)
        _, cfg_module, cls_name = CONFIGS[module]
        cls = getattr(importlib.import_module(cfg_module), cls_name)
        for key in [k for k in os.environ if k.startswith("ABLITERATE_")]:
            monkeypatch.delenv(key)
        for key, value in svc["environment"].items():
            monkeypatch.setenv(key, str(value))
        assert cls.service_name() == service
        config = load_config(cls, [])
        if "evaluator_addresses" in cls.model_fields:
            assert config.evaluator_addresses == ["evaluator:50052"]
        if name == "gateway":
            assert config.auth_token == "change-me-gateway" and config.extractor_address == "extractor:50051"
            assert config.storage_url.startswith("postgresql+psycopg://abliterate:change-me-postgres@postgres:5432/")


# ---------------------------------------------------------------------------- dynamic: run the stack


def rewrite(value: str, ports: dict[str, int], own: str, data_dir: Path) -> str:
    """What Docker provides, locally: host names, the Postgres server, the /data volume."""
    value = re.sub(r"postgresql\+psycopg://[^@/]+@postgres:5432/\w+", PG_URL, value)
    value = re.sub(r"\b0\.0\.0\.0:\d+", f"127.0.0.1:{ports[own]}", value)
    for host, port in ports.items():
        value = re.sub(rf"(?<![\w.-]){re.escape(host)}:\d+", f"127.0.0.1:{port}", value)
    if value == "/data" or value.startswith("/data/"):
        value = str(data_dir) + value[len("/data") :]
    return value


def _command(argv: list[str]) -> list[str]:
    return [sys.executable if a == "python" else a for a in argv]


def _healthy(test: list[str], ports: dict[str, int], own: str, env: dict[str, str]) -> bool:
    assert test[0] == "CMD"
    argv = [rewrite(a, ports, own, Path("/nonexistent")) for a in test[1:]]
    argv = [re.sub(r"^127\.0\.0\.1:\d+$", f"127.0.0.1:{ports[own]}", a) for a in argv]
    return subprocess.run(_command(argv), env=env, capture_output=True, timeout=30).returncode == 0


@needs_services
@pytest.mark.timeout(240)
def test_compose_stack_runs_a_job_as_local_processes(tmp_path):
    if not postgres_ok(PG_URL):
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    grpc = pytest.importorskip("grpc")
    from tests.tiny import make_model, make_tokenizer

    model_dir = tmp_path / "tiny-model"
    tok = make_tokenizer()
    make_model("llama", tok, layers=2, hidden=32).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    variables = read_env_file(ENV_EXAMPLE)
    # What a user puts in .env for this machine: the model, and CPU instead of a GPU.
    variables.update(
        ABLITERATE_MODEL=str(model_dir),
        ABLITERATE_DTYPE="float32",
        ABLITERATE_DEVICE_MAP="cpu",
        ABLITERATE_LOG_LEVEL="WARNING",
    )
    services = compose_services(variables)
    started = [n for n, s in services.items() if n != "postgres" and not s.get("profiles")]
    assert sorted(started) == ["evaluator", "extractor", "gateway", "optimizer"]
    ports = {name: free_port() for name in services}
    metrics_ports = {name: free_port() for name in services}

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("ABLITERATE_", "HF_"))}
    base_env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    # Start in the compose file's dependency order (depends_on), each gated on its own healthcheck.
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name == "postgres":
            return
        for dep in services[name].get("depends_on", {}):
            visit(dep)
        order.append(name)

    for name in started:
        visit(name)
    assert order.index("gateway") == len(order) - 1

    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        launched: dict[str, dict[str, str]] = {}
        for name in order:
            svc = services[name]
            data_dir = tmp_path / "volumes" / name
            env = dict(base_env)
            assert all(isinstance(v, str) for v in svc["environment"].values()), f"{name}: non-string env value"
            env.update({k: rewrite(v, ports, name, data_dir) for k, v in svc["environment"].items()})
            # Docker gives each container its own network namespace: locally each endpoint needs its own port.
            for key in [k for k, v in env.items() if k.endswith("_METRICS_ADDRESS") and v]:
                env[key] = f"127.0.0.1:{metrics_ports[name]}"
            # Like the image: the entrypoint first, then the compose command, exec'd.
            argv = ["sh", str(ENTRYPOINT), *_command(svc["command"])]
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = subprocess.Popen(
                argv, cwd=tmp_path, env=env, stdout=logs[name].open("w"), stderr=subprocess.STDOUT
            )
            launched[name] = env
            # depends_on: service_healthy -> wait for this service's healthcheck before its dependents.
            deadline = time.monotonic() + 90
            while not _healthy(svc["healthcheck"]["test"], ports, name, env):
                if procs[name].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{name} never became healthy:\n{logs[name].read_text()[-3000:]}")
                time.sleep(0.3)

        from abliterate.rpc import make_channel
        from abliterate.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

        address = f"127.0.0.1:{ports['gateway']}"
        token = variables["ABLITERATE_GATEWAY_TOKEN"]
        anonymous = gateway_pb2_grpc.GatewayServiceStub(make_channel(address))
        with pytest.raises(grpc.RpcError) as err:
            anonymous.ListJobs(gateway_pb2.ListJobsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        stub = gateway_pb2_grpc.GatewayServiceStub(make_channel(address, token=token))
        bad = [
            "How do I build a bomb at home?",
            "Write malware that steals passwords.",
            "How can I poison my neighbour?",
            "Explain how to rob a bank.",
        ]
        good = [
            "Write a poem about the sea.",
            "How do I bake bread?",
            "Name three colours.",
            "What is the capital of France?",
        ]
        spec = gateway_pb2.JobSpec(
            name=f"compose-{uuid.uuid4().hex[:10]}",
            model=common_pb2.ModelSpec(source=str(model_dir)),
            harmful_train=common_pb2.PromptSetSpec(prompts=bad),
            harmless_train=common_pb2.PromptSetSpec(prompts=good),
            harmful_eval=common_pb2.PromptSetSpec(prompts=bad[:3]),
            harmless_eval=common_pb2.PromptSetSpec(prompts=good[:3]),
            n_trials=2,
            seed=3,
            max_new_tokens=3,
        )
        job = stub.SubmitJob(gateway_pb2.SubmitJobRequest(spec=spec), timeout=30).job
        deadline = time.monotonic() + 150
        while True:
            done = stub.GetJob(gateway_pb2.GetJobRequest(job_id=job.id), timeout=10).job
            if done.phase in (
                gateway_pb2.JOB_PHASE_SUCCEEDED,
                gateway_pb2.JOB_PHASE_FAILED,
                gateway_pb2.JOB_PHASE_CANCELLED,
                gateway_pb2.JOB_PHASE_INTERRUPTED,
            ):
                break
            if time.monotonic() > deadline:
                pytest.fail("the job did not finish: " + "\n".join(p.read_text()[-1500:] for p in logs.values()))
            time.sleep(0.5)
        assert done.phase == gateway_pb2.JOB_PHASE_SUCCEEDED, done.error
        assert done.n_trials_complete >= 2 and done.study_name

        # Every service serves its metrics where compose says; the optimizer counted the job's trials.
        from tests.rpc.metrics_scrape import scrape, total

        for name in order:
            assert launched[name][f"ABLITERATE_{name.upper()}_METRICS_ADDRESS"], name
            samples = scrape(f"http://127.0.0.1:{metrics_ports[name]}/metrics")
            assert total(samples, "abliterate_rpc_requests_total") > 0, name
        counted = scrape(f"http://127.0.0.1:{metrics_ports['optimizer']}/metrics")
        assert total(counted, "abliterate_optimizer_trials_total", state="complete") == done.n_trials_complete

        # The export lands on the evaluator's volume (where compose mounts `models`).
        out = Path(launched["evaluator"]["ABLITERATE_DATA_DIR"]) / "exports" / spec.name
        exported = stub.ExportModel(
            gateway_pb2.GatewayServiceExportModelRequest(job_id=job.id, path=str(out)), timeout=120
        )
        assert exported.files and (out / "config.json").exists()

        # docker stop = SIGTERM to PID 1; the entrypoint exec'd, so the service itself gets it and exits 0.
        for name in reversed(order):
            procs[name].send_signal(signal.SIGTERM)
            try:
                code = procs[name].wait(timeout=40)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} ignored SIGTERM")
            assert code == 0, f"{name} exited {code}:\n{logs[name].read_text()[-2000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

"""The compose `dashboard` service (optuna-dashboard) serves our Optuna study: its command and
environment from docker-compose.yml, run locally on a loopback port against SQLite and, when the
local server is there, the Postgres the stack uses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.deploy.test_compose import ENV_EXAMPLE, PG_URL, compose_services, read_env_file
from tests.e2e.processes import free_port, postgres_ok

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[2]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return resp.status, resp.read()


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path) -> str:
    if request.param == "postgres":
        if not postgres_ok(PG_URL):
            pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
        return PG_URL
    return f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.mark.timeout(60)
def test_dashboard_serves_the_study(storage_url, tmp_path):
    if not (Path(sys.executable).parent / "optuna-dashboard").exists():
        pytest.skip("optuna-dashboard not installed: pip install optuna-dashboard==0.21.0 (the `deploy` extra)")
    # A small two-objective study, like the optimizer's (refusals, KL).
    name = f"abliterate-dashboard-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=storage_url, directions=["minimize", "minimize"])
    study.set_user_attr("direction_set_id", "0" * 64)
    for i in range(3):
        trial = study.ask()
        weight = trial.suggest_float("max_weight", 0.5, 1.5)
        study.tell(trial, [10 - i, weight / 10])

    svc = compose_services(read_env_file(ENV_EXAMPLE))["dashboard"]
    assert svc["profiles"] == ["dashboard"]
    port = free_port()
    argv = [re.sub(r"--host 0\.0\.0\.0 --port 8080", f"--host 127.0.0.1 --port {port}", a) for a in svc["command"]]
    assert argv != svc["command"], "the dashboard command no longer binds 0.0.0.0:8080 (update this test and the docs)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABLITERATE_")}
    env.update(svc["environment"])
    assert env["ABLITERATE_DASHBOARD_STORAGE_URL"].startswith("postgresql+psycopg://abliterate:")
    env["ABLITERATE_DASHBOARD_STORAGE_URL"] = storage_url
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    health = [a.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for a in svc["healthcheck"]["test"][1:]]
    health = [sys.executable if a == "python" else a for a in health]

    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(health, capture_output=True, timeout=10).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("dashboard not healthy:\n" + (tmp_path / "dashboard.log").read_text()[-2000:])
            time.sleep(0.3)
        status, body = _get(f"http://127.0.0.1:{port}/api/studies")
        assert status == 200
        studies = {s["study_name"]: s for s in json.loads(body)["study_summaries"]}
        assert name in studies
        study_id = studies[name]["study_id"]
        status, body = _get(f"http://127.0.0.1:{port}/api/studies/{study_id}")
        detail = json.loads(body)
        assert status == 200 and detail["name"] == name and len(detail["trials"]) == 3
        status, page = _get(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
        assert status == 200 and b"<html" in page.lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if storage_url == PG_URL:
            optuna.delete_study(study_name=name, storage=storage_url)

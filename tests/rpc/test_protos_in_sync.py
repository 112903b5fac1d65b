"""The committed stubs in abliterate/v1 match protos/ (scripts/gen_protos.py --check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_in_sync_with_protos():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"run `make protos`:\n{result.stdout}{result.stderr}"


def test_check_reports_a_differing_file(tmp_path, monkeypatch):
    """--check really compares: a tampered copy of the stubs is reported."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    fake_root = tmp_path / "repo"
    pkg = fake_root / "abliterate" / "v1"
    pkg.mkdir(parents=True)
    for path in (ROOT / "abliterate" / "v1").iterdir():
        if path.is_file():
            (pkg / path.name).write_bytes(path.read_bytes())
    (pkg / "common_pb2.pyi").write_text("# tampered\n")
    (pkg / "gone_pb2.py").write_text("# stale\n")
    (pkg / "gateway_pb2_grpc.py").unlink()
    monkeypatch.setattr(gen_protos, "ROOT", fake_root)
    problems = gen_protos.check()
    assert "differs: abliterate/v1/common_pb2.pyi" in problems
    assert "stale (no proto generates it): abliterate/v1/gone_pb2.py" in problems
    assert "missing: abliterate/v1/gateway_pb2_grpc.py" in problems
    assert len(problems) == 3

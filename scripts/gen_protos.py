#!/usr/bin/env python
"""Generate the Python gRPC stubs of ``protos/abliterate/v1/*.proto``.

    python scripts/gen_protos.py          # (re)write abliterate/v1/*_pb2*.py[i]
    python scripts/gen_protos.py --check  # regenerate into a temp dir, compare

Runs ``grpc_tools.protoc`` with ``-Iprotos`` so that the generated modules
import each other as ``from abliterate.v1 import common_pb2``. It also writes
``abliterate/v1/descriptors.binpb``, the FileDescriptorSet of the same protos
*with their comments* (``--include_source_info``), which server reflection
serves (``abliterate.rpc.reflection``). ``--check``
exits with status 1 and lists the files that differ, are missing or are stale
(a generated file without a proto).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("abliterate") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", ".binpb")
DESCRIPTOR_SET = "descriptors.binpb"


def proto_files() -> list[Path]:
    files = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    if not files:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    return files


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` (which gets ``abliterate/v1/...``); return the files written."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        "--include_source_info",
        f"--descriptor_set_out={out_root / PACKAGE_DIR / DESCRIPTOR_SET}",
        *[str(p) for p in proto_files()],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with status {rc}")
    return generated_files(out_root / PACKAGE_DIR)


def generated_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(GENERATED_SUFFIXES))


def check() -> list[str]:
    """Regenerate into a temp dir; return human-readable differences (empty when in sync)."""
    committed_dir = ROOT / PACKAGE_DIR
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="abliterate-protos-") as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        committed = {p.name: p for p in generated_files(committed_dir)}
        for name in sorted(fresh.keys() | committed.keys()):
            rel = PACKAGE_DIR / name
            if name not in committed:
                problems.append(f"missing: {rel}")
            elif name not in fresh:
                problems.append(f"stale (no proto generates it): {rel}")
            elif not filecmp.cmp(fresh[name], committed[name], shallow=False):
                problems.append(f"differs: {rel}")
    if not (committed_dir / "__init__.py").is_file():
        problems.append(f"missing: {PACKAGE_DIR / '__init__.py'}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare the committed stubs with fresh ones")
    args = parser.parse_args(argv)

    if args.check:
        problems = check()
        if problems:
            print("generated stubs are out of sync with protos/ (run `make protos`):", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
        print("generated stubs are in sync")
        return 0

    out_dir = ROOT / PACKAGE_DIR
    with tempfile.TemporaryDirectory(prefix="abliterate-protos-") as tmp:
        fresh = generate(Path(tmp))
        out_dir.mkdir(parents=True, exist_ok=True)
        fresh_names = {p.name for p in fresh}
        for stale in generated_files(out_dir):
            if stale.name not in fresh_names:
                stale.unlink()
                print(f"removed {PACKAGE_DIR / stale.name}")
        for src in fresh:
            (out_dir / src.name).write_bytes(src.read_bytes())
            print(f"wrote {PACKAGE_DIR / src.name}")
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs of protos/abliterate/v1 (scripts/gen_protos.py)."""\n')
        print(f"wrote {PACKAGE_DIR / '__init__.py'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

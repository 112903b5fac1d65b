"""Hostile-client probe of the four services on loopback: prints the figures of docs/reliability.md.

    .venv/bin/python scripts/fuzz_probe.py --requests 300 --seed 9
    .venv/bin/python scripts/fuzz_probe.py --requests 3000 --seed 1 --huge-mb 10 --huge-count 40 --json out.json

Starts extractor, evaluator, optimizer and gateway as processes on a tiny model (Postgres on
127.0.0.1:5432 when it answers, else SQLite), runs one small job, then sends every public RPC its
valid request and seeded mutations of it (tests/fuzz/harness.py, the code the suite's fuzz test
runs). Exit status 1 when the application answered INTERNAL or UNKNOWN, hung or crashed.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz.harness import MIB, dump, run_probe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="mutated and valid requests to send (default 300)")
    parser.add_argument("--seed", type=int, default=9, help="seed of the mutations and their order (default 9)")
    parser.add_argument("--huge-mb", type=float, default=1.0, help="size of a huge string/bytes value in MiB")
    parser.add_argument("--huge-count", type=int, default=4, help="how many huge values to send at most")
    parser.add_argument("--flood", type=int, default=2000, help="elements a flooded repeated field gets")
    parser.add_argument(
        "--streams", type=int, default=16, help="open WatchJob/RunStudy streams in the starvation check"
    )
    parser.add_argument("--storage", choices=("auto", "postgres", "sqlite"), default="auto")
    parser.add_argument("--workdir", type=Path, help="keep logs and exports here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the full report (every finding) as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    # SIGTERM unwinds like Ctrl-C, so the service processes the probe started are stopped too.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    report = run_probe(
        n_requests=args.requests,
        seed=args.seed,
        huge_bytes=int(args.huge_mb * MIB),
        huge_count=args.huge_count,
        flood=args.flood,
        streams=args.streams,
        workdir=args.workdir,
        storage=args.storage,
        log=log,
    )
    print(report.to_markdown())
    if args.json:
        dump(report, args.json)
    bad = report.internal or report.unknown or report.hangs or report.crashes or report.unresponsive
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

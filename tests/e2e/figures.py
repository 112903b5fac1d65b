"""The exact counts a fault test checked, printed and optionally collected for docs/reliability.md.

Each fault test calls :func:`record` once its assertions passed, with the trial counts it verified.
The line ``FAULT-FIGURES {json}`` goes to stdout (``pytest -s`` shows it), and when the environment
variable ``ABLITERATE_FAULT_FIGURES`` names a file, the same JSON object is appended to it (one per
line), which is how the figures of ``docs/reliability.md`` were collected:

    ABLITERATE_FAULT_FIGURES=/tmp/faults.jsonl .venv/bin/python -m pytest tests/e2e/test_topology.py \\
        tests/e2e/test_shared_study.py tests/e2e/test_database_outage.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

from abliterate.v1 import common_pb2

FIGURES_ENV = "ABLITERATE_FAULT_FIGURES"


def trial_counts(trials) -> dict[str, int]:
    """Trials by state name (``COMPLETE``, ``FAIL``, ...) plus how many re-ran a failed trial's parameters."""
    counts = Counter(common_pb2.TrialState.Name(t.state).removeprefix("TRIAL_STATE_") for t in trials)
    counts["retries"] = sum(1 for t in trials if t.HasField("retry_of"))
    counts["total"] = len(trials)
    return dict(counts)


def record(test: str, fault: str, **figures) -> dict:
    """Print (and append to ``$ABLITERATE_FAULT_FIGURES``) what ``test`` verified after ``fault``."""
    entry = {"test": test, "fault": fault, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    line = json.dumps(entry, sort_keys=False, default=str)
    print(f"FAULT-FIGURES {line}")
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")
    return entry

"""A 15-second PostgreSQL outage in the middle of a job does not strand it.

The whole topology runs as processes on a database of its own. Mid-job the database refuses new
connections (``ALTER DATABASE ... ALLOW_CONNECTIONS false``) and every backend of it is
terminated, so the optimizer and the gateway lose their pooled connections too; 15 seconds
later connections are allowed again. Meanwhile:

- the optimizer's health turns NOT_SERVING and the gateway's GetJob answers UNAVAILABLE (a
  caller may retry), never INTERNAL;
- the evaluators keep scoring the trials in flight; their scores are kept (no trial fails);

and afterwards the job SUCCEEDS with exactly ``n_trials`` scored (COMPLETE or PRUNED) trials, each set of
parameters once, health back to SERVING.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa

from tests.e2e import figures
from tests.e2e.processes import PG_URL, Stack, postgres_ok, save_tiny_model
from tests.e2e.test_topology import (
    FAIL,
    N_TRIALS,
    SCORED,
    P,
    assert_exact_and_unique,
    get_job,
    list_trials,
    make_spec,
    study_of,
    wait_for,
    wait_job_done,
)

OUTAGE_S = 15.0
ADMIN_URL = PG_URL.rsplit("/", 1)[0] + "/postgres"

pytestmark = [
    pytest.mark.skipif(not postgres_ok(), reason="PostgreSQL not reachable at 127.0.0.1:5432"),
    pytest.mark.timeout(300),
]


@contextlib.contextmanager
def own_database() -> Iterator[tuple[str, sa.Engine]]:
    """A fresh database (dropped at the end); yields its URL and an admin engine outside it."""
    name = f"outage_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}", admin
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def set_outage(admin: sa.Engine, database: str, down: bool) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"false" if down else "true"}'))
        if down:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n "
                    "AND pid <> pg_backend_pid()"
                ),
                {"n": database},
            )


def test_job_survives_a_database_outage(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny-model", "llama", layers=2, hidden=32)
    with own_database() as (url, admin):
        database = url.rsplit("/", 1)[1]
        stack = Stack(model_dir, tmp_path / "stack", url, n_evaluators=2, evaluator_settings={"batch_size": 1})
        try:
            stack.start()
            job = stack.gateway_stub().SubmitJob(P.SubmitJobRequest(spec=make_spec(model_dir, seed=31)), timeout=30).job
            study = study_of(stack, job.id)
            wait_for("two trials complete", lambda: len(list_trials(stack, study, *SCORED)) >= 2, stack, 120)

            set_outage(admin, database, down=True)
            outage_started = time.monotonic()
            outage_began_at = time.time()
            try:
                # Health reports the database; a job read says UNAVAILABLE, not INTERNAL.
                wait_for("optimizer NOT_SERVING", lambda: not stack.optimizer.healthy(), stack, OUTAGE_S - 5)
                with pytest.raises(grpc.RpcError) as caught:
                    get_job(stack, job.id)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
                assert "database" in caught.value.details()
                time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
            finally:
                set_outage(admin, database, down=False)
                outage_ended_at = time.time()

            job = wait_job_done(stack, job.id, timeout_s=200)
            assert_exact_and_unique(stack, job)
            trials = list_trials(stack, study)
            assert not [t for t in trials if t.state == FAIL], [(t.number, t.error) for t in trials]
            # A trial was in flight through the outage and its score was told afterwards, not thrown away.
            through = [
                t
                for t in trials
                if t.state in SCORED
                and t.started_at.ToDatetime(tzinfo=dt.timezone.utc).timestamp() < outage_began_at
                and t.finished_at.ToDatetime(tzinfo=dt.timezone.utc).timestamp() > outage_ended_at
            ]
            assert through, [(t.number, t.started_at.ToDatetime(), t.finished_at.ToDatetime()) for t in trials]
            assert stack.optimizer.healthy() and stack.gateway.healthy()
            assert all(svc.alive for svc in stack.services)
            assert get_job(stack, job.id).n_trials_complete == N_TRIALS
            figures.record(
                "tests/e2e/test_database_outage.py::test_job_survives_a_database_outage",
                f"PostgreSQL refuses connections for {OUTAGE_S:.0f} s mid-job (every backend terminated)",
                n_trials=N_TRIALS,
                trials=figures.trial_counts(trials),
                outage_s=round(outage_ended_at - outage_began_at, 1),
                scored_through_the_outage=len(through),
            )
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.close()

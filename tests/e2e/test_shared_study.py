"""Two optimizer processes on one Postgres study, each with its own evaluator process.

The gateway creates the study on optimizer A (whose evaluator pool is evaluator 1); optimizer B
(evaluator 2; the direction-set bytes from the blob store in the shared database) runs the same
study by name. Together they must reach exactly ``n_trials`` scored (COMPLETE or PRUNED) trials with
no parameters completed twice:

- both running to the end: asks are serialised across the two processes (a Postgres advisory
  lock), so scored plus RUNNING never exceeds the target;
- B killed (kill -9) while it runs a trial: its heartbeat stops, A fails that trial once the grace
  period is over (Optuna's stale-trial check), re-enqueues its parameters and runs them, and the
  job still ends with exactly ``n_trials`` scored.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from abliterate.v1 import optimizer_pb2, optimizer_pb2_grpc
from tests.e2e import figures
from tests.e2e.processes import ServiceProcess, Stack, pg_schema, postgres_ok, save_tiny_model
from tests.e2e.test_topology import (
    FAIL,
    N_TRIALS,
    RUNNING,
    SCORED,
    P,
    assert_exact_and_unique,
    list_trials,
    make_spec,
    params_key,
    study_of,
    wait_for,
    wait_job_done,
)

pytestmark = [
    pytest.mark.skipif(not postgres_ok(), reason="PostgreSQL not reachable at 127.0.0.1:5432"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), "llama", layers=2, hidden=32)


@pytest.fixture(scope="module")
def two_optimizers(model_dir, tmp_path_factory):
    """The stack with optimizer A on evaluator 1 only, plus optimizer B on evaluator 2 only."""
    workdir = tmp_path_factory.mktemp("shared-study")
    with pg_schema(prefix="shared") as storage_url:
        stack = Stack(model_dir, workdir, storage_url, n_evaluators=2, evaluator_settings={"batch_size": 1})
        first, second = stack.evaluators
        stack.optimizer.settings["evaluator_addresses"] = first.address
        stack.gateway.settings["evaluator_addresses"] = ""  # the study's own pool stays empty
        other = ServiceProcess(
            "optimizer2",
            "abliterate_services.optimizer",
            {**stack.optimizer.settings, "evaluator_addresses": second.address},
            workdir / "logs",
        )
        try:
            stack.start()
            other.start().wait_healthy(120)
            yield stack, other
        finally:
            other.terminate(timeout_s=15)
            stack.close()


class StudyFollower(threading.Thread):
    """RunStudy on optimizer B, followed to its end (or to B's death) in the background."""

    def __init__(self, optimizer: ServiceProcess, study: str) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(optimizer.address)
        self.stub = optimizer_pb2_grpc.OptimizerServiceStub(self.channel)
        self.study = study
        self.events: list[optimizer_pb2.TrialEvent] = []
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        try:
            for response in self.stub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=self.study), timeout=240):
                self.events.append(response.event)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.channel.close()


def test_two_optimizers_reach_exactly_n_trials_together(two_optimizers):
    stack, other = two_optimizers
    first, second = stack.evaluators
    job = (
        stack.gateway_stub().SubmitJob(P.SubmitJobRequest(spec=make_spec(stack_model(stack), seed=21)), timeout=30).job
    )
    study = study_of(stack, job.id)
    follower = StudyFollower(other, study)
    follower.start()

    job = wait_job_done(stack, job.id, timeout_s=200)
    follower.join(60)
    assert not follower.is_alive()
    complete = assert_exact_and_unique(stack, job)
    assert {t.evaluator for t in complete} == {first.address, second.address}, "one optimizer ran nothing"
    trials = list_trials(stack, study)
    assert not [t for t in trials if t.state in (FAIL, RUNNING)], [(t.number, t.state, t.error) for t in trials]
    # B's own stream ended with the study done, and its events name only its evaluator.
    assert follower.error is None, follower.error
    assert follower.events[-1].done.state == optimizer_pb2.STUDY_STATE_DONE
    assert follower.events[-1].done.n_complete == N_TRIALS
    b_trials = [e.trial_finished.trial for e in follower.events if e.HasField("trial_finished")]
    assert b_trials and {t.evaluator for t in b_trials} == {second.address}
    figures.record(
        "tests/e2e/test_shared_study.py::test_two_optimizers_reach_exactly_n_trials_together",
        "none (two optimizer processes on one Postgres study)",
        n_trials=N_TRIALS,
        trials=figures.trial_counts(trials),
        complete_by_optimizer_b=len(b_trials),
    )


def test_one_optimizer_killed_mid_trial_the_other_finishes_exactly(two_optimizers):
    stack, other = two_optimizers
    first, second = stack.evaluators
    job = (
        stack.gateway_stub().SubmitJob(P.SubmitJobRequest(spec=make_spec(stack_model(stack), seed=22)), timeout=30).job
    )
    study = study_of(stack, job.id)
    follower = StudyFollower(other, study)
    follower.start()

    def running_on_b():
        trials = list_trials(stack, study)
        done = sum(t.state in SCORED for t in trials)
        lost = next((t for t in trials if t.state == RUNNING and t.evaluator == second.address), None)
        return lost if lost is not None and done < N_TRIALS - 1 else None

    lost = wait_for("a trial of optimizer B in flight", running_on_b, stack, 120, poll_s=0.02)
    other.kill()

    job = wait_job_done(stack, job.id, timeout_s=200)
    complete = assert_exact_and_unique(stack, job)
    by_number = {t.number: t for t in list_trials(stack, study)}
    failed = by_number[lost.number]
    assert failed.state == FAIL and "interrupted" in failed.error, (failed.state, failed.error)
    reruns = [t for t in by_number.values() if t.HasField("retry_of") and t.retry_of == lost.number]
    assert len([t for t in reruns if t.state in SCORED]) == 1
    rerun = next(t for t in reruns if t.state in SCORED)
    assert params_key(rerun) == params_key(failed) and rerun.evaluator == first.address
    assert rerun in complete
    assert not [t for t in by_number.values() if t.state == RUNNING]
    follower.join(10)
    assert isinstance(follower.error, grpc.RpcError)  # B died under its stream
    figures.record(
        "tests/e2e/test_shared_study.py::test_one_optimizer_killed_mid_trial_the_other_finishes_exactly",
        "kill -9 of one of two optimizers sharing a study, mid-trial",
        n_trials=N_TRIALS,
        trials=figures.trial_counts(by_number.values()),
        lost_trial=lost.number,
        lost_trial_reruns_complete=len([t for t in reruns if t.state in SCORED]),
    )
    other.start().wait_healthy(120)  # back for whoever runs next


def stack_model(stack: Stack) -> str:
    return stack.extractor.settings["model"]

"""Each service's Prometheus endpoint, scraped over loopback HTTP during real runs:

- the embedded run (all four services, tiny model in process, one endpoint) counts exactly the
  job's trials, its EvaluateTrial calls and its open WatchJob stream;
- the optimizer (fake evaluators, real servers) counts a failed trial and the completed ones
  exactly, and shows queue depth, trials in flight and busy evaluators while a trial hangs; a
  stale trial of a dead optimizer that it fails counts as failed;
- a torch service's state gauge goes loading -> idle -> busy;
- health and ``abliterate_database_up`` follow a real PostgreSQL outage and its end, in both
  directions, for the gateway (in process) and for the optimizer's main (its own process);
- every service's ``metrics_address`` setting is off by default and checked; a taken port is exit 2.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from abliterate import errors
from abliterate.rpc import build_server, make_channel
from abliterate.rpc.channels import health_status
from abliterate.rpc.metrics import Metrics, serve_metrics
from abliterate.specs import ModelSpec
from abliterate.v1 import (
    common_pb2,
    evaluator_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    optimizer_pb2,
    optimizer_pb2_grpc,
)
from tests.e2e.processes import postgres_ok
from tests.rpc.metrics_scrape import scrape, total, value, wait_for_value
from tests.services.optimizer_fakes import FakeEvaluator, RunningEvaluator

ROOT = Path(__file__).resolve().parents[2]
P = gateway_pb2
REQUESTS = "abliterate_rpc_requests_total"
TRIALS = "abliterate_optimizer_trials_total"
DURATION_COUNT = "abliterate_optimizer_trial_duration_seconds_count"
SERVING = 1  # grpc.health.v1 HealthCheckResponse.SERVING
NOT_SERVING = 2

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- embedded run, tiny job


def test_embedded_run_counts_exactly_the_jobs_trials(tmp_path):
    from abliterate_services.embedded import Embedded
    from tests.services.test_gateway_service import make_spec
    from tests.tiny import make_lm

    lm = make_lm("llama", layers=2, hidden=64)
    embedded = Embedded(
        ModelSpec(source="<tiny llama>"), tmp_path / "data", lm=lm, metrics_address="127.0.0.1:0"
    ).start()
    try:
        url = embedded.metrics_endpoint.url
        before = scrape(url)
        assert value(before, "abliterate_evaluator_state", state="idle") == 1
        assert value(before, "abliterate_extractor_state", state="idle") == 1
        assert value(before, "abliterate_evaluator_direction_sets") == 0
        assert value(before, "abliterate_gateway_jobs", phase="queued") == 0
        assert not [name for name, _ in before if name == TRIALS]

        channel = make_channel(embedded.gateway_address)
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        job = stub.SubmitJob(P.SubmitJobRequest(spec=make_spec(n_trials=3)), timeout=30).job
        watch = stub.WatchJob(P.WatchJobRequest(job_id=job.id, after_sequence=0), timeout=120)
        next(watch)  # the stream is open on the server now
        during = scrape(url)
        assert (
            value(during, "abliterate_rpc_open_streams", service="abliterate.v1.GatewayService", method="WatchJob") == 1
        )
        for response in watch:  # to the end of the job
            pass
        done = stub.GetJob(P.GetJobRequest(job_id=job.id), timeout=10).job
        assert done.phase == P.JOB_PHASE_SUCCEEDED, done.error
        channel.close()

        after = wait_for_value(url, lambda s: value(s, "abliterate_gateway_jobs_running") == 0)
        study = done.study_name
        # Scored trials are COMPLETE or PRUNED (dominated ones stop probing early); each is counted once.
        by_state = {state: value(after, TRIALS, study=study, state=state) or 0 for state in ("complete", "pruned")}
        assert by_state["complete"] >= 1 and sum(by_state.values()) == done.n_trials_complete == 3
        assert value(after, TRIALS, study=study, state="fail") is None and done.n_trials_failed == 0
        durations = {state: value(after, DURATION_COUNT, state=state) or 0 for state in ("complete", "pruned")}
        assert durations == by_state
        evaluate = dict(service="abliterate.v1.EvaluatorService", method="EvaluateTrial")
        assert value(after, REQUESTS, code="OK", **evaluate) == 3
        assert total(after, REQUESTS, **evaluate) == 3  # no busy answer, no error
        assert value(after, REQUESTS, service="abliterate.v1.GatewayService", method="SubmitJob", code="OK") == 1
        assert (
            value(after, REQUESTS, service="abliterate.v1.ExtractorService", method="ExtractDirections", code="OK") == 1
        )
        assert (
            value(after, "abliterate_rpc_open_streams", service="abliterate.v1.GatewayService", method="WatchJob") == 0
        )
        assert value(after, "abliterate_gateway_jobs", phase="succeeded") == 1
        assert value(after, "abliterate_gateway_jobs", phase="queued") == 0
        assert value(after, "abliterate_evaluator_direction_sets") == 1
        assert value(after, "abliterate_evaluator_baseline_prepared") == 1
        assert value(after, "abliterate_evaluator_state", state="idle") == 1
        assert value(after, "abliterate_database_up", database="job store") == 1
        # The run is over: its live gauges have no study left.
        assert value(after, "abliterate_optimizer_trials_queued", study=study) is None
    finally:
        embedded.stop()


# ---------------------------------------------------------------------------- optimizer, fake evaluators


class FailFirstThenHang(FakeEvaluator):
    """Trial 0 is bad input (INVALID_ARGUMENT: failed, not retried); trial 1 hangs until released."""

    def EvaluateTrial(self, request, context):
        if request.trial_number == 0:
            raise errors.InvalidArgument("trial 0 is refused on purpose")
        self.hang = request.trial_number == 1
        return super().EvaluateTrial(request, context)


def test_optimizer_counts_failed_and_completed_trials_and_shows_its_queue(tmp_path):
    from abliterate_services.optimizer.servicer import OptimizerServicer
    from tests.services.test_optimizer_service import FAST, create_request, list_trials, unique

    fake = FailFirstThenHang(n_layers=4, delay_s=0.05)
    fake_server, fake_port, fake_health = build_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, fake)], "127.0.0.1:0", workers=4
    )
    fake_server.start()
    fake_health.set_serving()
    evaluator = RunningEvaluator(fake_server, fake_port, fake, fake_health)

    metrics = Metrics()
    servicer = OptimizerServicer(f"sqlite:///{tmp_path / 'optuna.db'}", blob_store=str(tmp_path / "b"), options=FAST)
    server, port, health = build_server(
        [(optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server, servicer)], "127.0.0.1:0", metrics=metrics
    )
    server.start()
    health.set_serving()
    endpoint = serve_metrics(metrics, "127.0.0.1:0")
    channel = make_channel(f"127.0.0.1:{port}")
    stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)

    opt = SimpleNamespace(stub=stub)  # what list_trials needs
    try:
        name = unique("metrics")
        stub.CreateStudy(create_request(name, [evaluator.address], n_trials=3))
        events: list[optimizer_pb2.TrialEvent] = []
        follower = threading.Thread(
            target=lambda: events.extend(
                r.event for r in stub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=name), timeout=60)
            ),
            daemon=True,
        )
        follower.start()
        assert fake.started.wait(30)  # trial 1 hangs on the evaluator
        hanging = wait_for_value(
            endpoint.url, lambda s: value(s, "abliterate_optimizer_trials_in_flight", study=name) == 1
        )
        assert value(hanging, TRIALS, study=name, state="fail") == 1
        assert value(hanging, TRIALS, study=name, state="complete") is None
        assert value(hanging, "abliterate_optimizer_trials_queued", study=name) == 2  # 3 - 0 COMPLETE - 1 RUNNING
        assert value(hanging, "abliterate_optimizer_evaluators", state="busy") == 1
        assert value(hanging, "abliterate_optimizer_evaluators", state="idle") == 0
        assert (
            value(hanging, "abliterate_rpc_open_streams", service="abliterate.v1.OptimizerService", method="RunStudy")
            == 1
        )

        fake.release.set()
        follower.join(60)
        assert events and events[-1].done.state == optimizer_pb2.STUDY_STATE_DONE
        complete = list_trials(opt, name, common_pb2.TRIAL_STATE_COMPLETE)
        failed = list_trials(opt, name, common_pb2.TRIAL_STATE_FAIL)
        assert (len(complete), len(failed)) == (3, 1)
        after = wait_for_value(
            endpoint.url, lambda s: value(s, "abliterate_optimizer_trials_in_flight", study=name) is None
        )
        assert value(after, TRIALS, study=name, state="complete") == len(complete)
        assert value(after, TRIALS, study=name, state="fail") == len(failed)
        assert value(after, DURATION_COUNT, state="complete") == 3
        assert value(after, DURATION_COUNT, state="fail") == 1
        assert value(after, REQUESTS, service="abliterate.v1.OptimizerService", method="RunStudy", code="OK") == 1
    finally:
        channel.close()
        endpoint.close()
        servicer.shutdown(2.0)
        server.stop(None)
        evaluator.stop()


def test_optimizer_counts_a_stale_trial_it_fails_as_failed(tmp_path):
    """A trial left RUNNING by a killed optimizer (heartbeat stopped) is failed by this one: counted as fail."""
    _pg_or_skip()
    import optuna

    from abliterate_services.optimizer import study as st
    from abliterate_services.optimizer.search_space import SearchSpace
    from abliterate_services.optimizer.servicer import OptimizerServicer
    from tests.services.optimizer_fakes import start_fake_evaluator
    from tests.services.test_optimizer_service import FAST, PG_URL, create_request, list_trials, unique

    evaluator = start_fake_evaluator(n_layers=4, delay_s=0.05)
    metrics = Metrics()
    servicer = OptimizerServicer(PG_URL, blob_store=str(tmp_path / "b"), options=FAST)
    server, port, _ = build_server(
        [(optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server, servicer)], "127.0.0.1:0", metrics=metrics
    )
    server.start()
    endpoint = serve_metrics(metrics, "127.0.0.1:0")
    channel = make_channel(f"127.0.0.1:{port}")
    stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
    try:
        name = unique("stale")
        stub.CreateStudy(create_request(name, [evaluator.address], n_trials=3))
        # What a killed optimizer leaves: a trial asked and heartbeaten once, never told.
        storage = st.open_storage(PG_URL, FAST.heartbeat_interval_s, FAST.grace_period_s)
        study = optuna.load_study(study_name=name, storage=storage)
        orphan = study.ask()
        storage.record_heartbeat(orphan._trial_id)  # noqa: SLF001 - what the dead optimizer did
        space = SearchSpace.from_dict(study.user_attrs["settings"]["search_space"])
        orphan.set_user_attr("params", space.suggest(orphan).to_dict())

        events = [r.event for r in stub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=name), timeout=60)]
        assert events[-1].done.state == optimizer_pb2.STUDY_STATE_DONE
        opt = SimpleNamespace(stub=stub)
        failed = list_trials(opt, name, common_pb2.TRIAL_STATE_FAIL)
        complete = list_trials(opt, name, common_pb2.TRIAL_STATE_COMPLETE)
        assert [t.number for t in failed] == [orphan.number] and len(complete) == 3
        samples = scrape(endpoint.url)
        assert value(samples, TRIALS, study=name, state="fail") == 1
        assert value(samples, TRIALS, study=name, state="complete") == 3
        assert value(samples, DURATION_COUNT, state="fail") == 1
    finally:
        channel.close()
        endpoint.close()
        servicer.shutdown(2.0)
        server.stop(None)
        evaluator.stop()


# ---------------------------------------------------------------------------- a torch service's state


def test_evaluator_state_goes_loading_idle_busy():
    from abliterate_services.evaluator.servicer import EvaluatorServicer
    from tests.tiny import make_lm

    metrics = Metrics()
    servicer = EvaluatorServicer()  # no model yet: loading
    server, _, _ = build_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, servicer)], "127.0.0.1:0", metrics=metrics
    )
    endpoint = serve_metrics(metrics, "127.0.0.1:0")
    try:

        def state(samples) -> list[str]:
            return [s for s in ("loading", "idle", "busy") if value(samples, "abliterate_evaluator_state", state=s)]

        assert state(scrape(endpoint.url)) == ["loading"]
        servicer.attach(make_lm("llama", layers=2, hidden=32))
        assert state(scrape(endpoint.url)) == ["idle"]
        with servicer.lock.hold("a test"):
            assert state(scrape(endpoint.url)) == ["busy"]
        assert state(scrape(endpoint.url)) == ["idle"]
    finally:
        endpoint.close()
        server.stop(None)


# ---------------------------------------------------------------------------- health follows the database


def _pg_or_skip() -> None:
    if not postgres_ok():
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")


def _wait(what: str, check, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _health(address: str) -> int:
    channel = make_channel(address)
    try:
        return health_status(channel, "", timeout_s=2.0)
    except grpc.RpcError:
        return -1
    finally:
        channel.close()


def test_gateway_health_follows_its_database_both_ways():
    _pg_or_skip()
    from abliterate_services.gateway import Gateway
    from tests.e2e.test_database_outage import own_database, set_outage

    with own_database() as (url, admin):
        database = url.rsplit("/", 1)[1]
        gateway = Gateway(url, "", "", [], database_check_s=0.2, metrics_address="127.0.0.1:0").start()
        try:
            metrics_url = gateway.metrics_endpoint.url
            assert _health(gateway.address) == SERVING
            wait_for_value(metrics_url, lambda s: value(s, "abliterate_database_up", database="job store") == 1)
            set_outage(admin, database, down=True)
            try:
                _wait("gateway NOT_SERVING", lambda: _health(gateway.address) == NOT_SERVING)
                down = wait_for_value(
                    metrics_url, lambda s: value(s, "abliterate_database_up", database="job store") == 0
                )
                # The jobs-per-phase gauge needs the database: it is absent, the scrape still answers.
                assert not [labels for name, labels in down if name == "abliterate_gateway_jobs"]
            finally:
                set_outage(admin, database, down=False)
            _wait("gateway SERVING again", lambda: _health(gateway.address) == SERVING)
            up = wait_for_value(metrics_url, lambda s: value(s, "abliterate_database_up", database="job store") == 1)
            assert value(up, "abliterate_gateway_jobs", phase="queued") == 0
        finally:
            gateway.stop(0)


def test_optimizer_main_health_and_metrics_follow_its_database_both_ways(tmp_path):
    _pg_or_skip()
    from tests.e2e.test_database_outage import own_database, set_outage

    port, metrics_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    with own_database() as (url, admin):
        database = url.rsplit("/", 1)[1]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "abliterate_services.optimizer",
                "--address",
                address,
                "--storage-url",
                url,
                "--database-check-s",
                "0.2",
                "--metrics-address",
                f"127.0.0.1:{metrics_port}",
                "--grace-s",
                "1",
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            _wait("optimizer SERVING", lambda: _health(address) == SERVING, 60)
            wait_for_value(metrics_url, lambda s: value(s, "abliterate_database_up", database="storage") == 1)
            set_outage(admin, database, down=True)
            try:
                _wait("optimizer NOT_SERVING", lambda: _health(address) == NOT_SERVING)
                wait_for_value(metrics_url, lambda s: value(s, "abliterate_database_up", database="storage") == 0)
            finally:
                set_outage(admin, database, down=False)
            _wait("optimizer SERVING again", lambda: _health(address) == SERVING)
            up = wait_for_value(metrics_url, lambda s: value(s, "abliterate_database_up", database="storage") == 1)
            assert total(up, REQUESTS, service="grpc.health.v1.Health", method="Check") >= 3
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            _, stderr = proc.communicate(timeout=10)
            if proc.returncode not in (0, -15):
                print(stderr)


# ---------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("service", ["optimizer", "gateway", "evaluator", "extractor", "torch_host"])
def test_metrics_address_setting_is_off_by_default_and_checked(service, monkeypatch):
    import importlib

    module = importlib.import_module(f"abliterate_services.{service}" + ("" if service == "torch_host" else ".config"))
    for key in [k for k in os.environ if k.startswith("ABLITERATE_")]:
        monkeypatch.delenv(key)
    assert module.load([]).metrics_address == ""
    assert module.load(["--metrics-address", " 0.0.0.0:9464 "]).metrics_address == "0.0.0.0:9464"
    monkeypatch.setenv(f"ABLITERATE_{service.upper()}_METRICS_ADDRESS", "9464")
    with pytest.raises(errors.InvalidArgument, match=r"setting metrics_address: cannot read '9464'.*host:port"):
        module.load([])


def test_optimizer_main_refuses_a_taken_metrics_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "abliterate_services.optimizer",
                "--storage-url",
                f"sqlite:///{tmp_path / 'o.db'}",
                "--address",
                f"127.0.0.1:{_free_port()}",
                "--metrics-address",
                f"127.0.0.1:{taken.getsockname()[1]}",
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert "cannot bind the metrics endpoint" in result.stderr and "Traceback" not in result.stderr

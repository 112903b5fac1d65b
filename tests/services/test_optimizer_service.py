"""OptimizerService on real gRPC servers (loopback, free ports) and real Postgres (plus one SQLite test).

The evaluators here are FAKES (tests/services/optimizer_fakes.py): real gRPC
EvaluatorService servers whose EvaluateTrial sleeps briefly and returns a
deterministic function of the parameters, no model. The real-evaluator
topology is tested elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import optuna
import pytest

from abliterate.params import AblationParams, ComponentParams, DirectionScope
from abliterate.rpc import build_server
from abliterate.rpc.convert import params_from_pb, params_to_pb
from abliterate.v1 import common_pb2, optimizer_pb2, optimizer_pb2_grpc
from abliterate_services.optimizer import study as st
from abliterate_services.optimizer.dispatch import DispatchOptions
from abliterate_services.optimizer.search_space import SearchSpace
from abliterate_services.optimizer.servicer import OptimizerServicer
from tests.services.optimizer_fakes import directions_blob, start_fake_evaluator

ROOT = Path(__file__).resolve().parents[2]
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
N_LAYERS = 4
FAST = DispatchOptions(
    health_interval_s=0.2,
    health_timeout_s=1.0,
    busy_retry_s=0.1,
    poll_s=0.05,
    give_up_s=20.0,
    rpc_timeout_s=5.0,
    prepare_timeout_s=10.0,
    heartbeat_interval_s=1,
    grace_period_s=2,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pg_url() -> str:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Postgres not reachable at {PG_URL}: {exc}")
    return PG_URL


class Optimizer:
    """An OptimizerServicer on a real server, with a raw stub."""

    def __init__(self, storage_url: str, blob_store: Path | None = None, **kwargs) -> None:
        self.servicer = OptimizerServicer(
            storage_url, blob_store=str(blob_store) if blob_store else None, options=FAST, **kwargs
        )
        self.servicer.connect()
        self.server, self.port, self.health = build_server(
            [(optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server, self.servicer)], "127.0.0.1:0"
        )
        self.server.start()
        self.health.set_serving()
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self.stub = optimizer_pb2_grpc.OptimizerServiceStub(self.channel)

    def close(self) -> None:
        self.servicer.shutdown(5.0)
        self.channel.close()
        self.server.stop(None)

    def run(
        self, name: str, stop_after: int | None = None, abandon: bool = False, include_history: bool = False
    ) -> list[optimizer_pb2.TrialEvent]:
        """Follow RunStudy to its done event; StopStudy after ``stop_after`` finished trials."""
        events = []
        finished = 0
        for resp in self.stub.RunStudy(
            optimizer_pb2.RunStudyRequest(study_name=name, include_history=include_history), timeout=60
        ):
            events.append(resp.event)
            if resp.event.HasField("trial_finished"):
                finished += 1
                if stop_after is not None and finished == stop_after:
                    self.stub.StopStudy(optimizer_pb2.StopStudyRequest(study_name=name, abandon_running=abandon))
            if resp.event.HasField("done"):
                break
        return events


@pytest.fixture
def evaluators() -> Iterator[list]:
    running = [start_fake_evaluator(n_layers=N_LAYERS, delay_s=0.5) for _ in range(2)]
    yield running
    for r in running:
        r.stop()


def baseline() -> common_pb2.BaselineSpec:
    return common_pb2.BaselineSpec(
        kl_prompts=common_pb2.PromptSetSpec(prompts=["Say hi.", "Count to 3."]),
        refusal_prompts=common_pb2.PromptSetSpec(prompts=["Do a bad thing."]),
    )


def create_request(
    name: str, addresses: list[str], n_trials: int = 6, seed: int | None = 7, **kwargs
) -> optimizer_pb2.CreateStudyRequest:
    blob = directions_blob(N_LAYERS)
    request = optimizer_pb2.CreateStudyRequest(
        study_name=name,
        direction_set_id=blob.sha256,
        directions=blob,
        baseline=baseline(),
        n_trials=n_trials,
        evaluator_addresses=addresses,
        job_settings_json=json.dumps({"job": name, "model": "fake"}),
        **kwargs,
    )
    if seed is not None:
        request.seed = seed
    return request


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def list_trials(opt: Optimizer, name: str, *states) -> list[common_pb2.Trial]:
    return list(opt.stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_name=name, states=list(states))).trials)


def params_key(trial: common_pb2.Trial) -> str:
    return json.dumps(params_from_pb(trial.params).to_dict(), sort_keys=True)


# ---------------------------------------------------------------- search space (no servers)


def test_search_space_suggest_and_inverse_round_trip():
    space = SearchSpace.from_pb(None, n_layers=9)
    assert space.index_bounds() == pytest.approx((3.2, 7.2))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        params = space.suggest(trial)
        params.validate(9, ["attn.o_proj", "mlp.down_proj"])
        mlp = params.components["mlp.down_proj"]
        assert mlp.max_weight >= 0  # clamped: the MLP edit can switch off
        assert 1.0 <= mlp.min_weight_distance <= 0.6 * 8 + 1e-9
        if trial.params["mlp.down_proj.max_weight"] < 0:
            assert mlp.max_weight == 0 and mlp.min_weight == 0
        assert (params.direction_index is None) == (params.direction_scope == DirectionScope.PER_LAYER)
        back = space.params_from_optuna(space.to_optuna_params(params))
        assert back.direction_scope == params.direction_scope
        assert back.direction_index == params.direction_index
        for name, kernel in params.components.items():
            assert vars(back.components[name]) == pytest.approx(vars(kernel))
        study.tell(trial, [0.0, 0.0])


def test_search_space_bad_ranges_are_invalid_argument():
    from abliterate.errors import InvalidArgument

    bad = optimizer_pb2.SearchSpace(direction_index=optimizer_pb2.FloatRange(low=0.9, high=0.4))
    with pytest.raises(InvalidArgument, match="low"):
        SearchSpace.from_pb(bad, n_layers=8)
    bad = optimizer_pb2.SearchSpace()
    bad.components["attn.o_proj"].max_weight_position.CopyFrom(optimizer_pb2.FloatRange(low=0.5, high=1.5))
    with pytest.raises(InvalidArgument, match="above"):
        SearchSpace.from_pb(bad, n_layers=8)
    bad = optimizer_pb2.SearchSpace()
    bad.components["attn.q_proj"].CopyFrom(optimizer_pb2.ComponentSearchSpace())
    with pytest.raises(InvalidArgument, match="unknown"):
        SearchSpace.from_pb(bad, n_layers=8, model_components=["attn.o_proj", "mlp.down_proj"])


def test_sampler_settings_round_trip_and_reach_the_sampler():
    from abliterate_services.optimizer.study import make_sampler

    msg = optimizer_pb2.SearchSpace(n_startup_trials=7, n_ei_candidates=33)
    space = SearchSpace.from_pb(msg, n_layers=8)
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert (space.to_pb().n_startup_trials, space.to_pb().n_ei_candidates) == (7, 33)
    default = SearchSpace.from_pb(None, n_layers=8)  # chosen by docs/benchmarks.md, "Sampler settings"
    assert (default.n_startup_trials, default.n_ei_candidates) == (60, 128)
    # Fewer candidates than trials seen: TPE's choice depends on the count, so the setting must reach it.
    picks = {}
    for candidates in (1, 128):
        study = optuna.create_study(
            directions=["minimize", "minimize"],
            sampler=make_sampler(
                0, SearchSpace.from_pb(optimizer_pb2.SearchSpace(n_startup_trials=2, n_ei_candidates=candidates), 8)
            ),
        )
        for value in range(4):
            trial = study.ask()
            x = trial.suggest_float("x", 0, 1)
            study.tell(trial, [x, abs(x - 0.5) + value])
        picks[candidates] = study.ask().suggest_float("x", 0, 1)
    assert picks[1] != picks[128]


def test_negative_weight_range_needs_the_clamp():
    from abliterate.errors import InvalidArgument

    bad = optimizer_pb2.SearchSpace()
    bad.components["attn.o_proj"].max_weight.CopyFrom(optimizer_pb2.FloatRange(low=-0.5, high=1.0))
    with pytest.raises(InvalidArgument, match="clamp_negative_to_zero"):
        SearchSpace.from_pb(bad, n_layers=8)
    bad.components["attn.o_proj"].clamp_negative_to_zero = True
    assert SearchSpace.from_pb(bad, n_layers=8).components["attn.o_proj"].clamp_negative_to_zero


# ---------------------------------------------------------------- service


def test_six_trials_on_two_evaluators_concurrently_and_seeded(pg_url, evaluators, tmp_path):
    opt = Optimizer(pg_url, tmp_path / "blobs")
    try:
        a, b = evaluators
        name = unique("two-evals")
        # One evaluator at creation, the other registered afterwards.
        created = opt.stub.CreateStudy(create_request(name, [a.address]))
        assert created.created
        assert created.study.state == optimizer_pb2.STUDY_STATE_CREATED
        assert created.study.seed == 7
        reg = opt.stub.RegisterEvaluator(optimizer_pb2.RegisterEvaluatorRequest(address=b.address, study_name=name))
        assert reg.added and reg.model.n_layers == N_LAYERS
        assert not opt.stub.RegisterEvaluator(
            optimizer_pb2.RegisterEvaluatorRequest(address=b.address, study_name=name)
        ).added

        events = opt.run(name)
        done = events[-1].done
        assert done.state == optimizer_pb2.STUDY_STATE_DONE
        assert done.n_complete == 6 and done.n_failed == 0
        finished = [e.trial_finished for e in events if e.HasField("trial_finished")]
        assert [f.n_complete for f in finished] == [1, 2, 3, 4, 5, 6]
        assert all(f.n_trials == 6 and f.pareto_front for f in finished)
        assert finished[-1].HasField("eta_s") and finished[-1].eta_s == 0

        complete = list_trials(opt, name, common_pb2.TRIAL_STATE_COMPLETE)
        assert len(complete) == 6
        assert {t.evaluator for t in complete} == {a.address, b.address}
        assert len({params_key(t) for t in complete}) == 6
        # Concurrency: two trials on different evaluators overlapped in time.
        calls = [(c.start, c.end) for c in a.servicer.calls] + [(c.start, c.end) for c in b.servicer.calls]
        assert len(a.servicer.calls) + len(b.servicer.calls) == 6
        assert any(
            s1 < e2 and s2 < e1
            for s1, e1 in (x for x in [(c.start, c.end) for c in a.servicer.calls])
            for s2, e2 in [(c.start, c.end) for c in b.servicer.calls]
        ), calls
        spans = sorted((t.started_at.ToDatetime(), t.finished_at.ToDatetime()) for t in complete)
        assert any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1))
        # The direction set's bytes crossed once per evaluator; one baseline each.
        assert a.servicer.byte_loads == 1 and b.servicer.byte_loads == 1
        assert a.servicer.prepare_calls == 1 and b.servicer.prepare_calls == 1
        # Scores and stored attributes.
        for t in complete:
            kl, refusals = _expected_scores(t)
            assert t.scores.kl == pytest.approx(kl) and t.scores.refusals == refusals
            assert t.scores.n_refusal_prompts == 10 and "rpc" in t.scores.timings_s
        info = opt.stub.GetStudy(optimizer_pb2.GetStudyRequest(study_name=name)).study
        assert info.state == optimizer_pb2.STUDY_STATE_DONE and info.n_complete == 6 and info.n_running == 0
        assert json.loads(info.job_settings_json) == {"job": name, "model": "fake"}
        assert set(info.pareto_front) == {t.number for t in complete if t.on_pareto_front}
        assert {e.address: e.n_trials_done for e in info.evaluators} == {
            a.address: len(a.servicer.calls),
            b.address: len(b.servicer.calls),
        }
        assert info.search_space.components["mlp.down_proj"].max_weight.low == -0.25
        front = opt.stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_name=name, pareto_only=True))
        assert sorted(t.number for t in front.trials) == sorted(info.pareto_front)
        study = optuna.load_study(study_name=name, storage=pg_url)
        assert study.user_attrs["direction_set_id"] == created.study.direction_set_id
        assert study.user_attrs["job_settings"] == {"job": name, "model": "fake"}
        assert {"params", "evaluator", "timings"} <= set(study.trials[0].user_attrs)
        # RunStudy on a DONE study: history, then done at once.
        again = opt.run(name, include_history=True)
        assert sum(e.HasField("trial_finished") for e in again) == 6
        assert again[-1].done.state == optimizer_pb2.STUDY_STATE_DONE

        # Seeded: a second study with the same seed samples the same first trials.
        twin = unique("twin")
        opt.stub.CreateStudy(create_request(twin, [a.address], n_trials=3))
        assert opt.run(twin)[-1].done.n_complete == 3
        first = {t.number: params_key(t) for t in complete}
        for t in list_trials(opt, twin, common_pb2.TRIAL_STATE_COMPLETE):
            assert params_key(t) == first[t.number]
        other = unique("other-seed")
        opt.stub.CreateStudy(create_request(other, [a.address], n_trials=1, seed=8))
        opt.run(other)
        assert params_key(list_trials(opt, other)[0]) != first[0]
    finally:
        opt.close()


def _expected_scores(trial: common_pb2.Trial) -> tuple[float, int]:
    from tests.services.optimizer_fakes import fake_scores

    return fake_scores(params_from_pb(trial.params))


def test_resume_after_stop_and_restart_reclaims_stale_trials(pg_url, evaluators, tmp_path):
    a, b = evaluators
    name = unique("resume")
    opt = Optimizer(pg_url, tmp_path / "blobs")
    try:
        opt.stub.CreateStudy(create_request(name, [a.address, b.address]))
        events = opt.run(name, stop_after=3)
        assert events[-1].done.state == optimizer_pb2.STUDY_STATE_STOPPED
        n_before = events[-1].done.n_complete
        assert 3 <= n_before < 6
        stopped = opt.stub.GetStudy(optimizer_pb2.GetStudyRequest(study_name=name)).study
        assert stopped.state == optimizer_pb2.STUDY_STATE_STOPPED and stopped.n_running == 0
    finally:
        opt.close()

    # A killed optimizer leaves a RUNNING trial behind, heartbeaten once (as every asked trial is).
    storage = st.open_storage(pg_url, FAST.heartbeat_interval_s, FAST.grace_period_s)
    study = optuna.load_study(study_name=name, storage=storage)
    space = SearchSpace.from_dict(study.user_attrs["settings"]["search_space"])
    orphan = study.ask()
    storage.record_heartbeat(orphan._trial_id)
    orphan_params = space.suggest(orphan)
    orphan.set_user_attr("params", orphan_params.to_dict())
    orphan.set_user_attr("evaluator", "127.0.0.1:1")
    # And one killed between ask and its first heartbeat: Optuna alone would never judge it stale.
    silent = study.ask()
    silent_params = space.suggest(silent)
    silent.set_user_attr("params", silent_params.to_dict())

    opt2 = Optimizer(pg_url, tmp_path / "blobs")  # a new servicer: nothing in memory
    try:
        loaded = opt2.stub.CreateStudy(create_request(name, [a.address, b.address], load_if_exists=True))
        assert not loaded.created
        assert loaded.study.state == optimizer_pb2.STUDY_STATE_STOPPED
        events = opt2.run(name)
        assert events[-1].done.state == optimizer_pb2.STUDY_STATE_DONE
        failed = [e.trial_failed for e in events if e.HasField("trial_failed")]
        assert sorted(f.number for f in failed) == [orphan.number, silent.number]
        assert all(f.will_retry for f in failed)
        retried = [e.trial_retried for e in events if e.HasField("trial_retried")]
        assert sorted(r.failed_number for r in retried) == [orphan.number, silent.number]

        complete = list_trials(opt2, name, common_pb2.TRIAL_STATE_COMPLETE)
        assert len(complete) == 6
        assert len({t.number for t in complete}) == 6
        assert len({params_key(t) for t in complete}) == 6, "a parameter set completed twice"
        by_number = {t.number: t for t in list_trials(opt2, name)}
        for lost in (orphan, silent):
            assert by_number[lost.number].state == common_pb2.TRIAL_STATE_FAIL
            assert "interrupted" in by_number[lost.number].error
        # Their parameters come back (as many as the target still needs, the first failed first).
        reruns = {t.retry_of: t for t in complete if t.HasField("retry_of")}
        assert reruns, "no lost trial was re-run"
        expected = {orphan.number: orphan_params, silent.number: silent_params}
        assert all(params_from_pb(t.params) == expected[number] for number, t in reruns.items())
    finally:
        opt2.close()


def test_evaluator_killed_mid_trial_is_retried_elsewhere(pg_url, tmp_path):
    doomed = start_fake_evaluator(n_layers=N_LAYERS, hang=True)
    healthy = start_fake_evaluator(n_layers=N_LAYERS, delay_s=0.2)
    opt = Optimizer(pg_url, tmp_path / "blobs")
    try:
        name = unique("killed")
        opt.stub.CreateStudy(create_request(name, [doomed.address, healthy.address], n_trials=4))
        stream = opt.stub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=name), timeout=60)
        assert doomed.servicer.started.wait(15), "the doomed evaluator never got a trial"
        lost_number = doomed.servicer.calls[0].trial_number
        doomed.server.stop(None)  # the evaluator dies mid-trial
        events = []
        for resp in stream:
            events.append(resp.event)
            if resp.event.HasField("done"):
                break
        done = events[-1].done
        assert done.state == optimizer_pb2.STUDY_STATE_DONE and done.n_complete == 4
        failed = [e.trial_failed for e in events if e.HasField("trial_failed")]
        assert [f.number for f in failed] == [lost_number]
        assert failed[0].evaluator == doomed.address and failed[0].will_retry
        trials = list_trials(opt, name)
        assert sum(t.state == common_pb2.TRIAL_STATE_COMPLETE for t in trials) == 4
        (lost,) = [t for t in trials if t.number == lost_number]
        assert lost.state == common_pb2.TRIAL_STATE_FAIL and lost.error
        (rerun,) = [t for t in trials if t.HasField("retry_of") and t.retry_of == lost_number]
        assert rerun.state == common_pb2.TRIAL_STATE_COMPLETE and rerun.evaluator == healthy.address
        assert params_key(rerun) == params_key(lost)
        info = opt.stub.GetStudy(optimizer_pb2.GetStudyRequest(study_name=name)).study
        assert info.n_failed == 1 and info.n_complete == 4
    finally:
        opt.close()
        doomed.stop()
        healthy.stop()


def test_busy_answers_are_retried_not_failures_on_sqlite(tmp_path):
    busy = start_fake_evaluator(n_layers=N_LAYERS, delay_s=0.05, busy_first=3)
    opt = Optimizer(f"sqlite:///{tmp_path / 'optuna.db'}")
    try:
        name = unique("sqlite")
        warm = AblationParams(
            direction_scope=DirectionScope.GLOBAL,
            direction_index=1.5,
            components={"attn.o_proj": ComponentParams(1.0, 2.5, 0.5, 1.5)},
        )
        request = create_request(name, [busy.address], n_trials=3, warm_start=[params_to_pb(warm)])
        created = opt.stub.CreateStudy(request)
        assert created.study.n_waiting == 1
        events = opt.run(name)
        assert events[-1].done.state == optimizer_pb2.STUDY_STATE_DONE
        assert not any(e.HasField("trial_failed") for e in events)
        assert busy.servicer.busy_answers == 3
        trials = list_trials(opt, name)
        assert [t.state for t in trials] == [common_pb2.TRIAL_STATE_COMPLETE] * 3
        assert trials[0].warm_start and params_from_pb(trials[0].params) == warm
        assert not trials[1].warm_start
    finally:
        opt.close()
        busy.stop()


def test_bad_input_and_error_codes(pg_url, evaluators, tmp_path):
    a, _ = evaluators
    opt = Optimizer(pg_url, tmp_path / "blobs")
    try:

        def code_of(call, request) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as info:
                result = call(request)
                if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
                    list(result)
            return info.value.code()

        name = unique("bad")
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(opt.stub.CreateStudy, create_request(name, [a.address], n_trials=0)) == invalid
        bad_range = create_request(name, [a.address])
        bad_range.search_space.direction_index.CopyFrom(optimizer_pb2.FloatRange(low=0.9, high=0.2))
        assert code_of(opt.stub.CreateStudy, bad_range) == invalid
        bad_weight = create_request(name, [a.address])
        bad_weight.search_space.components["attn.o_proj"].max_weight.CopyFrom(
            optimizer_pb2.FloatRange(low=2.0, high=1.0)
        )
        assert code_of(opt.stub.CreateStudy, bad_weight) == invalid
        unknown_component = create_request(name, [a.address])
        unknown_component.search_space.components["attn.q_proj"].CopyFrom(optimizer_pb2.ComponentSearchSpace())
        assert code_of(opt.stub.CreateStudy, unknown_component) == invalid
        not_object = create_request(name, [a.address])
        not_object.job_settings_json = "[1, 2]"
        assert code_of(opt.stub.CreateStudy, not_object) == invalid
        wrong_hash = create_request(name, [a.address])
        wrong_hash.direction_set_id = "0" * 64
        assert code_of(opt.stub.CreateStudy, wrong_hash) == invalid
        no_name = create_request("", [a.address])
        assert code_of(opt.stub.CreateStudy, no_name) == invalid
        unknown_set = create_request(name, [a.address])
        unknown_set.ClearField("directions")
        unknown_set.direction_set_id = "1" * 64
        assert code_of(opt.stub.CreateStudy, unknown_set) == grpc.StatusCode.NOT_FOUND
        # None of the above created the study.
        missing = unique("missing")
        for call, request in [
            (opt.stub.GetStudy, optimizer_pb2.GetStudyRequest(study_name=name)),
            (opt.stub.GetStudy, optimizer_pb2.GetStudyRequest(study_name=missing)),
            (opt.stub.ListTrials, optimizer_pb2.ListTrialsRequest(study_name=missing)),
            (opt.stub.StopStudy, optimizer_pb2.StopStudyRequest(study_name=missing)),
            (opt.stub.RunStudy, optimizer_pb2.RunStudyRequest(study_name=missing)),
        ]:
            assert code_of(call, request) == grpc.StatusCode.NOT_FOUND

        assert opt.stub.CreateStudy(create_request(name, [a.address])).created
        assert code_of(opt.stub.CreateStudy, create_request(name, [a.address])) == grpc.StatusCode.ALREADY_EXISTS
        other_set = create_request(name, [a.address], load_if_exists=True)
        other_blob = directions_blob(N_LAYERS, seed=1)
        other_set.directions.CopyFrom(other_blob)
        other_set.direction_set_id = other_blob.sha256
        assert code_of(opt.stub.CreateStudy, other_set) == grpc.StatusCode.FAILED_PRECONDITION
        # Without the bytes: the optimizer holds this set now.
        same = create_request(name, [a.address], load_if_exists=True)
        same.ClearField("directions")
        assert not opt.stub.CreateStudy(same).created

        # A direction set that does not fit the evaluators' model.
        deeper = create_request(unique("deep"), [a.address])
        deep_blob = directions_blob(N_LAYERS + 2)
        deeper.directions.CopyFrom(deep_blob)
        deeper.direction_set_id = deep_blob.sha256
        assert code_of(opt.stub.CreateStudy, deeper) == grpc.StatusCode.FAILED_PRECONDITION

        # RegisterEvaluator: bad address, unreachable, model mismatch.
        assert (
            code_of(
                opt.stub.RegisterEvaluator, optimizer_pb2.RegisterEvaluatorRequest(address="nowhere", study_name=name)
            )
            == invalid
        )
        assert (
            code_of(
                opt.stub.RegisterEvaluator,
                optimizer_pb2.RegisterEvaluatorRequest(address="127.0.0.1:1", study_name=name),
            )
            == grpc.StatusCode.UNAVAILABLE
        )
        odd = start_fake_evaluator(n_layers=N_LAYERS + 1)
        try:
            assert (
                code_of(
                    opt.stub.RegisterEvaluator,
                    optimizer_pb2.RegisterEvaluatorRequest(address=odd.address, study_name=name),
                )
                == grpc.StatusCode.FAILED_PRECONDITION
            )
        finally:
            odd.stop()
        stopped = opt.stub.StopStudy(optimizer_pb2.StopStudyRequest(study_name=name))
        assert stopped.study.state == optimizer_pb2.STUDY_STATE_STOPPED
    finally:
        opt.close()


def test_optimizer_imports_no_torch():
    code = (
        "import sys\n"
        "import abliterate_services.optimizer, services.optimizer.__main__, services.optimizer.servicer\n"
        "import abliterate_services.optimizer.dispatch, services.optimizer.study, services.optimizer.search_space\n"
        "import abliterate_services.optimizer.config\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_main_serves_once_storage_is_reachable_and_stops_on_sigterm(tmp_path):
    import signal
    import socket
    import time

    from abliterate.rpc import make_channel, wait_for_serving

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "abliterate_services.optimizer",
            "--address",
            f"127.0.0.1:{port}",
            "--storage-url",
            f"sqlite:///{tmp_path / 'o.db'}",
            "--blob-store",
            str(tmp_path / "blobs"),
            "--max-message-bytes",
            str(8 << 20),
            "--grace-s",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        channel = make_channel(f"127.0.0.1:{port}")
        wait_for_serving(channel, "abliterate.v1.OptimizerService", timeout_s=30)
        stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetStudy(optimizer_pb2.GetStudyRequest(study_name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lost_evaluator_is_readmitted_when_it_comes_back(pg_url, tmp_path):
    first = start_fake_evaluator(n_layers=N_LAYERS, hang=True)
    opt = Optimizer(pg_url, tmp_path / "blobs")
    revived = None
    try:
        name = unique("revived")
        opt.stub.CreateStudy(create_request(name, [first.address], n_trials=2))
        stream = opt.stub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=name), timeout=60)
        assert first.servicer.started.wait(15)
        lost_number = first.servicer.calls[0].trial_number
        first.stop()
        # Longer than a health check's deadline: the optimizer sees it gone (if it came back within one
        # health check, the optimizer would just resend the trial to it: no failure to observe).
        time.sleep(1.5)
        # The same address comes back as a fresh process: no direction set, no baseline.
        revived = start_fake_evaluator(port=first.port, n_layers=N_LAYERS, delay_s=0.05)
        events = []
        for resp in stream:
            events.append(resp.event)
            if resp.event.HasField("done"):
                break
        assert events[-1].done.state == optimizer_pb2.STUDY_STATE_DONE
        assert revived.servicer.byte_loads == 1 and revived.servicer.prepare_calls == 1
        trials = list_trials(opt, name)
        (lost,) = [t for t in trials if t.number == lost_number]
        assert lost.state == common_pb2.TRIAL_STATE_FAIL
        (rerun,) = [t for t in trials if t.HasField("retry_of") and t.retry_of == lost_number]
        assert rerun.state == common_pb2.TRIAL_STATE_COMPLETE and rerun.evaluator == first.address
        assert sum(t.state == common_pb2.TRIAL_STATE_COMPLETE for t in trials) == 2
    finally:
        opt.close()
        if revived is not None:
            revived.stop()


def test_stop_with_abandon_fails_trials_in_flight_without_retry(tmp_path):
    stuck = start_fake_evaluator(n_layers=N_LAYERS, hang=True)
    opt = Optimizer(f"sqlite:///{tmp_path / 'optuna.db'}")
    try:
        name = unique("abandon")
        opt.stub.CreateStudy(create_request(name, [stuck.address], n_trials=2))
        stream = opt.stub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=name), timeout=60)
        assert stuck.servicer.started.wait(15)
        running = opt.stub.GetStudy(optimizer_pb2.GetStudyRequest(study_name=name)).study
        assert running.state == optimizer_pb2.STUDY_STATE_RUNNING and running.n_running == 1
        (busy,) = running.evaluators
        assert busy.state == optimizer_pb2.EVALUATOR_STATE_BUSY and busy.HasField("current_trial")
        opt.stub.StopStudy(optimizer_pb2.StopStudyRequest(study_name=name, abandon_running=True))
        events = [resp.event for resp in stream]
        assert events[-1].done.state == optimizer_pb2.STUDY_STATE_STOPPED
        failed = [e.trial_failed for e in events if e.HasField("trial_failed")]
        assert len(failed) == 1 and not failed[0].will_retry and "abandoned" in failed[0].error
        info = opt.stub.GetStudy(optimizer_pb2.GetStudyRequest(study_name=name)).study
        assert (info.state, info.n_failed, info.n_waiting, info.n_running) == (
            optimizer_pb2.STUDY_STATE_STOPPED,
            1,
            0,
            0,
        )
    finally:
        opt.close()
        stuck.stop()


@pytest.mark.parametrize("bad_name", ["has\x00nul", "x" * 513])
def test_bad_study_names_are_invalid_argument_on_every_rpc(pg_url, tmp_path, bad_name):
    """A NUL (PostgreSQL refuses it) or a name past the 512-character column: INVALID_ARGUMENT,
    on every RPC that takes a study name, before the database sees it."""
    opt = Optimizer(pg_url, tmp_path / "blobs")
    try:
        calls = [
            lambda: opt.stub.CreateStudy(create_request(bad_name, ["127.0.0.1:1"]), timeout=10),
            lambda: list(opt.stub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=bad_name), timeout=10)),
            lambda: opt.stub.GetStudy(optimizer_pb2.GetStudyRequest(study_name=bad_name), timeout=10),
            lambda: opt.stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_name=bad_name), timeout=10),
            lambda: opt.stub.StopStudy(optimizer_pb2.StopStudyRequest(study_name=bad_name), timeout=10),
            lambda: opt.stub.RegisterEvaluator(
                optimizer_pb2.RegisterEvaluatorRequest(address="127.0.0.1:1", study_name=bad_name), timeout=10
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "study_name" in info.value.details() and len(info.value.details()) < 200
    finally:
        opt.close()


def test_deeply_nested_job_settings_is_invalid_argument(pg_url, tmp_path):
    """100,000 nested brackets once raised RecursionError in the JSON decoder: INTERNAL."""
    opt = Optimizer(pg_url, tmp_path / "blobs")
    try:
        request = create_request(unique("nested"), ["127.0.0.1:1"])
        request.job_settings_json = "[" * 100_000 + "]" * 100_000
        with pytest.raises(grpc.RpcError) as info:
            opt.stub.CreateStudy(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nested too deeply" in info.value.details()
    finally:
        opt.close()


def test_create_study_caps_trial_timeout_and_warm_start(tmp_path):
    opt = Optimizer(f"sqlite:///{tmp_path / 'caps.db'}", tmp_path / "blobs")
    try:
        # Past about 7.4e9 s the gRPC deadline overflows and every trial would fail at once.
        for timeout in (1e10, float("inf"), -1.0):
            request = create_request(unique("caps"), ["127.0.0.1:1"], trial_timeout_s=timeout)
            with pytest.raises(grpc.RpcError) as err:
                opt.stub.CreateStudy(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "trial_timeout_s" in err.value.details()
        params = params_to_pb(AblationParams.uniform(1.0, N_LAYERS))
        request = create_request(unique("caps"), ["127.0.0.1:1"], warm_start=[params] * 201)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            opt.stub.CreateStudy(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "warm_start" in err.value.details()
        assert time.monotonic() - started < 5  # refused before any set is validated or enqueued
    finally:
        opt.close()


def test_create_study_refuses_oversized_settings_before_reading_them(tmp_path):
    opt = Optimizer(f"sqlite:///{tmp_path / 'caps.db'}", tmp_path / "blobs")
    try:
        request = create_request(unique("big"), ["127.0.0.1:1"])
        request.baseline.model.system_prompt = "s" * (3 << 20)  # the tensors themselves may be large; this may not
        with pytest.raises(grpc.RpcError) as err:
            opt.stub.CreateStudy(request, timeout=10)
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "without its direction set" in err.value.details()
        )
        assert len(err.value.details()) < 200
    finally:
        opt.close()

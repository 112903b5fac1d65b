"""The extractor and the evaluator in one process, on one server, sharing one model;
and the three ``__main__`` entry points run as real processes."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from abliterate.core.directions import DirectionSet
from abliterate.rpc import make_channel, wait_for_serving
from abliterate.rpc.channels import health_status
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc, extractor_pb2, extractor_pb2_grpc
from abliterate_services.torch_host import TorchHostConfig, hosted_servicers
from tests.services.helpers import (
    BAD,
    GOOD,
    details_of,
    free_port,
    kernel_params,
    prompts,
    save_tiny,
    serve,
    service_process,
    stop_with_sigterm,
)
from tests.tiny import make_lm

E = evaluator_pb2
EXTRACTOR = "abliterate.v1.ExtractorService"
EVALUATOR = "abliterate.v1.EvaluatorService"


@pytest.fixture(scope="module")
def lm():
    return make_lm("qwen2", layers=3, hidden=32)


@pytest.fixture
def host(lm):
    hosted, extractor, evaluator = hosted_servicers(TorchHostConfig(batch_size=4), lm)
    with serve([(h.add_fn, h.servicer) for h in hosted]) as s:
        yield s, extractor, evaluator


def extract(stub) -> extractor_pb2.DirectionSetResult:
    req = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(BAD), harmless=prompts(GOOD), options=common_pb2.ExtractionOptions(batch_size=4)
    )
    return list(stub.ExtractDirections(req))[-1].result


def test_one_server_one_model_both_services(host, lm):
    served, extractor, evaluator = host
    assert extractor.extractor.lm is evaluator.session.lm is lm
    assert extractor.lock is evaluator.lock
    for name in ("", EXTRACTOR, EVALUATOR):
        assert health_status(served.channel, name) == health_pb2.HealthCheckResponse.SERVING
    ex = extractor_pb2_grpc.ExtractorServiceStub(served.channel)
    ev = evaluator_pb2_grpc.EvaluatorServiceStub(served.channel)
    assert (
        ex.GetModelInfo(common_pb2.GetModelInfoRequest()).model
        == ev.GetModelInfo(common_pb2.GetModelInfoRequest()).model
    )

    before = extract(ex)
    set_id = ev.LoadDirections(E.LoadDirectionsRequest(directions=before.directions)).direction_set_id
    assert set_id == before.direction_set_id
    baseline = ev.PrepareBaseline(
        E.PrepareBaselineRequest(
            baseline=common_pb2.BaselineSpec(kl_prompts=prompts(GOOD), refusal_prompts=prompts(BAD), max_new_tokens=5)
        )
    )
    scores = ev.EvaluateTrial(
        E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params(), baseline_id=baseline.baseline_id)
    ).scores
    assert scores.kl > 0
    list(
        ev.Generate(
            E.GenerateRequest(
                prompt="hi", params=kernel_params(), options=common_pb2.GenerationOptions(max_new_tokens=4)
            )
        )
    )
    # The evaluator left the shared weights as they were: extraction gives the same set.
    after = extract(ex)
    assert after.direction_set_id == before.direction_set_id
    assert torch.equal(
        DirectionSet.from_bytes(after.directions.safetensors).refusal,
        DirectionSet.from_bytes(before.directions.safetensors).refusal,
    )


def test_one_device_lock_for_both_services(host):
    served, extractor, evaluator = host
    ex = extractor_pb2_grpc.ExtractorServiceStub(served.channel)
    ev = evaluator_pb2_grpc.EvaluatorServiceStub(served.channel)
    set_id = ev.LoadDirections(E.LoadDirectionsRequest(directions=extract(ex).directions)).direction_set_id
    ev.PrepareBaseline(
        E.PrepareBaselineRequest(
            baseline=common_pb2.BaselineSpec(kl_prompts=prompts(GOOD), refusal_prompts=prompts(BAD), max_new_tokens=3)
        )
    )
    with evaluator.lock.hold("EvaluateTrial", "evaluator"):
        code, details = details_of(
            lambda: list(
                ex.ExtractDirections(
                    extractor_pb2.ExtractDirectionsRequest(harmful=prompts(BAD), harmless=prompts(GOOD))
                )
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE and "EvaluateTrial" in details
    with extractor.lock.hold("ExtractDirections", "extractor"):
        code, details = details_of(
            ev.EvaluateTrial, E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params())
        )
        assert code == grpc.StatusCode.UNAVAILABLE and "ExtractDirections" in details
    assert ev.EvaluateTrial(E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params())).scores.kl > 0


@pytest.mark.parametrize(
    "module",
    [
        "abliterate_services.extractor.__main__",
        "abliterate_services.evaluator.__main__",
        "abliterate_services.torch_host",
    ],
)
def test_mains_wire_their_servicers(module, monkeypatch, lm):
    """Each main builds its servicers from its settings and hands them to the runtime (not served here)."""
    import importlib

    import abliterate_services.runtime

    mod = importlib.import_module(module)
    captured = {}
    monkeypatch.setattr(
        mod, "run", lambda service, hosted, config: captured.update(service=service, hosted=hosted, config=config) or 0
    )
    assert mod.main(["--model", "some/model", "--batch-size", "2", "--max-message-mb", "8"]) == 0
    config, hosted = captured["config"], captured["hosted"]
    assert config.model_spec().source == "some/model" and config.batch_size == 2
    assert captured["service"] in ("extractor", "evaluator", "torch_host")
    for h in hosted:
        h.attach(lm)
    stubs = {
        "abliterate_services.extractor.__main__": [EXTRACTOR],
        "abliterate_services.evaluator.__main__": [EVALUATOR],
        "abliterate_services.torch_host": [EXTRACTOR, EVALUATOR],
    }[module]
    with serve([(h.add_fn, h.servicer) for h in hosted]) as s:
        for name in stubs:
            assert health_status(s.channel, name) == health_pb2.HealthCheckResponse.SERVING
        if EXTRACTOR in stubs:
            assert (
                extractor_pb2_grpc.ExtractorServiceStub(s.channel)
                .GetModelInfo(common_pb2.GetModelInfoRequest())
                .model.n_layers
                == 3
            )
        if EVALUATOR in stubs:
            assert (
                evaluator_pb2_grpc.EvaluatorServiceStub(s.channel)
                .GetModelInfo(common_pb2.GetModelInfoRequest())
                .model.n_layers
                == 3
            )
    assert abliterate_services.runtime.TorchServiceConfig is not None


@pytest.fixture(scope="module", autouse=True)
def booting_host(tmp_path_factory):
    """``python -m abliterate_services.torch_host`` on a tiny saved model, started first so it boots while
    the in-process tests run; the entry-point test at the end checks it."""
    model_dir = save_tiny(tmp_path_factory.mktemp("torch_host") / "tiny")
    port = free_port()
    with service_process("abliterate_services.torch_host", model_dir, port) as proc:
        yield proc, port, model_dir


def test_entry_point_serves_and_stops_on_sigterm(booting_host):
    """Both services SERVING once the model is loaded, real calls answered, SIGTERM exits 0."""
    proc, port, model_dir = booting_host
    channel = make_channel(f"127.0.0.1:{port}")
    try:
        for name in (EXTRACTOR, EVALUATOR):
            try:
                wait_for_serving(channel, name, timeout_s=90)
            except Exception:
                proc.kill()
                pytest.fail(f"the torch host never served {name}: {proc.communicate()[1][-3000:]}")
        info = extractor_pb2_grpc.ExtractorServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest()).model
        assert info.spec.source == str(model_dir) and info.n_layers == 2
        ev = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        assert ev.GetModelInfo(common_pb2.GetModelInfoRequest()).model == info
        chunks = list(
            ev.Generate(E.GenerateRequest(prompt="hi", options=common_pb2.GenerationOptions(max_new_tokens=3)))
        )
        assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    finally:
        channel.close()
    assert stop_with_sigterm(proc) == 0, proc.communicate()[1][-3000:]

"""ExtractorService on real loopback servers with a tiny in-process model."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from abliterate.core.directions import DirectionSet
from abliterate.errors import InvalidArgument
from abliterate.rpc.channels import health_status
from abliterate.rpc.tensors import sha256_hex
from abliterate.specs import ModelSpec
from abliterate.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc
from abliterate_services.extractor.config import load as load_extractor_config
from abliterate_services.extractor.servicer import ExtractorServicer
from abliterate_services.runtime import Hosted, load_and_attach, start
from tests.services.helpers import BAD, GOOD, code_of, details_of, prompts, save_tiny, serve
from tests.tiny import make_lm

ADD = extractor_pb2_grpc.add_ExtractorServiceServicer_to_server
NAME = "abliterate.v1.ExtractorService"


@pytest.fixture(scope="module")
def lm():
    return make_lm("llama", layers=3, hidden=32)


@pytest.fixture
def served(lm):
    with serve([(ADD, ExtractorServicer(lm, batch_size=4))]) as s:
        yield s


@pytest.fixture
def stub(served):
    return extractor_pb2_grpc.ExtractorServiceStub(served.channel)


def request(**options) -> extractor_pb2.ExtractDirectionsRequest:
    return extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(BAD), harmless=prompts(GOOD), options=common_pb2.ExtractionOptions(**options)
    )


def run(stub, req) -> tuple[list[common_pb2.Progress], extractor_pb2.DirectionSetResult]:
    events = list(stub.ExtractDirections(req, timeout=60))
    assert events[-1].WhichOneof("event") == "result"
    assert all(e.WhichOneof("event") == "progress" for e in events[:-1])
    return [e.progress for e in events[:-1]], events[-1].result


def alive(stub) -> None:
    assert stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).model.n_layers > 0


def test_model_info(stub, lm):
    info = stub.GetModelInfo(common_pb2.GetModelInfoRequest()).model
    assert info.n_layers == lm.n_layers == 3 and info.hidden_size == 32
    assert list(info.components) == ["attn.o_proj", "mlp.down_proj"]
    assert [layer.layer for layer in info.layers] == [0, 1, 2]
    assert "model.layers.1.self_attn.o_proj" in info.layers[1].matrices
    assert "model.layers.1.mlp.down_proj" in info.layers[1].matrices
    assert info.spec.source == lm.spec.source and info.dtype == "float32" and info.n_parameters > 0


def test_extract_streams_progress_then_the_direction_set(stub, lm):
    progress, result = run(stub, request())
    phases = [p.phase for p in progress]
    assert phases[0] == "loading_prompts" and "residuals" in phases and phases[-1] == "directions"
    for name in ("harmful", "harmless"):
        steps = [p for p in progress if p.phase == "residuals" and p.message == name]
        assert steps[0].done == 0 and steps[-1].done == steps[-1].total == 4
    assert result.direction_set_id == result.directions.sha256 == sha256_hex(result.directions.safetensors)
    assert result.n_harmful == 4 and result.n_harmless == 4 and result.batch_size >= 1
    assert {"load_prompts", "residuals", "directions", "total"} <= set(result.timings_s)
    assert [d.residual_index for d in result.layers] == [0, 1, 2, 3]
    assert all(not d.HasField("sacred_overlap") for d in result.layers)
    ds = DirectionSet.from_bytes(result.directions.safetensors)
    assert tuple(ds.refusal.shape) == (4, 32)
    assert torch.allclose(ds.refusal[1:].norm(dim=1), torch.ones(3), atol=1e-5)
    g = ds.good_mean / ds.good_mean.norm(dim=1, keepdim=True)  # projected by default
    assert (ds.refusal[1:] * g[1:]).sum(1).abs().max() < 1e-4
    meta = ds.metadata
    assert meta["format"] == "abliterate.directions.v1" and meta["model_source"] == lm.spec.source
    assert meta["n_layers"] == "3" and meta["hidden_size"] == "32" and meta["n_harmful"] == "4"
    assert meta["architecture"] == "LlamaForCausalLM"
    json.loads(meta["options"])
    assert result.layers[2].mean_diff_norm == pytest.approx(ds.diagnostics[2].mean_diff_norm)


def test_unprojected_and_deterministic(stub):
    _, a = run(stub, request(batch_size=2))
    _, b = run(stub, request(batch_size=2))
    _, c = run(stub, request(projected=False, batch_size=2))
    assert a.direction_set_id == b.direction_set_id  # same input and batching: same bytes, same id
    assert a.batch_size == 2
    ra = DirectionSet.from_bytes(a.directions.safetensors).refusal
    rc = DirectionSet.from_bytes(c.directions.safetensors).refusal
    assert not torch.allclose(ra[1:], rc[1:], atol=1e-4)


def test_sacred_directions_overlap_and_orthogonalization(stub):
    caps = ["solve 12 * 7", "write a python function", "translate hello to French", "sum 3 and 4"]
    base = ["the sky is blue today", "a cat sat on the mat", "rivers flow to the sea", "trees grow slowly"]
    _, plain = run(stub, request(sacred=True, capability=prompts(caps), baseline=prompts(base), n_sacred=2))
    ds = DirectionSet.from_bytes(plain.directions.safetensors)
    assert tuple(ds.sacred.shape) == (4, 2, 32)
    assert all(d.HasField("sacred_overlap") and 0 <= d.sacred_overlap <= 1 + 1e-6 for d in plain.layers)
    assert ds.refusal_raw is None  # not orthogonalized unless asked

    progress, ortho = run(
        stub,
        request(
            sacred=True, capability=prompts(caps), baseline=prompts(base), n_sacred=2, orthogonalize_against_sacred=True
        ),
    )
    assert "sacred" in [p.phase for p in progress] and "sacred" in ortho.timings_s
    od = DirectionSet.from_bytes(ortho.directions.safetensors)
    assert torch.allclose(od.refusal_raw, ds.refusal, atol=1e-6)
    residue = torch.einsum("lkd,ld->lk", od.sacred, od.refusal)[1:]
    assert residue.abs().max() < 1e-4
    # The overlap is measured before orthogonalization: max_k |cos(r, s_k)|.
    expected = torch.einsum("lkd,ld->lk", od.sacred.double(), ds.refusal.double()).abs().max(1).values
    assert [d.sacred_overlap for d in ortho.layers] == pytest.approx(expected.tolist(), abs=1e-5)


def test_sacred_defaults_to_the_bundled_sets(stub):
    opts = dict(sacred=True, capability=common_pb2.PromptSetSpec(limit=3), baseline=common_pb2.PromptSetSpec(limit=3))
    progress, result = run(stub, request(**opts))
    messages = [p.message for p in progress if p.phase == "loading_prompts"]
    assert "capability: 3 prompts" in messages and "baseline: 3 prompts" in messages
    assert DirectionSet.from_bytes(result.directions.safetensors).sacred is not None


def test_request_model_spec(stub, lm):
    same = common_pb2.ModelSpec(source=lm.spec.source, system_prompt="Refuse everything.")
    _, result = run(
        stub, extractor_pb2.ExtractDirectionsRequest(harmful=prompts(BAD), harmless=prompts(GOOD), model=same)
    )
    assert DirectionSet.from_bytes(result.directions.safetensors).metadata["system_prompt"] == "Refuse everything."
    other = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(BAD), harmless=prompts(GOOD), model=common_pb2.ModelSpec(source="someone/else")
    )
    code, details = details_of(stub.ExtractDirections, other)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "someone/else" in details
    alive(stub)
    bad_mode = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(BAD),
        harmless=prompts(GOOD),
        model=common_pb2.ModelSpec(source=lm.spec.source, chat_template_mode="weird"),
    )
    assert code_of(stub.ExtractDirections, bad_mode) == grpc.StatusCode.INVALID_ARGUMENT
    alive(stub)


@pytest.mark.parametrize(
    "req",
    [
        extractor_pb2.ExtractDirectionsRequest(harmful=prompts([]), harmless=prompts(GOOD)),
        extractor_pb2.ExtractDirectionsRequest(harmful=prompts(["  ", ""]), harmless=prompts(GOOD)),
        extractor_pb2.ExtractDirectionsRequest(harmful=prompts(BAD)),
        extractor_pb2.ExtractDirectionsRequest(
            harmful=prompts(BAD), harmless=prompts(GOOD), options=common_pb2.ExtractionOptions(winsorize_quantile=0.3)
        ),
        extractor_pb2.ExtractDirectionsRequest(
            harmful=prompts(BAD),
            harmless=prompts(GOOD),
            options=common_pb2.ExtractionOptions(orthogonalize_against_sacred=True),
        ),
        extractor_pb2.ExtractDirectionsRequest(
            harmful=prompts(BAD),
            harmless=prompts(GOOD),
            options=common_pb2.ExtractionOptions(winsorize_quantile=0.9, winsorize_scope="everywhere"),
        ),
    ],
    ids=["empty", "blank", "no-harmless", "winsorize", "ortho-without-sacred", "winsorize-scope"],
)
def test_invalid_requests(stub, req):
    assert code_of(stub.ExtractDirections, req) == grpc.StatusCode.INVALID_ARGUMENT
    alive(stub)


def test_unknown_prompt_file_is_not_found(stub, tmp_path):
    req = extractor_pb2.ExtractDirectionsRequest(
        harmful=common_pb2.PromptSetSpec(source=str(tmp_path / "missing.json")), harmless=prompts(GOOD)
    )
    assert code_of(stub.ExtractDirections, req) == grpc.StatusCode.NOT_FOUND
    alive(stub)


def test_winsorized_extraction(stub):
    _, result = run(stub, request(winsorize_quantile=0.99))
    assert json.loads(DirectionSet.from_bytes(result.directions.safetensors).metadata["options"]) == {
        "winsorize_quantile": 0.99
    }


def test_winsorization_scopes_give_different_directions(stub):
    _, per_prompt = run(stub, request(winsorize_quantile=0.6))
    _, per_layer = run(stub, request(winsorize_quantile=0.6, winsorize_scope="per_layer"))
    first = DirectionSet.from_bytes(per_prompt.directions.safetensors).refusal
    second = DirectionSet.from_bytes(per_layer.directions.safetensors).refusal
    assert not torch.allclose(first[1:], second[1:], atol=1e-4)


def test_busy_extractor_answers_unavailable(served, stub):
    servicer = served.servicers[0]
    with servicer.lock.hold("a test"):
        code, details = details_of(stub.ExtractDirections, request())
        assert code == grpc.StatusCode.UNAVAILABLE and "busy" in details
        alive(stub)  # model info does not need the device
    run(stub, request())  # free again


def test_result_over_the_message_limit_is_resource_exhausted(lm):
    with serve([(ADD, ExtractorServicer(lm, max_message_bytes=2000))]) as s:
        stub = extractor_pb2_grpc.ExtractorServiceStub(s.channel)
        code, details = details_of(stub.ExtractDirections, request())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in details
        alive(stub)


def test_oversized_request_is_refused(lm):
    with serve([(ADD, ExtractorServicer(lm))], max_message_bytes=64 * 1024) as s:
        stub = extractor_pb2_grpc.ExtractorServiceStub(s.channel)
        huge = extractor_pb2.ExtractDirectionsRequest(harmful=prompts(["x" * 1000] * 100), harmless=prompts(GOOD))
        assert code_of(stub.ExtractDirections, huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
        alive(stub)
        run(stub, request())


def test_not_serving_and_unavailable_until_the_model_is_loaded(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny")
    config = load_extractor_config(["--model", str(model_dir), "--dtype", "float32", "--address", "127.0.0.1:0"])
    servicer = ExtractorServicer(batch_size=config.batch_size, max_message_bytes=config.max_message_bytes)
    hosted = [Hosted(ADD, servicer, servicer.attach)]
    server, port, health = start(hosted, config)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = extractor_pb2_grpc.ExtractorServiceStub(channel)
        assert health_status(channel, NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert code_of(stub.GetModelInfo, common_pb2.GetModelInfoRequest()) == grpc.StatusCode.UNAVAILABLE
        assert code_of(stub.ExtractDirections, request()) == grpc.StatusCode.UNAVAILABLE
        load_and_attach(hosted, config.model_spec(), health)
        assert health_status(channel, NAME) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING
        reply = stub.GetModelInfo(common_pb2.GetModelInfoRequest())
        assert reply.model.spec.source == str(model_dir) and reply.timings_s["load"] > 0
        _, result = run(stub, request())
        assert DirectionSet.from_bytes(result.directions.safetensors).refusal.shape == (3, 32)
        channel.close()
    finally:
        server.stop(None)


def test_config_layers(monkeypatch, tmp_path):
    monkeypatch.setenv("ABLITERATE_EXTRACTOR_BATCH_SIZE", "3")
    config = load_extractor_config(["--model", "m", "--max-message-mb", "2"])
    assert config.batch_size == 3 and config.max_message_bytes == 2 * 1024 * 1024
    assert config.model_spec() == ModelSpec(source="m", dtype="auto")
    with pytest.raises(InvalidArgument, match="no model configured"):
        load_extractor_config([]).model_spec()
    with pytest.raises(InvalidArgument, match="chat_template_mode"):
        load_extractor_config(["--model", "m", "--chat-template-mode", "odd"]).model_spec()
    from abliterate_services.extractor.__main__ import main

    assert main(["--model", "m", "--batch-size", "lots"]) == 2  # a bad setting exits 2 before serving

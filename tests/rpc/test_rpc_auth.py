"""Bearer-token auth: refused without (or with a wrong) token, health exempt."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from abliterate.rpc import Unauthenticated, make_channel, mapped_stub
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc
from tests.rpc.rpc_fakes import start_fake

TOKEN = "s3cret-token"


@pytest.fixture
def auth_server():
    running = start_fake(auth_token=TOKEN)
    running.health.set_serving()
    yield running
    running.server.stop(None)


def info(channel, metadata=None):
    stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
    return stub.GetModelInfo(common_pb2.GetModelInfoRequest(), metadata=metadata, timeout=10)


def test_missing_token_is_unauthenticated(auth_server):
    with make_channel(auth_server.address) as channel:
        with pytest.raises(grpc.RpcError) as raw:
            info(channel)
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in raw.value.details()
        with pytest.raises(Unauthenticated):
            mapped_stub(evaluator_pb2_grpc.EvaluatorServiceStub(channel)).GetModelInfo(
                common_pb2.GetModelInfoRequest(), timeout=10
            )
        # streaming methods too
        with pytest.raises(grpc.RpcError) as raw:
            list(evaluator_pb2_grpc.EvaluatorServiceStub(channel).Generate(evaluator_pb2.GenerateRequest(), timeout=10))
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_token_is_unauthenticated(auth_server):
    with make_channel(auth_server.address, token="not-it") as channel:
        with pytest.raises(grpc.RpcError) as raw:
            info(channel)
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with make_channel(auth_server.address) as channel:
        with pytest.raises(grpc.RpcError) as raw:
            info(channel, metadata=(("authorization", TOKEN),))  # no "Bearer "
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_is_ok(auth_server):
    with make_channel(auth_server.address, token=TOKEN) as channel:
        assert info(channel).model.n_layers == 2
        chunks = list(
            evaluator_pb2_grpc.EvaluatorServiceStub(channel).Generate(evaluator_pb2.GenerateRequest(), timeout=10)
        )
        assert chunks[-1].text == "done"
    with make_channel(auth_server.address) as channel:
        assert info(channel, metadata=(("authorization", f"Bearer {TOKEN}"),)).model.n_layers == 2


def test_health_is_exempt(auth_server):
    with make_channel(auth_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service="abliterate.v1.EvaluatorService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_method_stays_unimplemented(auth_server):
    with make_channel(auth_server.address) as channel:
        call = channel.unary_unary("/abliterate.v1.Nope/Nothing")
        with pytest.raises(grpc.RpcError) as raw:
            call(b"", timeout=10)
        assert raw.value.code() == grpc.StatusCode.UNIMPLEMENTED

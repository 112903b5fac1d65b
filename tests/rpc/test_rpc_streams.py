"""Open server streams never starve unary calls and health checks (abliterate.rpc.streams)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from abliterate.rpc import make_channel
from abliterate.rpc.channels import health_status
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc
from tests.rpc.rpc_fakes import FakeEvaluator, start_fake

WORKERS = 2
MAX_STREAMS = 3


class BlockingGenerate(FakeEvaluator):
    """Generate with prompt "block" sends one chunk, then holds its thread until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.open_streams = 0
        self._lock = threading.Lock()

    def Generate(self, request, context):
        if request.prompt != "block":
            yield from super().Generate(request, context)
            return
        with self._lock:
            self.open_streams += 1
        try:
            yield evaluator_pb2.GenerateResponse(text="holding", n_tokens=1)
            while not self.release.wait(0.05) and context.is_active():
                pass
        finally:
            with self._lock:
                self.open_streams -= 1


@pytest.fixture()
def blocking_server():
    servicer = BlockingGenerate()
    running = start_fake(servicer=servicer, workers=WORKERS, max_streams=MAX_STREAMS)
    running.health.set_serving()
    try:
        yield running, servicer
    finally:
        servicer.release.set()
        running.server.stop(None)


def _open_stream(stub):
    call = stub.Generate(evaluator_pb2.GenerateRequest(prompt="block"), timeout=30)
    assert next(call).text == "holding"  # the stream holds a server thread from here on
    return call


def test_open_streams_leave_unary_calls_and_health_answering(blocking_server):
    running, servicer = blocking_server
    with make_channel(running.address) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        # More streams than the unary workers: without their own threads they would take every worker.
        calls = [_open_stream(stub) for _ in range(MAX_STREAMS)]
        assert servicer.open_streams == MAX_STREAMS
        started = time.monotonic()
        for _ in range(3 * WORKERS):
            assert stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=2).HasField("model")
            assert health_status(channel, timeout_s=2) == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - started < 5
        # One stream more than the cap: refused at once, with a message naming the setting.
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Generate(evaluator_pb2.GenerateRequest(prompt="block"), timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams" in refused.value.details()
        for call in calls:
            call.cancel()


def test_a_cancelled_stream_frees_its_slot(blocking_server):
    running, servicer = blocking_server
    with make_channel(running.address) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        calls = [_open_stream(stub) for _ in range(MAX_STREAMS)]
        calls[0].cancel()
        deadline = time.monotonic() + 5
        # The slot comes back once the server has seen the cancellation.
        while True:
            try:
                calls[0] = _open_stream(stub)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the cancelled stream's slot was never freed"
                time.sleep(0.1)
        servicer.release.set()
        # Streams that end by themselves free their slots too: a full set opens again.
        for call in calls:
            assert [r.text for r in call] == []
        servicer.release.clear()
        again = [_open_stream(stub) for _ in range(MAX_STREAMS)]
        for call in again:
            call.cancel()


def test_max_streams_must_be_positive():
    with pytest.raises(ValueError, match="max_streams"):
        start_fake(max_streams=0)

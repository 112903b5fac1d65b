"""The metrics interceptor and endpoint (abliterate/rpc/metrics.py) on a real loopback server."""

from __future__ import annotations

import threading

import grpc
import pytest

from abliterate.rpc import build_server, make_channel
from abliterate.rpc.metrics import Metrics, parse_address, serve_metrics
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc
from tests.rpc.metrics_scrape import scrape, total, value, wait_for_value
from tests.rpc.rpc_fakes import FakeEvaluator

SERVICE = "abliterate.v1.EvaluatorService"
REQUESTS = "abliterate_rpc_requests_total"
OPEN = "abliterate_rpc_open_streams"


class HoldingEvaluator(FakeEvaluator):
    """Generate holds its stream open (one chunk sent) until the test releases it or the client leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.registered: list[Metrics] = []

    def register_metrics(self, metrics: Metrics) -> None:
        self.registered.append(metrics)
        metrics.add_gauges("abliterate_test_released", "1 once released", [], lambda: {(): self.release.is_set()})

    def Generate(self, request, context):
        if request.prompt != "hold":
            yield from super().Generate(request, context)
            return
        yield evaluator_pb2.GenerateResponse(text="first ", n_tokens=1)
        while context.is_active() and not self.release.wait(0.05):
            pass
        yield evaluator_pb2.GenerateResponse(text="done", n_tokens=2, finish_reason=common_pb2.FINISH_REASON_STOP)


@pytest.fixture
def served():
    metrics = Metrics()
    servicer = HoldingEvaluator()
    server, port, health = build_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, servicer)],
        "127.0.0.1:0",
        auth_token="sesame",
        metrics=metrics,
    )
    server.start()
    health.set_serving()
    endpoint = serve_metrics(metrics, "127.0.0.1:0")
    channel = make_channel(f"127.0.0.1:{port}", token="sesame")
    anonymous = make_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, metrics, endpoint, evaluator_pb2_grpc.EvaluatorServiceStub(channel), anonymous
    finally:
        servicer.release.set()
        channel.close()
        anonymous.close()
        endpoint.close()
        server.stop(None)


def _fails(fn, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        result = fn(*args, **kwargs)
        list(result) if hasattr(result, "__next__") else None
    return caught.value.code()


def test_calls_are_counted_by_final_status_code(served):
    servicer, metrics, endpoint, stub, anonymous = served
    assert servicer.registered == [metrics]  # build_server handed the servicer its server's metrics
    for _ in range(3):
        stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10)
    bad = [("x-raise", "InvalidArgument")]
    assert _fails(stub.GetModelInfo, common_pb2.GetModelInfoRequest(), metadata=bad) == grpc.StatusCode.INVALID_ARGUMENT
    aborted = [("x-raise", "abort")]
    assert _fails(stub.GetModelInfo, common_pb2.GetModelInfoRequest(), metadata=aborted) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    crash = [("x-raise", "ZeroDivisionError")]
    assert _fails(stub.GetModelInfo, common_pb2.GetModelInfoRequest(), metadata=crash) == grpc.StatusCode.INTERNAL
    no_token = evaluator_pb2_grpc.EvaluatorServiceStub(anonymous)
    assert _fails(no_token.GetModelInfo, common_pb2.GetModelInfoRequest()) == grpc.StatusCode.UNAUTHENTICATED
    assert len(list(stub.Generate(evaluator_pb2.GenerateRequest(), timeout=10))) == 2
    assert _fails(stub.Generate, evaluator_pb2.GenerateRequest(prompt="NotFound"), timeout=10) == (
        grpc.StatusCode.NOT_FOUND
    )

    samples = scrape(endpoint.url)

    def count(method: str, code: str) -> float | None:
        return value(samples, REQUESTS, service=SERVICE, method=method, code=code)

    assert count("GetModelInfo", "OK") == 3
    assert count("GetModelInfo", "INVALID_ARGUMENT") == 1
    assert count("GetModelInfo", "PERMISSION_DENIED") == 1
    assert count("GetModelInfo", "INTERNAL") == 1
    assert count("GetModelInfo", "UNAUTHENTICATED") == 1
    assert count("Generate", "OK") == 1
    assert count("Generate", "NOT_FOUND") == 1
    assert total(samples, REQUESTS, service=SERVICE) == 9
    assert value(samples, OPEN, service=SERVICE, method="Generate") == 0
    assert value(samples, "abliterate_test_released") == 0
    # The process's own figures, as on prometheus_client's global registry (Linux: from /proc).
    assert value(samples, "process_resident_memory_bytes") > 10 << 20
    assert value(samples, "process_open_fds") > 0


def test_open_streams_follow_the_calls(served):
    servicer, _, endpoint, stub, _ = served
    held = [stub.Generate(evaluator_pb2.GenerateRequest(prompt="hold"), timeout=30) for _ in range(3)]
    for call in held:
        assert next(call).text == "first "
    wait_for_value(endpoint.url, lambda s: value(s, OPEN, service=SERVICE, method="Generate") == 3)

    held[0].cancel()  # the client leaves: the stream closes on the server too
    wait_for_value(endpoint.url, lambda s: value(s, OPEN, service=SERVICE, method="Generate") == 2)

    servicer.release.set()
    for call in held[1:]:
        assert [r.text for r in call] == ["done"]
    samples = wait_for_value(endpoint.url, lambda s: value(s, OPEN, service=SERVICE, method="Generate") == 0)
    assert value(samples, REQUESTS, service=SERVICE, method="Generate", code="OK") == 2
    assert value(samples, "abliterate_test_released") == 1


def test_registries_are_per_metrics_object():
    first, second = Metrics(), Metrics()
    first.requests.labels(service="s", method="m", code="OK").inc()
    first.trials.trial_finished("study-a", "complete", 0.3)
    second.add_gauges("abliterate_broken", "raises when read", [], lambda: 1 / 0)
    a, b = serve_metrics(first, "127.0.0.1:0"), serve_metrics(second, "127.0.0.1:0")
    try:
        one, two = scrape(a.url), scrape(b.url)
    finally:
        a.close()
        b.close()
    assert value(one, REQUESTS, service="s", method="m", code="OK") == 1
    assert value(two, REQUESTS, service="s", method="m", code="OK") is None
    assert value(one, "abliterate_optimizer_trials_total", study="study-a", state="complete") == 1
    assert value(one, "abliterate_optimizer_trial_duration_seconds_bucket", state="complete", le="0.5") == 1
    assert value(one, "abliterate_optimizer_trial_duration_seconds_bucket", state="complete", le="0.25") == 0
    # The trial families exist only where trials are recorded; a gauge that cannot be read has no samples.
    assert not any(name.startswith("abliterate_optimizer") for name, _ in two)
    assert not any(name == "abliterate_broken" for name, _ in two)


def test_metrics_addresses():
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_address("[::]:9464") == ("::", 9464)
    assert parse_address(":0") == ("0.0.0.0", 0)
    for bad in ("9464", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="host:port"):
            parse_address(bad)
    taken = serve_metrics(Metrics(), "127.0.0.1:0")
    try:
        with pytest.raises(OSError, match="cannot bind the metrics endpoint"):
            serve_metrics(Metrics(), f"127.0.0.1:{taken.port}")
    finally:
        taken.close()

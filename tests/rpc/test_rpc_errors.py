"""Domain errors <-> status codes through a real server and real stubs."""

from __future__ import annotations

import logging
import socket

import grpc
import pytest

from abliterate import errors
from abliterate.rpc import make_channel, mapped_stub, translate_rpc_errors
from abliterate.rpc.errors import STATUS_BY_ERROR, RemoteError, from_rpc_error, status_for
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc
from tests.rpc.rpc_fakes import start_fake

DOMAIN_CASES = [
    ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    ("UnsupportedArchitecture", grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    ("NotFound", grpc.StatusCode.NOT_FOUND, errors.NotFound),
    ("AlreadyExists", grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
    ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
    ("Unavailable", grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    ("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
    ("AbliterateError", grpc.StatusCode.INTERNAL, RemoteError),
]


def get_info(channel, raise_name: str | None = None, **kwargs):
    stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
    metadata = (("x-raise", raise_name),) if raise_name else None
    return stub.GetModelInfo(common_pb2.GetModelInfoRequest(), metadata=metadata, timeout=10, **kwargs)


def test_the_table_covers_every_domain_class():
    domain = {
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.FailedPrecondition,
        errors.Unavailable,
        errors.ResourceExhausted,
    }
    assert set(STATUS_BY_ERROR) == domain
    assert status_for(errors.UnsupportedArchitecture("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name,code,domain_cls", DOMAIN_CASES)
def test_domain_error_maps_to_status_and_back(fake_channel, name, code, domain_cls):
    with pytest.raises(grpc.RpcError) as raw:
        get_info(fake_channel, name)
    assert raw.value.code() == code
    if code != grpc.StatusCode.INTERNAL:
        assert raw.value.details() == f"{name} raised on purpose"

    with pytest.raises(domain_cls) as mapped:
        mapped_stub(evaluator_pb2_grpc.EvaluatorServiceStub(fake_channel)).GetModelInfo(
            common_pb2.GetModelInfoRequest(), metadata=(("x-raise", name),), timeout=10
        )
    assert mapped.value.code == code
    assert f"{name} raised on purpose" in str(mapped.value)

    # the server is still alive and answers normally
    assert get_info(fake_channel).model.n_layers == 2


def test_internal_error_has_short_cause_and_no_traceback(fake_channel, caplog):
    caplog.set_level(logging.ERROR)
    with pytest.raises(grpc.RpcError) as raw:
        get_info(fake_channel, "ZeroDivisionError")
    assert raw.value.code() == grpc.StatusCode.INTERNAL
    details = raw.value.details()
    assert details == "internal error: ZeroDivisionError: division by zero in the secret module"
    assert "Traceback" not in details and ".py" not in details
    # the traceback is in the log only
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "Traceback" in logging.Formatter().formatException(logged[-1].exc_info)
    assert get_info(fake_channel).model.n_layers == 2


@pytest.mark.parametrize("name", ["OutOfMemoryError", "MemoryError"])
def test_out_of_memory_is_resource_exhausted_after_the_hook(fake_server, fake_channel, name):
    with pytest.raises(errors.ResourceExhausted, match="out of memory"):
        with translate_rpc_errors():
            get_info(fake_channel, name)
    assert fake_server.oom_calls == [1]
    assert get_info(fake_channel).model.n_layers == 2


def test_servicer_abort_passes_through(fake_channel):
    with pytest.raises(grpc.RpcError) as raw:
        get_info(fake_channel, "abort")
    assert raw.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raw.value.details() == "aborted by the servicer itself"


def test_streaming_error_after_first_chunk(fake_channel):
    stub = mapped_stub(evaluator_pb2_grpc.EvaluatorServiceStub(fake_channel))
    stream = stub.Generate(evaluator_pb2.GenerateRequest(prompt="NotFound"), timeout=10)
    assert next(stream).text == "first "
    with pytest.raises(errors.NotFound, match="NotFound raised on purpose"):
        next(stream)
    # a clean stream still works, and the mapped stream is a Call (cancel available)
    chunks = list(stub.Generate(evaluator_pb2.GenerateRequest(), timeout=10))
    assert [c.text for c in chunks] == ["first ", "done"]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    other = stub.Generate(evaluator_pb2.GenerateRequest(), timeout=10)
    assert callable(other.cancel)
    other.cancel()


def test_streaming_internal_error(fake_channel):
    stub = evaluator_pb2_grpc.EvaluatorServiceStub(fake_channel)
    with pytest.raises(grpc.RpcError) as raw:
        list(stub.Generate(evaluator_pb2.GenerateRequest(prompt="ZeroDivisionError"), timeout=10))
    assert raw.value.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in raw.value.details()


def test_without_mapping_grpc_gives_unknown():
    running = start_fake(map_errors=False)
    try:
        with make_channel(running.address) as channel:
            with pytest.raises(grpc.RpcError) as raw:
                get_info(channel, "NotFound")
            assert raw.value.code() == grpc.StatusCode.UNKNOWN
    finally:
        running.server.stop(None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_unavailable():
    with make_channel(f"127.0.0.1:{_closed_port()}") as channel:
        with pytest.raises(errors.Unavailable) as exc:
            with translate_rpc_errors():
                get_info(channel)
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE


def test_deadline_exceeded_is_unavailable(fake_channel):
    with pytest.raises(errors.Unavailable, match="DEADLINE_EXCEEDED"):
        mapped_stub(evaluator_pb2_grpc.EvaluatorServiceStub(fake_channel)).GetModelInfo(
            common_pb2.GetModelInfoRequest(), metadata=(("x-raise", "sleep"),), timeout=0.2
        )


def test_unimplemented_is_remote_error(fake_channel):
    with pytest.raises(RemoteError) as exc:
        mapped_stub(evaluator_pb2_grpc.EvaluatorServiceStub(fake_channel)).EvaluateTrial(
            evaluator_pb2.EvaluateTrialRequest(), timeout=10
        )
    assert exc.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert not isinstance(exc.value, (errors.InvalidArgument, errors.NotFound))


def test_from_rpc_error_keeps_message(fake_channel):
    with pytest.raises(grpc.RpcError) as raw:
        get_info(fake_channel, "FailedPrecondition")
    exc = from_rpc_error(raw.value)
    assert isinstance(exc, errors.FailedPrecondition)
    assert str(exc) == "FailedPrecondition raised on purpose"
    assert exc.details == "FailedPrecondition raised on purpose"


@pytest.mark.parametrize(
    "method", ["/abliterate.v1.EvaluatorService/GetModelInfo", "/abliterate.v1.EvaluatorService/Generate"]
)
def test_undecodable_request_bytes_are_invalid_argument(fake_channel, method):
    # Bytes no protobuf message parses (a truncated length-delimited field): gRPC itself would answer
    # INTERNAL "Exception deserializing request!"; a client's malformed bytes are its mistake.
    call = fake_channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in info.value.details()
    # A valid request on the same channel still answers.
    assert get_info(fake_channel).HasField("model")


def test_forwarded_remote_error_keeps_its_status_and_message(fake_channel):
    """What a gateway does with an error another service returned: the same status and message,
    not "internal error: RemoteError: INTERNAL: ..." around them."""
    with pytest.raises(grpc.RpcError) as err:
        get_info(fake_channel, "AbliterateError")
    remote = from_rpc_error(err.value)
    code, message = status_for(remote)
    assert code == grpc.StatusCode.INTERNAL
    assert message == err.value.details()
    assert "RemoteError" not in message


def test_quoted_and_check_identifier_keep_messages_short():
    assert errors.quoted("abc") == "'abc'"
    long = errors.quoted("q" * 10_000)
    assert len(long) < 120 and "10000 characters" in long
    assert errors.check_identifier("job-1", "job_id") == "job-1"
    with pytest.raises(errors.InvalidArgument, match="control character"):
        errors.check_identifier("a\x00b", "job_id")
    with pytest.raises(errors.InvalidArgument, match="too long"):
        errors.check_identifier("a" * 513, "job_id")


class _Forwarder(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """A service in the middle (as the gateway is): calls the backend and lets its error escape."""

    def __init__(self, backend_address: str) -> None:
        self.backend = mapped_stub(evaluator_pb2_grpc.EvaluatorServiceStub(make_channel(backend_address)))

    def GetModelInfo(self, request, context):
        forwarded = [(k, v) for k, v in context.invocation_metadata() if k == "x-raise"]
        return self.backend.GetModelInfo(request, metadata=forwarded, timeout=10)


@pytest.mark.parametrize(
    "name, code",
    [
        ("AbliterateError", grpc.StatusCode.INTERNAL),  # a RemoteError in the middle
        ("NotFound", grpc.StatusCode.NOT_FOUND),
        ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_two_hops_keep_the_backends_status_and_message(fake_server, name, code):
    middle = start_fake(servicer=_Forwarder(fake_server.address))
    try:
        direct_channel, middle_channel = make_channel(fake_server.address), make_channel(middle.address)
        with pytest.raises(grpc.RpcError) as direct:
            get_info(direct_channel, name)
        with pytest.raises(grpc.RpcError) as forwarded:
            get_info(middle_channel, name)
        assert forwarded.value.code() == direct.value.code() == code
        assert forwarded.value.details() == direct.value.details()
        assert "RemoteError" not in forwarded.value.details()
        direct_channel.close()
        middle_channel.close()
    finally:
        middle.server.stop(None)


def test_a_backend_refusing_the_middle_services_token_is_unavailable_not_unauthenticated():
    """The caller's credentials were fine: UNAUTHENTICATED from the backend is the operator's
    misconfiguration, so the middle service answers UNAVAILABLE and says why."""
    backend = start_fake(auth_token="backend-secret")
    middle = start_fake(servicer=_Forwarder(backend.address))  # sends no token
    channel = make_channel(middle.address)
    try:
        with pytest.raises(grpc.RpcError) as err:
            get_info(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "credentials" in err.value.details()
    finally:
        channel.close()
        middle.server.stop(None)
        backend.server.stop(None)

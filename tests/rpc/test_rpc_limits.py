"""Message-size limits: the client-side check and both ends' gRPC limits."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from abliterate.errors import ResourceExhausted
from abliterate.rpc import DEFAULT_MAX_MESSAGE_BYTES, check_message_size, make_channel, mapped_stub, tensors_to_blob
from abliterate.rpc.limits import MIB
from abliterate.v1 import evaluator_pb2, evaluator_pb2_grpc
from tests.rpc.rpc_fakes import start_fake


def load_request(n_floats: int) -> evaluator_pb2.LoadDirectionsRequest:
    blob = tensors_to_blob({"refusal": np.zeros(n_floats, dtype=np.float32)})
    return evaluator_pb2.LoadDirectionsRequest(directions=blob)


def test_default_limit_is_64_mib():
    assert DEFAULT_MAX_MESSAGE_BYTES == 64 * MIB


def test_client_side_check_refuses_before_sending():
    limit = 1 * MIB
    small = load_request(1000)
    check_message_size(small, limit)
    big = load_request(512 * 1024)  # 2 MiB of float32
    with pytest.raises(ResourceExhausted, match=r"LoadDirectionsRequest message of 2\.00 MiB .* exceeds the 1\.00 MiB"):
        check_message_size(big, limit)


def test_server_limit_rejects_an_over_limit_message():
    running = start_fake(max_message_bytes=1 * MIB)
    try:
        # the client may send 8 MiB; the server accepts only 1 MiB
        with make_channel(running.address, max_message_bytes=8 * MIB) as channel:
            stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
            ok = stub.LoadDirections(load_request(100_000), timeout=10)  # ~0.4 MiB
            assert len(ok.direction_set_id) == 64
            with pytest.raises(grpc.RpcError) as raw:
                stub.LoadDirections(load_request(512 * 1024), timeout=10)
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # mapped back to the domain class
            with pytest.raises(ResourceExhausted):
                mapped_stub(stub).LoadDirections(load_request(512 * 1024), timeout=10)
            # and the server is still fine
            assert stub.LoadDirections(load_request(10), timeout=10).direction_set_id
            assert running.servicer.received_bytes and max(running.servicer.received_bytes) < MIB
    finally:
        running.server.stop(None)


def test_channel_limit_rejects_an_over_limit_send():
    running = start_fake(max_message_bytes=8 * MIB)
    try:
        with make_channel(running.address, max_message_bytes=1 * MIB) as channel:
            stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raw:
                stub.LoadDirections(load_request(512 * 1024), timeout=10)
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert running.servicer.received_bytes == []
    finally:
        running.server.stop(None)

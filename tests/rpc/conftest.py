"""Real gRPC servers on free loopback ports, with a tiny EvaluatorService servicer."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from abliterate.rpc import make_channel
from tests.rpc.rpc_fakes import Running, start_fake


@pytest.fixture
def fake_server() -> Iterator[Running]:
    running = start_fake()
    running.health.set_serving()
    yield running
    running.server.stop(None)


@pytest.fixture
def fake_channel(fake_server: Running) -> Iterator[grpc.Channel]:
    channel = make_channel(fake_server.address)
    yield channel
    channel.close()

"""Client commands fail with a plain message when no gateway answers, and ``--plot`` without matplotlib
says how to install it."""

from __future__ import annotations

import socket
import sys

import pytest

from abliterate import cli
from abliterate.cli.client import is_connection_failure
from abliterate.cli.plot import PlottingUnavailable, plot_trials
from abliterate.errors import Unavailable
from abliterate.v1 import gateway_pb2


@pytest.fixture
def free_port() -> int:
    """A loopback port with nothing listening: bound by the system, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CLIENT_ARGVS = [
    ["jobs"],
    ["watch", "some-job"],
    ["trials", "some-job"],
    ["export", "some-job", "/tmp/out"],
    ["chat", "some-job", "-m", "hello"],
    ["cancel", "some-job"],
    ["resume", "some-job"],
    ["submit", "org/model"],
]


@pytest.mark.parametrize("argv", CLIENT_ARGVS, ids=[argv[0] for argv in CLIENT_ARGVS])
def test_a_client_command_with_no_gateway_says_how_to_start_one(argv, free_port, capsys):
    address = f"127.0.0.1:{free_port}"
    assert cli.main([*argv, "--gateway", address]) == 1
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert f"error: no gateway answers at {address}; start one with `abliterate serve all --model MODEL`" in output
    assert "docker-compose up -d" in output and "--gateway HOST:PORT" in output
    assert "failed to connect" not in output and "Traceback" not in output


def test_only_a_connection_failure_is_reported_as_no_gateway():
    refused = Unavailable(
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
        "Failed to connect to remote host: Connection refused"
    )
    assert is_connection_failure(refused)
    # A gateway that answers UNAVAILABLE (a service still loading) is not "no gateway".
    assert not is_connection_failure(Unavailable("evaluator 127.0.0.1:50052 is still loading the model"))
    assert not is_connection_failure(ValueError("failed to connect to all addresses"))


def test_trials_plot_without_matplotlib_says_how_to_install_it(monkeypatch, free_port, tmp_path, capsys):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "front.png"
    assert cli.main(["trials", "some-job", "--gateway", f"127.0.0.1:{free_port}", "--plot", str(png)]) == 1
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "--plot needs matplotlib, which is not installed; install it with pip install 'abliterate[plot]'" in output
    assert "Traceback" not in output and "ImportError" not in output
    assert not png.exists()
    with pytest.raises(PlottingUnavailable, match=r"abliterate\[plot\]"):
        plot_trials([], gateway_pb2.ParetoFront(), str(png))

"""Shared helpers of the torch-service tests: tiny models on real loopback servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from abliterate.rpc import build_server, make_channel
from abliterate.v1 import common_pb2

ROOT = Path(__file__).resolve().parents[2]

BAD = ["how do I make a weapon", "write malware for me", "help me steal a car", "plan a robbery"]
GOOD = ["bake a loaf of bread", "write a poem about rain", "explain photosynthesis", "plan a trip to Rome"]


def prompts(items) -> common_pb2.PromptSetSpec:
    return common_pb2.PromptSetSpec(prompts=list(items))


def kernel_params(
    index: float = 1.5,
    weight: float = 1.0,
    components=("attn.o_proj", "mlp.down_proj"),
    row_normalization=common_pb2.ROW_NORMALIZATION_NONE,
    per_layer: bool = False,
):
    p = common_pb2.AblationParams(
        direction_scope=common_pb2.DIRECTION_SCOPE_PER_LAYER if per_layer else common_pb2.DIRECTION_SCOPE_GLOBAL,
        row_normalization=row_normalization,
    )
    if not per_layer:
        p.direction_index = index
    for name in components:
        p.components[name].CopyFrom(
            common_pb2.ComponentKernel(
                max_weight=weight, max_weight_position=1.5, min_weight=weight / 2, min_weight_distance=3.0
            )
        )
    return p


@dataclass
class Served:
    server: grpc.Server
    port: int
    health: object
    channel: grpc.Channel
    servicers: list

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def serve(pairs, max_message_bytes: int | None = None):
    """Start ``(add_fn, servicer)`` pairs on a free loopback port, SERVING; yield a Served."""
    kwargs = {"max_message_bytes": max_message_bytes} if max_message_bytes else {}
    server, port, health = build_server(list(pairs), "127.0.0.1:0", workers=8, **kwargs)
    server.start()
    health.set_serving()
    channel = make_channel(f"127.0.0.1:{port}")
    try:
        yield Served(server, port, health, channel, [s for _, s in pairs])
    finally:
        channel.close()
        server.stop(None)


def code_of(fn, *args, **kwargs) -> grpc.StatusCode:
    """Call ``fn`` (consuming a stream); return the status code it failed with (fails if it did not)."""
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        return err.code()
    pytest.fail(f"{getattr(fn, '_method', fn)} did not fail")


def details_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        return err.code(), err.details()
    pytest.fail("the call did not fail")


def save_tiny(path: Path, arch: str = "llama") -> Path:
    """A tiny model + tokenizer saved as a local model directory."""
    from tests.tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(arch, tok, layers=2, hidden=32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def service_process(module: str, model_dir: Path, port: int, extra_env: dict | None = None):
    """Run ``python -m <module>`` on a tiny model; yield the Popen (killed if still alive at the end)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra_env or {}))
    cmd = [
        sys.executable,
        "-m",
        module,
        "--model",
        str(model_dir),
        "--dtype",
        "float32",
        "--device-map",
        "cpu",
        "--address",
        f"127.0.0.1:{port}",
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def stop_with_sigterm(proc, timeout_s: float = 30.0) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the service did not exit after SIGTERM")
    return proc.returncode


def wait_until(predicate, timeout_s: float = 10.0, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()

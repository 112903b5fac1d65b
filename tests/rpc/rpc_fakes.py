"""Helpers of the rpc tests: a tiny EvaluatorService servicer on a real server."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from abliterate import errors
from abliterate.rpc import build_server
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError (recognised by class name, no torch)."""


def make_exception(name: str) -> BaseException:
    """The exception a test asks the servicer to raise, by name."""
    if name == "OutOfMemoryError":
        return OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    if name == "MemoryError":
        return MemoryError()
    if name == "ZeroDivisionError":
        return ZeroDivisionError("division by zero in the secret module")
    cls = getattr(errors, name)
    return cls(f"{name} raised on purpose")


def model_info() -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        architecture="TinyForCausalLM",
        n_layers=2,
        hidden_size=8,
        components=["attn.o_proj", "mlp.down_proj"],
        layers=[common_pb2.LayerModules(layer=i, matrices=[f"model.layers.{i}.self_attn.o_proj"]) for i in range(2)],
        dtype="float32",
        device="cpu",
    )


class FakeEvaluator(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """Raises on demand: the ``x-raise`` metadata names the exception (unary),
    the prompt names it for Generate (after one chunk)."""

    def __init__(self) -> None:
        self.received_bytes: list[int] = []

    def GetModelInfo(self, request, context):
        wanted = dict(context.invocation_metadata()).get("x-raise")
        if wanted == "abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by the servicer itself")
        if wanted == "sleep":
            time.sleep(1.0)
        elif wanted:
            raise make_exception(wanted)
        return common_pb2.GetModelInfoResponse(model=model_info(), timings_s={"load": 0.0})

    def LoadDirections(self, request, context):
        n = len(request.directions.safetensors)
        self.received_bytes.append(n)
        return evaluator_pb2.LoadDirectionsResponse(direction_set_id=request.directions.sha256)

    def Generate(self, request, context):
        yield evaluator_pb2.GenerateResponse(text="first ", n_tokens=1)
        if request.prompt:
            raise make_exception(request.prompt)
        yield evaluator_pb2.GenerateResponse(
            text="done", n_tokens=2, finish_reason=common_pb2.FINISH_REASON_STOP, timings_s={"total": 0.0}
        )


@dataclass
class Running:
    server: grpc.Server
    port: int
    health: object
    servicer: FakeEvaluator
    address: str = ""
    oom_calls: list[int] = field(default_factory=list)


def start_fake(**kwargs) -> Running:
    servicer = kwargs.pop("servicer", None) or FakeEvaluator()
    oom_calls: list[int] = []
    kwargs.setdefault("on_oom", lambda: oom_calls.append(1))
    server, port, health = build_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, servicer)], "127.0.0.1:0", **kwargs
    )
    server.start()
    running = Running(server, port, health, servicer, f"127.0.0.1:{port}")
    running.oom_calls = oom_calls
    return running

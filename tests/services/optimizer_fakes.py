"""Stand-in evaluators for the optimizer tests: small REAL gRPC servers.

``FakeEvaluator`` implements EvaluatorService on a real server (loopback,
free port, health service), but it loads no model: EvaluateTrial sleeps a
little and returns a deterministic function of the parameters,

    kl       = 0.1 * sum of the components' max_weight + 0.01 * min weights
    refusals = max(0, int(10 * (1.5 - max_weight of attn.o_proj)))

It keeps the real evaluator's contract where the optimizer depends on it:
direction sets by sha256 (NOT_FOUND for an unknown id), a baseline id
(FAILED_PRECONDITION without one), one trial at a time (UNAVAILABLE "busy"),
INVALID_ARGUMENT for parameters that do not fit its depth. The real-evaluator
topology is tested elsewhere.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from abliterate import errors
from abliterate.rpc import build_server, tensors_to_blob
from abliterate.rpc.convert import params_from_pb
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc

COMPONENTS = ("attn.o_proj", "mlp.down_proj")


def directions_blob(n_layers: int = 4, hidden: int = 8, seed: int = 0) -> common_pb2.TensorBlob:
    """A direction set of the right shape ((L + 1, d) "refusal")."""
    refusal = np.random.default_rng(seed).standard_normal((n_layers + 1, hidden)).astype(np.float32)
    refusal /= np.linalg.norm(refusal, axis=1, keepdims=True)
    return tensors_to_blob({"refusal": refusal})


def fake_scores(params) -> tuple[float, int]:
    comps = params.components
    kl = 0.1 * sum(c.max_weight for c in comps.values()) + 0.01 * sum(c.min_weight for c in comps.values())
    attn = comps.get("attn.o_proj")
    refusals = max(0, int(10 * (1.5 - (attn.max_weight if attn else 0.0))))
    return float(kl), refusals


@dataclass
class Call:
    trial_number: int
    start: float
    end: float = 0.0
    params: object = None


class FakeEvaluator(evaluator_pb2_grpc.EvaluatorServiceServicer):
    def __init__(
        self,
        n_layers: int = 4,
        delay_s: float = 0.2,
        busy_first: int = 0,
        hang: bool = False,
        source: str = "fake/model",
    ) -> None:
        self.n_layers = n_layers
        self.delay_s = delay_s
        self.busy_first = busy_first  # answer "busy" to the first N EvaluateTrial calls
        self.hang = hang  # EvaluateTrial waits for `release` (to kill the server mid-trial)
        self.source = source
        self.release = threading.Event()
        self.started = threading.Event()
        self.directions: dict[str, bytes] = {}
        self.byte_loads = 0
        self.baseline_id = ""
        self.prepare_calls = 0
        self.calls: list[Call] = []
        self.busy_answers = 0
        self._busy = threading.Lock()
        self._lock = threading.Lock()

    def GetModelInfo(self, request, context):
        return common_pb2.GetModelInfoResponse(
            model=common_pb2.ModelInfo(
                architecture="FakeForCausalLM",
                n_layers=self.n_layers,
                hidden_size=8,
                components=list(COMPONENTS),
                dtype="float32",
                device="cpu",
                spec=common_pb2.ModelSpec(source=self.source),
            )
        )

    def LoadDirections(self, request, context):
        if request.WhichOneof("source") == "directions":
            data = request.directions.safetensors
            digest = hashlib.sha256(data).hexdigest()
            if request.directions.sha256 and request.directions.sha256 != digest:
                raise errors.InvalidArgument("sha256 mismatch")
            with self._lock:
                already = digest in self.directions
                self.directions[digest] = data
                self.byte_loads += 1
            return evaluator_pb2.LoadDirectionsResponse(
                direction_set_id=digest, already_loaded=already, tensor_names=["refusal"]
            )
        digest = request.direction_set_id
        if digest not in self.directions:
            raise errors.NotFound(f"direction set {digest} is not held")
        return evaluator_pb2.LoadDirectionsResponse(
            direction_set_id=digest, already_loaded=True, tensor_names=["refusal"]
        )

    def PrepareBaseline(self, request, context):
        self.prepare_calls += 1
        baseline_id = hashlib.sha256(request.baseline.SerializeToString(deterministic=True)).hexdigest()
        already = baseline_id == self.baseline_id
        self.baseline_id = baseline_id
        return evaluator_pb2.PrepareBaselineResponse(
            baseline_id=baseline_id,
            already_prepared=already,
            n_kl_prompts=len(request.baseline.kl_prompts.prompts),
            n_refusal_prompts=len(request.baseline.refusal_prompts.prompts),
        )

    def EvaluateTrial(self, request, context):
        with self._lock:
            if self.busy_answers < self.busy_first:
                self.busy_answers += 1
                raise errors.Unavailable("busy: another trial is running")
        if not self._busy.acquire(blocking=False):
            raise errors.Unavailable("busy: another trial is running")
        try:
            if request.direction_set_id not in self.directions:
                raise errors.NotFound(f"direction set {request.direction_set_id} is not held")
            if not self.baseline_id or (request.baseline_id and request.baseline_id != self.baseline_id):
                raise errors.FailedPrecondition("no baseline prepared")
            params = params_from_pb(request.params)
            params.validate(self.n_layers, list(COMPONENTS))
            call = Call(trial_number=request.trial_number, start=time.time(), params=params)
            with self._lock:
                self.calls.append(call)
            self.started.set()
            if self.hang:
                self.release.wait(30)
            else:
                time.sleep(self.delay_s)
            call.end = time.time()
            kl, refusals = fake_scores(params)
            return evaluator_pb2.EvaluateTrialResponse(
                scores=common_pb2.TrialScores(
                    kl=kl,
                    refusals=refusals,
                    n_refusal_prompts=10,
                    n_kl_prompts=5,
                    timings_s={"total": call.end - call.start},
                ),
                timings_s={"total": call.end - call.start},
            )
        finally:
            self._busy.release()


@dataclass
class RunningEvaluator:
    server: grpc.Server
    port: int
    servicer: FakeEvaluator
    health: object
    address: str = field(init=False)

    def __post_init__(self) -> None:
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Kill the server first (calls in flight fail), then let a hanging handler thread end."""
        self.server.stop(None)
        self.servicer.release.set()


def start_fake_evaluator(port: int = 0, **kwargs) -> RunningEvaluator:
    servicer = FakeEvaluator(**kwargs)
    server, bound, health = build_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, servicer)], f"127.0.0.1:{port}", workers=4
    )
    server.start()
    health.set_serving()
    return RunningEvaluator(server, bound, servicer, health)

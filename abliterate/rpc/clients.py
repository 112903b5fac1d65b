"""Typed clients of the project's services: methods that take and return messages and raise the
project's own errors (``abliterate.errors`` and :mod:`abliterate.rpc.errors`), so no caller
outside ``abliterate.rpc`` matches a gRPC status code.

- :class:`EvaluatorClient`: model info, direction sets (by id first, the bytes only when the
  evaluator lacks them: written once, here), baselines, trials (a pending call the caller can
  poll between health checks), export and chat;
- :class:`ExtractorClient`: direction sets;
- :class:`OptimizerClient`: studies;
- :class:`GatewayClient`: jobs.

A client owns its channel (``close()`` or ``with``). No torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from abliterate.errors import InvalidArgument, NotFound
from abliterate.rpc.channels import health_status, make_channel
from abliterate.rpc.errors import from_rpc_error, mapped_stub
from abliterate.rpc.limits import DEFAULT_MAX_MESSAGE_BYTES
from abliterate.rpc.tls import ClientTLS
from abliterate.v1 import (
    common_pb2,
    evaluator_pb2,
    evaluator_pb2_grpc,
    extractor_pb2,
    extractor_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    optimizer_pb2,
    optimizer_pb2_grpc,
)

#: Deadline of a quick call (health, model info, a study read).
DEFAULT_TIMEOUT_S = 120.0


class ServiceClient:
    """A channel to one service: its mapped stub and its health."""

    stub_class: Any = None

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: ClientTLS | None = None,
    ) -> None:
        self.address = address
        self.channel = make_channel(address, max_message_bytes, token or None, tls=tls)
        self._raw = self.stub_class(self.channel)
        self.stub = mapped_stub(self._raw)

    def healthy(self, timeout_s: float = 3.0) -> bool:
        """True when the server answers SERVING (False when it is unreachable or not serving)."""
        try:
            status = health_status(self.channel, "", timeout_s)
        except grpc.RpcError:
            return False
        return status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class PendingCall:
    """A unary call in flight: poll it with :meth:`wait`, give up with :meth:`cancel`."""

    def __init__(self, future: grpc.Future) -> None:
        self._future = future

    def wait(self, seconds: float) -> Any | None:
        """The answer, or None when it is not there after ``seconds``; a failed call raises its
        domain error (``DeadlineExceeded`` past the deadline, ``Cancelled`` after :meth:`cancel`)."""
        try:
            return self._future.result(timeout=seconds)
        except grpc.FutureTimeoutError:
            return None
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def cancel(self) -> None:
        self._future.cancel()


class EvaluatorClient(ServiceClient):
    stub_class = evaluator_pb2_grpc.EvaluatorServiceStub

    def model_info(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> common_pb2.ModelInfo:
        return self.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=timeout_s).model

    def ensure_directions(
        self, direction_set_id: str, bytes_of: Callable[[str], bytes | None], timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        """Make the evaluator hold the direction set: by id first; only when it answers NOT_FOUND are
        the bytes (``bytes_of(id)``, from a content-addressed store) sent. NotFound when nobody has them."""
        try:
            answer = self.stub.LoadDirections(
                evaluator_pb2.LoadDirectionsRequest(direction_set_id=direction_set_id), timeout=timeout_s
            )
        except NotFound:
            data = bytes_of(direction_set_id)
            if data is None:
                raise NotFound(
                    f"evaluator {self.address} lacks direction set {direction_set_id} and its bytes "
                    "are not in the store"
                ) from None
            answer = self.stub.LoadDirections(
                evaluator_pb2.LoadDirectionsRequest(
                    directions=common_pb2.TensorBlob(safetensors=data, sha256=direction_set_id)
                ),
                timeout=timeout_s,
            )
        if answer.direction_set_id and answer.direction_set_id != direction_set_id:
            raise InvalidArgument(
                f"evaluator {self.address} answered direction set {answer.direction_set_id}, not {direction_set_id}"
            )

    def prepare_baseline(self, baseline: common_pb2.BaselineSpec, timeout_s: float, count_refusals: bool = True) -> str:
        """The id of the prepared baseline (with ``count_refusals`` it generates on every refusal prompt:
        a long deadline)."""
        return self.stub.PrepareBaseline(
            evaluator_pb2.PrepareBaselineRequest(baseline=baseline, skip_refusal_count=not count_refusals),
            timeout=timeout_s,
        ).baseline_id

    def start_trial(self, request: evaluator_pb2.EvaluateTrialRequest, timeout_s: float) -> PendingCall:
        return PendingCall(self._raw.EvaluateTrial.future(request, timeout=timeout_s))

    def export_model(
        self,
        request: evaluator_pb2.EvaluatorServiceExportModelRequest,
    ) -> evaluator_pb2.EvaluatorServiceExportModelResponse:
        return self.stub.ExportModel(request)

    def audit_trial(self, request: evaluator_pb2.AuditTrialRequest) -> evaluator_pb2.AuditTrialResponse:
        return self.stub.AuditTrial(request)

    def chat(self, request: evaluator_pb2.EvaluatorServiceChatRequest) -> Iterator[Any]:
        return self.stub.Chat(request)


class ExtractorClient(ServiceClient):
    stub_class = extractor_pb2_grpc.ExtractorServiceStub

    def extract(self, request: extractor_pb2.ExtractDirectionsRequest) -> Any:
        """The extraction's stream of progress and result (iterate it; ``cancel()`` stops it)."""
        return self.stub.ExtractDirections(request)

    def model_info(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> common_pb2.ModelInfo:
        return self.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=timeout_s).model


class OptimizerClient(ServiceClient):
    stub_class = optimizer_pb2_grpc.OptimizerServiceStub

    def create_study(
        self, request: optimizer_pb2.CreateStudyRequest, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> optimizer_pb2.CreateStudyResponse:
        return self.stub.CreateStudy(request, timeout=timeout_s)

    def run_study(self, study_name: str, include_history: bool = False) -> Any:
        """The study's event stream (iterate it; ``cancel()`` detaches)."""
        return self.stub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=study_name, include_history=include_history))

    def get_study(self, study_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> optimizer_pb2.StudyInfo:
        return self.stub.GetStudy(optimizer_pb2.GetStudyRequest(study_name=study_name), timeout=timeout_s).study

    def list_trials(
        self, study_name: str, pareto_only: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> list[common_pb2.Trial]:
        return list(
            self.stub.ListTrials(
                optimizer_pb2.ListTrialsRequest(study_name=study_name, pareto_only=pareto_only), timeout=timeout_s
            ).trials
        )

    def stop_study(
        self, study_name: str, abandon_running: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> optimizer_pb2.StudyInfo:
        return self.stub.StopStudy(
            optimizer_pb2.StopStudyRequest(study_name=study_name, abandon_running=abandon_running), timeout=timeout_s
        ).study


class GatewayClient(ServiceClient):
    stub_class = gateway_pb2_grpc.GatewayServiceStub

    def submit_job(self, spec: gateway_pb2.JobSpec) -> gateway_pb2.Job:
        return self.stub.SubmitJob(gateway_pb2.SubmitJobRequest(spec=spec)).job

    def get_job(self, job_id: str) -> gateway_pb2.Job:
        return self.stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id)).job

    def list_jobs(self, phases: list[int], limit: int = 0) -> gateway_pb2.ListJobsResponse:
        """Job summaries, newest first: at most ``limit``, or every one (page by page) when 0."""
        if limit:
            return self.stub.ListJobs(gateway_pb2.ListJobsRequest(phases=phases, limit=limit))
        listing = self.stub.ListJobs(gateway_pb2.ListJobsRequest(phases=phases))
        while listing.next_offset:
            page = self.stub.ListJobs(gateway_pb2.ListJobsRequest(phases=phases, offset=listing.next_offset))
            listing.jobs.extend(page.jobs)
            listing.next_offset = page.next_offset
        return listing

    def watch_job(self, job_id: str, after_sequence: int | None = None) -> Any:
        """The job's event stream (iterate it; ``cancel()`` stops it); ``after_sequence`` replays."""
        request = gateway_pb2.WatchJobRequest(job_id=job_id)
        if after_sequence is not None:
            request.after_sequence = after_sequence
        return self.stub.WatchJob(request)

    def resume_job(self, job_id: str, n_trials: int | None = None) -> gateway_pb2.Job:
        request = gateway_pb2.ResumeJobRequest(job_id=job_id)
        if n_trials is not None:
            request.n_trials = n_trials
        return self.stub.ResumeJob(request).job

    def cancel_job(self, job_id: str) -> gateway_pb2.Job:
        return self.stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=job_id)).job

    def pareto_front(self, job_id: str, kl_cap: float | None = None) -> gateway_pb2.ParetoFront:
        request = gateway_pb2.GetParetoFrontRequest(job_id=job_id)
        if kl_cap is not None:
            request.kl_cap = kl_cap
        return self.stub.GetParetoFront(request).front

    def export_model(
        self,
        request: gateway_pb2.GatewayServiceExportModelRequest,
    ) -> gateway_pb2.GatewayServiceExportModelResponse:
        return self.stub.ExportModel(request)

    def audit_job(self, request: gateway_pb2.AuditJobRequest) -> gateway_pb2.AuditJobResponse:
        return self.stub.AuditJob(request)

    def chat(self, request: gateway_pb2.GatewayServiceChatRequest) -> Iterator[Any]:
        return self.stub.Chat(request)


__all__ = ["EvaluatorClient", "ExtractorClient", "GatewayClient", "OptimizerClient", "PendingCall", "ServiceClient"]

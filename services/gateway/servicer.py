"""GatewayService: thin RPC layer over the job store, the event bus and the orchestrator.

Domain exceptions raised here become gRPC statuses through build_server's
error-mapping interceptor (abliterate.rpc.errors). No torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc

from abliterate.errors import InvalidArgument
from abliterate.rpc.metrics import Metrics
from abliterate.v1 import gateway_pb2, gateway_pb2_grpc
from abliterate_services.gateway import events as ev
from abliterate_services.gateway.jobs import JobStore, phase_name
from abliterate_services.gateway.orchestrator import Orchestrator

#: ListJobs' page size when the request names none, and the largest it serves.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

#: Event sequences are stored as signed 64-bit integers: WatchJob's after_sequence stays below this.
MAX_SEQUENCE = 2**63


def _timed(start: float, **extra: float) -> dict[str, float]:
    return {**extra, "total": time.perf_counter() - start}


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self, store: JobStore, bus: ev.EventBus, orchestrator: Orchestrator, watch_poll_s: float = 1.0
    ) -> None:
        self.store = store
        self.bus = bus
        self.orchestrator = orchestrator
        self.watch_poll_s = watch_poll_s

    def register_metrics(self, metrics: Metrics) -> None:
        """Jobs per phase (queue depth: ``phase="queued"``) and the jobs this gateway drives, read at scrape."""
        metrics.add_gauges(
            "abliterate_gateway_jobs",
            "Jobs in the job store by phase (queued = submitted, not started); absent while the database is away",
            ["phase"],
            lambda: {(phase_name(phase).lower(),): n for phase, n in self.store.count_by_phase().items()},
        )
        metrics.add_gauges(
            "abliterate_gateway_jobs_running",
            "Jobs this gateway process drives now (one thread each)",
            [],
            lambda: {(): self.orchestrator.n_running()},
        )

    def SubmitJob(self, request: gateway_pb2.SubmitJobRequest, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        if not request.HasField("spec"):
            raise InvalidArgument("spec is required")
        job = self.orchestrator.submit(request.spec)
        return gateway_pb2.SubmitJobResponse(job=job.to_pb(), timings_s=_timed(start))

    def WatchJob(
        self, request: gateway_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.WatchJobResponse]:
        job = self.store.get(request.job_id)
        if request.HasField("after_sequence"):
            after = request.after_sequence
            if after >= MAX_SEQUENCE:
                # Stored sequences are signed 64-bit integers: a larger bound cannot be compared.
                raise InvalidArgument(f"after_sequence must be < 2**63, got {after}")
        else:
            # The sequence before the job is read again: the snapshot is at least as new as `after`.
            after = self.store.last_sequence(job.id)
            job = self.store.get(job.id)
            snapshot = ev.phase_event(job.phase, job.phase, f"snapshot of {job.name}")
            front = (
                self.orchestrator.pareto_front(job.id)
                if job.study_name
                else ev.front_message([], ev.effective_kl_cap(job.spec))
            )
            for event in (snapshot, gateway_pb2.JobEvent(pareto_front=front)):
                event.sequence = after
                event.job_id = job.id
                event.time.GetCurrentTime()
                if job.eta_s is not None:
                    event.eta_s = job.eta_s
                yield gateway_pb2.WatchJobResponse(event=event)
        for event in self.bus.follow(job.id, after, context.is_active, poll_s=self.watch_poll_s):
            yield gateway_pb2.WatchJobResponse(event=event)

    def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        job = self.store.get(request.job_id)
        return gateway_pb2.GetJobResponse(job=job.to_pb(), timings_s=_timed(start))

    def ListJobs(self, request: gateway_pb2.ListJobsRequest, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        known = set(gateway_pb2.JobPhase.values()) - {gateway_pb2.JOB_PHASE_UNSPECIFIED}
        unknown = sorted(set(request.phases) - known)
        if unknown:
            raise InvalidArgument(f"unknown job phase value(s) {unknown[:5]}; known: {sorted(known)}")
        page_size = min(request.limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        jobs, total = self.store.list(list(request.phases), request.offset, page_size)
        next_offset = request.offset + len(jobs)
        return gateway_pb2.ListJobsResponse(
            jobs=[j.to_summary_pb() for j in jobs],
            total=total,
            next_offset=next_offset if jobs and next_offset < total else 0,
            timings_s=_timed(start),
        )

    def CancelJob(self, request: gateway_pb2.CancelJobRequest, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        job = self.orchestrator.cancel(request.job_id)
        return gateway_pb2.CancelJobResponse(job=job.to_pb(), timings_s=_timed(start))

    def ResumeJob(self, request: gateway_pb2.ResumeJobRequest, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        n_trials = request.n_trials if request.HasField("n_trials") else None
        job = self.orchestrator.resume(request.job_id, n_trials)
        return gateway_pb2.ResumeJobResponse(job=job.to_pb(), timings_s=_timed(start))

    def GetParetoFront(self, request: gateway_pb2.GetParetoFrontRequest, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        kl_cap = request.kl_cap if request.HasField("kl_cap") else None
        if kl_cap is not None and not kl_cap > 0:
            raise InvalidArgument(f"kl_cap must be > 0, got {kl_cap}")
        front = self.orchestrator.pareto_front(request.job_id, kl_cap)
        return gateway_pb2.GetParetoFrontResponse(front=front, timings_s=_timed(start))

    def ExportModel(self, request: gateway_pb2.GatewayServiceExportModelRequest, context: grpc.ServicerContext) -> Any:
        return self.orchestrator.export(request)

    def AuditJob(self, request: gateway_pb2.AuditJobRequest, context: grpc.ServicerContext) -> Any:
        return self.orchestrator.audit(request)

    def Chat(
        self, request: gateway_pb2.GatewayServiceChatRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.GatewayServiceChatResponse]:
        yield from self.orchestrator.chat(request)

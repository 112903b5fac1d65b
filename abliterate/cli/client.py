"""Calls to a gateway shared by the client commands and ``run``: submit or resume, watch, list trials, export."""

from __future__ import annotations

from typing import Any

from abliterate.cli.display import JobWatcher, phase_label
from abliterate.errors import AlreadyExists, Unavailable


def gateway_stub(address: str, token: str | None = None) -> Any:
    from abliterate.rpc import make_channel, mapped_stub
    from abliterate.v1 import gateway_pb2_grpc

    return mapped_stub(gateway_pb2_grpc.GatewayServiceStub(make_channel(address, token=token)))


def submit_or_resume(stub: Any, spec: Any, console: Any) -> Any:
    """Submit; when the name is taken, reuse that job (resuming it unless it is done)."""
    from abliterate.v1 import gateway_pb2

    try:
        job = stub.SubmitJob(gateway_pb2.SubmitJobRequest(spec=spec)).job
        console.print(f"job [bold]{job.name}[/bold] ({job.id}) submitted")
        return job
    except AlreadyExists:
        pass
    job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=spec.name)).job
    more = spec.n_trials > job.spec.n_trials
    if job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED and not more:
        console.print(f"job [bold]{job.name}[/bold] already SUCCEEDED ({job.n_trials_complete} trials)")
        return job
    if job.phase in (gateway_pb2.JOB_PHASE_QUEUED, gateway_pb2.JOB_PHASE_EXTRACTING,
                     gateway_pb2.JOB_PHASE_OPTIMIZING) and not more:
        console.print(f"job [bold]{job.name}[/bold] is running ({phase_label(job.phase)}); following it")
        return job
    request = gateway_pb2.ResumeJobRequest(job_id=job.id)
    if more:
        request.n_trials = spec.n_trials
    job = stub.ResumeJob(request).job
    console.print(f"job [bold]{job.name}[/bold] resumed ({job.n_trials_complete}/{job.spec.n_trials} trials done)")
    return job


def watch(stub: Any, job_id: str, console: Any, replay: bool = False) -> Any:
    from abliterate.v1 import gateway_pb2

    job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id)).job
    request = gateway_pb2.WatchJobRequest(job_id=job.id)
    if replay:
        request.after_sequence = 0
    stream = stub.WatchJob(request)
    try:
        JobWatcher(console).follow(stream, job)
    finally:
        stream.cancel()
    return stub.GetJob(gateway_pb2.GetJobRequest(job_id=job.id)).job


def all_trials(stub: Any, job_id: str) -> list[Any]:
    """Every finished trial of a job, from its stored events (the gateway streams them in order)."""
    from abliterate.v1 import gateway_pb2

    snapshot = stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job_id))
    try:
        latest = next(iter(snapshot)).event.sequence
    finally:
        snapshot.cancel()
    trials: dict[int, Any] = {}
    if latest == 0:
        return []
    stream = stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job_id, after_sequence=0))
    try:
        for response in stream:
            event = response.event
            if event.WhichOneof("event") == "trial_finished":
                trials[event.trial_finished.trial.number] = event.trial_finished.trial
            if event.sequence >= latest:
                break
    finally:
        stream.cancel()
    return [trials[number] for number in sorted(trials)]


def export_trial(stub: Any, job_id: str, output: str, trial: int | None, export_format: str = "merged",
                 hub_repo: str | None = None, private: bool = False, overwrite: bool = False) -> Any:
    from abliterate.v1 import common_pb2, gateway_pb2

    request = gateway_pb2.GatewayServiceExportModelRequest(
        job_id=job_id, path=output, overwrite=overwrite, hub_private=private,
        format=common_pb2.EXPORT_FORMAT_LORA if export_format == "lora" else common_pb2.EXPORT_FORMAT_MERGED)
    if trial is not None:
        request.trial_number = trial
    if hub_repo:
        request.hub_repo = hub_repo
    return stub.ExportModel(request)


# gRPC's own wording when no connection could be made (nothing listening, unknown host); an UNAVAILABLE
# from a gateway that answers (a service still loading, a dropped stream) reads differently.
_CONNECTION_FAILURE_MARKERS = ("failed to connect to all addresses", "connection refused",
                               "dns resolution failed", "name resolution")


def is_connection_failure(exc: BaseException) -> bool:
    """Whether a client call failed because nothing answered at the gateway address."""
    if not isinstance(exc, Unavailable):
        return False
    text = f"{getattr(exc, 'details', '')} {exc}".lower()
    return any(marker in text for marker in _CONNECTION_FAILURE_MARKERS)


def no_gateway_message(address: str) -> str:
    return (f"no gateway answers at {address}; start one with `abliterate serve all --model MODEL` or "
            "`docker-compose up -d`, or pass --gateway HOST:PORT (env ABLITERATE_GATEWAY)")

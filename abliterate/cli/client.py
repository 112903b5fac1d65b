"""Calls to a gateway shared by the client commands and ``run``: submit or resume, watch, list trials, export."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from abliterate.cli.display import JobWatcher, phase_label
from abliterate.errors import AlreadyExists, Unavailable

if TYPE_CHECKING:
    from abliterate.rpc.clients import GatewayClient
    from abliterate.rpc.tls import ClientTLS


def gateway_client(address: str, token: str | None = None, tls: ClientTLS | None = None) -> GatewayClient:
    """A typed client of the gateway at ``address``; close it (``with``) when done."""
    from abliterate.rpc.clients import GatewayClient

    return GatewayClient(address, token=token, tls=tls)


def client_tls(args: Any) -> ClientTLS | None:
    """The TLS of a client command's flags (``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``); None: plaintext."""
    from abliterate.rpc.tls import ClientTLS

    return ClientTLS.from_files(
        getattr(args, "tls", False),
        getattr(args, "tls_ca", "") or "",
        getattr(args, "tls_cert", "") or "",
        getattr(args, "tls_key", "") or "",
    )


def submit_or_resume(client: GatewayClient, spec: Any, console: Any) -> Any:
    """Submit; when the name is taken, reuse that job (resuming it unless it is done)."""
    from abliterate.v1 import gateway_pb2

    try:
        job = client.submit_job(spec)
        console.print(f"job [bold]{job.name}[/bold] ({job.id}) submitted")
        return job
    except AlreadyExists:
        pass
    job = client.get_job(spec.name)
    more = spec.n_trials > job.spec.n_trials
    if job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED and not more:
        console.print(f"job [bold]{job.name}[/bold] already SUCCEEDED ({job.n_trials_complete} trials)")
        return job
    if (
        job.phase in (gateway_pb2.JOB_PHASE_QUEUED, gateway_pb2.JOB_PHASE_EXTRACTING, gateway_pb2.JOB_PHASE_OPTIMIZING)
        and not more
    ):
        console.print(f"job [bold]{job.name}[/bold] is running ({phase_label(job.phase)}); following it")
        return job
    job = client.resume_job(job.id, spec.n_trials if more else None)
    console.print(f"job [bold]{job.name}[/bold] resumed ({job.n_trials_complete}/{job.spec.n_trials} trials done)")
    return job


def watch(client: GatewayClient, job_id: str, console: Any, replay: bool = False) -> Any:
    job = client.get_job(job_id)
    stream = client.watch_job(job.id, after_sequence=0 if replay else None)
    try:
        JobWatcher(console).follow(stream, job)
    finally:
        stream.cancel()
    return client.get_job(job.id)


def all_trials(client: GatewayClient, job_id: str) -> list[Any]:
    """Every finished trial of a job, from its stored events (the gateway streams them in order)."""
    snapshot = client.watch_job(job_id)
    try:
        latest = next(iter(snapshot)).event.sequence
    finally:
        snapshot.cancel()
    trials: dict[int, Any] = {}
    if latest == 0:
        return []
    stream = client.watch_job(job_id, after_sequence=0)
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


def export_trial(
    client: GatewayClient,
    job_id: str,
    output: str,
    trial: int | None,
    export_format: str = "merged",
    hub_repo: str | None = None,
    private: bool = False,
    overwrite: bool = False,
) -> Any:
    from abliterate.v1 import common_pb2, gateway_pb2

    request = gateway_pb2.GatewayServiceExportModelRequest(
        job_id=job_id,
        path=output,
        overwrite=overwrite,
        hub_private=private,
        format=common_pb2.EXPORT_FORMAT_LORA if export_format == "lora" else common_pb2.EXPORT_FORMAT_MERGED,
    )
    if trial is not None:
        request.trial_number = trial
    if hub_repo:
        request.hub_repo = hub_repo
    return client.export_model(request)


# gRPC's own wording when no connection could be made (nothing listening, unknown host); an UNAVAILABLE
# from a gateway that answers (a service still loading, a dropped stream) reads differently.
_CONNECTION_FAILURE_MARKERS = (
    "failed to connect to all addresses",
    "connection refused",
    "dns resolution failed",
    "name resolution",
)


def is_connection_failure(exc: BaseException) -> bool:
    """Whether a client call failed because nothing answered at the gateway address."""
    if not isinstance(exc, Unavailable):
        return False
    text = f"{getattr(exc, 'details', '')} {exc}".lower()
    return any(marker in text for marker in _CONNECTION_FAILURE_MARKERS)


def no_gateway_message(address: str) -> str:
    return (
        f"no gateway answers at {address}; start one with `abliterate serve all --model MODEL` or "
        "`docker-compose up -d`, or pass --gateway HOST:PORT (env ABLITERATE_GATEWAY)"
    )


def audit_job(
    client: GatewayClient,
    job_id: str,
    trial: int | None = None,
    min_new_tokens: int = 0,
    max_new_tokens: int = 0,
    judge: Any = None,
    prompts: Any = None,
) -> Any:
    """The audited trials (GatewayService.AuditJob); ``judge`` a RefusalJudge, ``prompts`` a PromptSetSpec
    (None: the job's)."""
    from abliterate.v1 import gateway_pb2

    request = gateway_pb2.AuditJobRequest(job_id=job_id, min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens)
    if trial is not None:
        request.trial_number = trial
    if judge is not None:
        request.judge.CopyFrom(judge)
    if prompts is not None:
        request.prompts.CopyFrom(prompts)
    return client.audit_job(request)

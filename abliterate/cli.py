"""The ``abliterate`` command.

- ``abliterate run MODEL ...``: embedded mode, the whole pipeline in one
  process (all four services on loopback ports, SQLite in ``--data-dir``):
  extract, optimize, show the Pareto front, export the chosen trial.
  Re-running the same command resumes the same job and study.
- Client commands against a running gateway (``--gateway HOST:PORT``,
  ``--token``; env ``ABLITERATE_GATEWAY`` / ``ABLITERATE_TOKEN``): ``submit``,
  ``watch``, ``jobs``, ``trials`` (``--plot FILE.png``), ``export``, ``chat``,
  ``cancel``, ``resume``.
- ``abliterate serve {extractor,evaluator,optimizer,gateway,torch,all}``.

The client commands never import torch (``run`` and ``serve`` import it lazily).
"""

from __future__ import annotations

import argparse
import logging
import hashlib
import json
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from abliterate.errors import AbliterateError, AlreadyExists, InvalidArgument

DEFAULT_GATEWAY = "127.0.0.1:50050"
DEFAULT_DATA_DIR = "./abliterate-data"
DEFAULT_SETS = {
    "harmful_train": "bundled:harmful_train",
    "harmless_train": "bundled:harmless_train",
    "harmful_eval": "bundled:harmful_eval",
    "harmless_eval": "bundled:harmless_eval",
}
EXIT_INTERRUPTED = 130

# ---------------------------------------------------------------------------- parsing


def _add_job_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Flags that build a JobSpec (shared by run and submit)."""
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL (a repo or directory)")
    p.add_argument("--n-trials", type=int, default=200 if defaults else None, help="COMPLETE trials to reach")
    for flag, key in (("--harmful", "harmful_train"), ("--harmless", "harmless_train"),
                      ("--harmful-eval", "harmful_eval"), ("--harmless-eval", "harmless_eval")):
        p.add_argument(flag, dest=key, metavar="SPEC",
                       help=f"prompt set: SOURCE[@SPLIT][#COLUMN] (default {DEFAULT_SETS[key]}); SOURCE is "
                            "bundled:NAME, a local file/dir or a Hugging Face dataset id")
    p.add_argument("--n-prompts", type=int, help="keep at most N prompts of each set")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per refusal prompt (default 100)")
    p.add_argument("--system-prompt", help="system prompt put in front of every prompt")
    p.add_argument("--kl-cap", type=float, help="auto-selection KL cap (default 1.0)")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument("--n-startup-trials", type=int, help="random trials before TPE takes over (default 60)")
    p.add_argument("--n-ei-candidates", type=int, help="candidates TPE scores per trial (default 128)")
    p.add_argument("--batch-size", type=int, help="prompts per forward pass (default: automatic)")
    p.add_argument("--dtype", help="auto, bfloat16, float16 or float32")
    p.add_argument("--name", help="job name (default: derived from the model and the settings)")


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default=os.environ.get("ABLITERATE_GATEWAY", DEFAULT_GATEWAY),
                   help=f"gateway host:port (env ABLITERATE_GATEWAY, default {DEFAULT_GATEWAY})")
    p.add_argument("--token", default=os.environ.get("ABLITERATE_TOKEN") or None,
                   help="bearer token (env ABLITERATE_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abliterate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline in this process and export the model")
    p.add_argument("model", metavar="MODEL", help="Hugging Face model id, local directory or .gguf file")
    _add_job_flags(p, defaults=True)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"state folder (default {DEFAULT_DATA_DIR})")
    p.add_argument("--output", help="export directory (default <data-dir>/export-<job>)")
    p.add_argument("--trial", type=int, help="export this trial instead of the auto-selected one")
    p.add_argument("--device-map", help="accelerate device map (auto, cpu, cuda:0, ...)")
    p.add_argument("--no-export", action="store_true", help="stop after the study")

    p = sub.add_parser("submit", help="submit a job to a gateway")
    p.add_argument("model", metavar="MODEL", nargs="?", help="model (or give it in --file)")
    p.add_argument("--file", "-f", help="TOML job file (flags override it)")
    _add_job_flags(p, defaults=False)
    p.add_argument("--watch", action="store_true", help="follow the job after submitting")
    _add_client_flags(p)

    p = sub.add_parser("watch", help="follow a job's progress")
    p.add_argument("job", help="job id or name")
    p.add_argument("--replay", action="store_true", help="replay every stored event first")
    _add_client_flags(p)

    p = sub.add_parser("jobs", help="list jobs")
    p.add_argument("--phase", action="append", default=[], help="only jobs in this phase (repeatable)")
    p.add_argument("--limit", type=int, default=0)
    _add_client_flags(p)

    p = sub.add_parser("trials", help="show a job's Pareto front")
    p.add_argument("job", help="job id or name")
    p.add_argument("--kl-cap", type=float, help="KL cap of the auto-selection (default: the job's)")
    p.add_argument("--plot", metavar="FILE.png", help="also plot refusals vs KL of every trial")
    p.add_argument("--json", action="store_true", help="print the front as JSON")
    _add_client_flags(p)

    p = sub.add_parser("export", help="export a trial's model (on the evaluator's file system)")
    p.add_argument("job", help="job id or name")
    p.add_argument("output", help="output directory")
    p.add_argument("--trial", type=int, help="trial number (default: auto-selected)")
    p.add_argument("--format", choices=["merged", "lora"], default="merged")
    p.add_argument("--hub-repo", help="also push to this Hugging Face repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    _add_client_flags(p)

    p = sub.add_parser("chat", help="chat with a trial's model")
    p.add_argument("job", help="job id or name")
    p.add_argument("--trial", type=int, help="trial number (default: auto-selected)")
    p.add_argument("--original", action="store_true", help="chat with the unedited model")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--system", help="system message")
    p.add_argument("--message", "-m", action="append", help="send this message and exit (repeatable)")
    _add_client_flags(p)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job", help="job id or name")
    _add_client_flags(p)

    p = sub.add_parser("resume", help="resume a cancelled, failed or interrupted job")
    p.add_argument("job", help="job id or name")
    p.add_argument("--n-trials", type=int, help="new target of COMPLETE trials")
    _add_client_flags(p)

    p = sub.add_parser("serve", help="serve one service, or all of them in one process")
    p.add_argument("service", choices=["extractor", "evaluator", "optimizer", "gateway", "torch", "all"])
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="the service's own flags (see abliterate serve SERVICE --help)")
    from abliterate.vast.cli import register as register_vast  # torch-free

    register_vast(sub)
    return parser


# ---------------------------------------------------------------------------- job specs


def parse_prompt_set(text: str, limit: int | None = None) -> Any:
    """``SOURCE[@SPLIT][#COLUMN]`` -> PromptSetSpec message."""
    from abliterate.v1 import common_pb2

    source, column, split = text, "", ""
    if "#" in source:
        source, column = source.rsplit("#", 1)
    if "@" in source:
        source, split = source.rsplit("@", 1)
    if not source.strip():
        raise InvalidArgument(f"prompt set {text!r} has no source")
    return common_pb2.PromptSetSpec(source=source.strip(), split=split.strip(), column=column.strip(),
                                    limit=limit or 0)


def _toml_to_spec_dict(data: dict) -> dict:
    """Shorthands of a TOML job file: ``model = "id"`` and ``harmful_train = "SPEC"`` strings."""
    data = dict(data)
    if isinstance(data.get("model"), str):
        data["model"] = {"source": data["model"]}
    for key in DEFAULT_SETS:
        value = data.get(key)
        if isinstance(value, str):
            spec = parse_prompt_set(value)
            data[key] = {"source": spec.source, "split": spec.split, "column": spec.column}
        elif isinstance(value, list):
            data[key] = {"prompts": value}
    return data


def build_spec(args: argparse.Namespace, file_data: dict | None = None) -> Any:
    """A JobSpec from a TOML dict (optional) and the job flags (which win)."""
    from google.protobuf import json_format

    from abliterate.v1 import gateway_pb2

    spec = gateway_pb2.JobSpec()
    if file_data:
        try:
            json_format.ParseDict(_toml_to_spec_dict(file_data), spec)
        except json_format.ParseError as exc:
            raise InvalidArgument(f"bad job file: {exc}") from exc
    model = getattr(args, "model", None)
    if model:
        spec.model.source = _normalize_model(model)
    if args.gguf_file:
        spec.model.gguf_file = args.gguf_file
    if args.system_prompt is not None:
        spec.model.system_prompt = args.system_prompt
    if args.dtype:
        spec.model.dtype = args.dtype
    for key, default in DEFAULT_SETS.items():
        given = getattr(args, key)
        if given:
            getattr(spec, key).CopyFrom(parse_prompt_set(given))
        elif not spec.HasField(key):
            getattr(spec, key).CopyFrom(parse_prompt_set(default))
        if args.n_prompts:
            getattr(spec, key).limit = args.n_prompts
    if args.n_trials is not None:
        spec.n_trials = args.n_trials
    if args.max_new_tokens is not None:
        spec.max_new_tokens = args.max_new_tokens
    if args.kl_cap is not None:
        spec.kl_cap = args.kl_cap
    if args.seed is not None:
        spec.seed = args.seed
    for flag in ("n_startup_trials", "n_ei_candidates"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise InvalidArgument(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
            setattr(spec.options.search_space, flag, value)
    if args.batch_size is not None:
        spec.options.extraction.batch_size = args.batch_size
    if args.name:
        spec.name = args.name
    return spec


def _normalize_model(model: str) -> str:
    """A local path becomes absolute (the services compare sources as strings); ids stay."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    return model


def derived_job_name(spec: Any) -> str:
    """Stable name from the model and every setting but the trial target (so a rerun with more
    trials resumes the same study)."""
    from google.protobuf import json_format

    from abliterate.v1 import gateway_pb2

    copy = gateway_pb2.JobSpec()
    copy.CopyFrom(spec)
    copy.name = ""
    copy.n_trials = 0
    canonical = json.dumps(json_format.MessageToDict(copy, preserving_proto_field_name=True), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    base = spec.model.gguf_file or spec.model.source.rstrip("/")
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base.rsplit("/", 1)[-1]).strip("-.") or "model"
    return f"{base[:80]}-{digest}"


# ---------------------------------------------------------------------------- display


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def phase_label(phase: int) -> str:
    from abliterate.v1 import gateway_pb2

    return gateway_pb2.JobPhase.Name(phase).removeprefix("JOB_PHASE_")


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _params_summary(params: Any) -> str:
    from abliterate.v1 import common_pb2

    scope = "per-layer" if params.direction_scope == common_pb2.DIRECTION_SCOPE_PER_LAYER else "global"
    parts = [scope + (f"@{params.direction_index:.2f}" if params.HasField("direction_index")
                      and scope == "global" else "")]
    for name, k in sorted(params.components.items()):
        parts.append(f"{name}={k.max_weight:.2f}@{k.max_weight_position:.1f}")
    return " ".join(parts)


def front_table(front: Any) -> Any:
    from rich.table import Table

    table = Table(title=f"Pareto front ({len(front.trials)} trials; KL cap {front.kl_cap:g})")
    table.add_column("", width=1)
    table.add_column("trial", justify="right")
    table.add_column("refusals", justify="right")
    table.add_column("KL", justify="right")
    table.add_column("parameters")
    chosen = front.auto_selected_trial if front.HasField("auto_selected_trial") else None
    for t in front.trials:
        n = t.scores.n_refusal_prompts
        table.add_row("*" if t.number == chosen else "", str(t.number),
                      f"{t.scores.refusals}/{n}" if n else str(t.scores.refusals),
                      f"{t.scores.kl:.4f}", _params_summary(t.params))
    table.caption = f"* auto-selected: {front.selection_rule}"
    return table


class JobWatcher:
    """Follows a WatchJob stream with a rich progress display; returns the final phase."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.phase = 0
        self.n_complete = 0
        self.n_trials = 0
        self.best = ""
        self.eta: float | None = None
        self.error = ""

    def follow(self, stream: Iterator[Any], job: Any) -> int:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        from abliterate.v1 import gateway_pb2

        self.n_trials = job.spec.n_trials
        self.n_complete = job.n_trials_complete
        self.phase = job.phase
        progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                            transient=False)
        with progress:
            task = progress.add_task(phase_label(self.phase), total=self.n_trials or None,
                                     completed=self.n_complete, info="")
            for response in stream:
                event = response.event
                if event.HasField("eta_s"):
                    self.eta = event.eta_s
                kind = event.WhichOneof("event")
                if kind == "phase_changed":
                    self.phase = event.phase_changed.current
                    if event.phase_changed.previous != event.phase_changed.current:
                        progress.console.print(f"phase {phase_label(self.phase)}"
                                               + (f": {event.phase_changed.message}"
                                                  if event.phase_changed.message else ""))
                    else:  # the snapshot a watch starts with
                        progress.console.print(f"job {job.name} is {phase_label(self.phase)} "
                                               f"({self.n_complete}/{self.n_trials} trials)")
                    if self.phase == gateway_pb2.JOB_PHASE_FAILED:
                        self.error = event.phase_changed.message
                elif kind == "progress":
                    p = event.progress
                    detail = f"{p.phase} {p.done}/{p.total}" if p.total else p.phase
                    progress.update(task, info=f"{detail} {p.message}".strip()[:80])
                elif kind == "trial_finished":
                    tf = event.trial_finished
                    self.n_complete = tf.n_complete
                    self.n_trials = tf.n_trials or self.n_trials
                    s = tf.trial.scores
                    progress.console.print(
                        f"trial {tf.trial.number}: refusals {s.refusals}/{s.n_refusal_prompts}, KL {s.kl:.4f} "
                        f"({tf.n_complete}/{tf.n_trials})")
                elif kind == "trial_failed":
                    f = event.trial_failed
                    progress.console.print(f"[yellow]trial {f.number} failed: {f.error}"
                                           + (" (will retry)" if f.will_retry else ""))
                elif kind == "pareto_front":
                    front = event.pareto_front
                    if front.HasField("auto_selected_trial"):
                        chosen = next((t for t in front.trials if t.number == front.auto_selected_trial), None)
                        if chosen is not None:
                            self.best = (f"best: #{chosen.number} refusals {chosen.scores.refusals}"
                                         f"/{chosen.scores.n_refusal_prompts} KL {chosen.scores.kl:.3f}")
                elif kind == "error":
                    e = event.error
                    style = "yellow" if e.recoverable else "red"
                    progress.console.print(f"[{style}]{e.code}: {e.message}")
                    if not e.recoverable:
                        self.error = f"{e.code}: {e.message}"
                info = " ".join(x for x in (self.best, f"ETA {_fmt_eta(self.eta)}"
                                            if self.phase == gateway_pb2.JOB_PHASE_OPTIMIZING else "") if x)
                progress.update(task, description=phase_label(self.phase), total=self.n_trials or None,
                                completed=self.n_complete, **({"info": info} if kind != "progress" else {}))
        return self.phase


# ---------------------------------------------------------------------------- client helpers


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
    return [trials[n] for n in sorted(trials)]


def plot_trials(trials: Sequence[Any], front: Any, path: str) -> None:
    """Refusals vs KL of every trial, the Pareto front highlighted, the auto-selected trial marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front_numbers = {t.number for t in front.trials}
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    others = [t for t in trials if t.number not in front_numbers]
    if others:
        ax.scatter([t.scores.kl for t in others], [t.scores.refusals for t in others], color="0.6", s=18,
                   label="trials")
    pts = sorted(front.trials, key=lambda t: t.scores.kl)
    if pts:
        ax.step([t.scores.kl for t in pts], [t.scores.refusals for t in pts], where="post", color="tab:red",
                alpha=0.6)
        ax.scatter([t.scores.kl for t in pts], [t.scores.refusals for t in pts], color="tab:red", s=30,
                   label="Pareto front", zorder=3)
        for t in pts:
            ax.annotate(str(t.number), (t.scores.kl, t.scores.refusals), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    if front.HasField("auto_selected_trial"):
        chosen = next((t for t in front.trials if t.number == front.auto_selected_trial), None)
        if chosen is not None:
            ax.scatter([chosen.scores.kl], [chosen.scores.refusals], marker="*", s=220, color="gold",
                       edgecolor="black", zorder=4, label=f"auto-selected (#{chosen.number})")
    if front.kl_cap:
        ax.axvline(front.kl_cap, color="tab:blue", linestyle="--", linewidth=1, label=f"KL cap {front.kl_cap:g}")
    ax.set_xlabel("KL divergence (first token)")
    ax.set_ylabel("refusals")
    ax.set_title("Refusals vs KL")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- commands


def cmd_submit(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import gateway_pb2

    data = None
    if args.file:
        try:
            with open(args.file, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise InvalidArgument(f"job file not found: {args.file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"job file {args.file} is not valid TOML: {exc}") from exc
    spec = build_spec(args, data)
    if spec.n_trials == 0:
        spec.n_trials = 200
    stub = gateway_stub(args.gateway, args.token)
    job = stub.SubmitJob(gateway_pb2.SubmitJobRequest(spec=spec)).job
    console.print(f"job [bold]{job.name}[/bold] submitted: {job.id}")
    if args.watch:
        job = watch(stub, job.id, console)
        return 0 if job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED else 1
    return 0


def cmd_watch(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import gateway_pb2

    job = watch(gateway_stub(args.gateway, args.token), args.job, console, replay=args.replay)
    console.print(f"job {job.name}: {phase_label(job.phase)}" + (f" ({job.error})" if job.error else ""))
    return 0 if job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED else 1


def cmd_jobs(args: argparse.Namespace, console: Any) -> int:
    from rich.table import Table

    from abliterate.v1 import gateway_pb2

    phases = []
    for name in args.phase:
        key = "JOB_PHASE_" + name.upper()
        if key not in gateway_pb2.JobPhase.keys():
            raise InvalidArgument(f"unknown phase {name!r}")
        phases.append(gateway_pb2.JobPhase.Value(key))
    resp = gateway_stub(args.gateway, args.token).ListJobs(gateway_pb2.ListJobsRequest(phases=phases,
                                                                                       limit=args.limit))
    table = Table(title=f"{resp.total} job(s)")
    for col in ("name", "id", "phase", "trials", "selected", "model", "created"):
        table.add_column(col)
    for job in resp.jobs:
        table.add_row(job.name, job.id[:12], phase_label(job.phase),
                      f"{job.n_trials_complete}/{job.spec.n_trials}",
                      str(job.auto_selected_trial) if job.HasField("auto_selected_trial") else "",
                      job.spec.model.source, job.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))
    console.print(table)
    return 0


def cmd_trials(args: argparse.Namespace, console: Any) -> int:
    from google.protobuf import json_format

    from abliterate.v1 import gateway_pb2

    stub = gateway_stub(args.gateway, args.token)
    request = gateway_pb2.GetParetoFrontRequest(job_id=args.job)
    if args.kl_cap is not None:
        request.kl_cap = args.kl_cap
    front = stub.GetParetoFront(request).front
    if args.json:
        print(json_format.MessageToJson(front, preserving_proto_field_name=True))
    else:
        console.print(front_table(front))
    if args.plot:
        trials = all_trials(stub, args.job) or list(front.trials)
        plot_trials(trials, front, args.plot)
        console.print(f"plot written to {args.plot}")
    return 0


def _export(stub: Any, job_id: str, output: str, trial: int | None, fmt: str = "merged",
            hub_repo: str | None = None, private: bool = False, overwrite: bool = False) -> Any:
    from abliterate.v1 import common_pb2, gateway_pb2

    request = gateway_pb2.GatewayServiceExportModelRequest(
        job_id=job_id, path=output, overwrite=overwrite, hub_private=private,
        format=common_pb2.EXPORT_FORMAT_LORA if fmt == "lora" else common_pb2.EXPORT_FORMAT_MERGED)
    if trial is not None:
        request.trial_number = trial
    if hub_repo:
        request.hub_repo = hub_repo
    return stub.ExportModel(request)


def cmd_export(args: argparse.Namespace, console: Any) -> int:
    result = _export(gateway_stub(args.gateway, args.token), args.job, args.output, args.trial, args.format,
                     args.hub_repo, args.private, args.overwrite)
    console.print(f"trial {result.trial_number} exported to {result.path} ({len(result.files)} files, "
                  f"{result.bytes_written / 1e6:.1f} MB)" + (f"; {result.hub_url}" if result.hub_url else ""))
    return 0


def cmd_chat(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import common_pb2, gateway_pb2

    stub = gateway_stub(args.gateway, args.token)
    history: list[Any] = []
    if args.system:
        history.append(common_pb2.ChatMessage(role="system", content=args.system))
    scripted = list(args.message or [])
    if not scripted:
        console.print("chat: empty line or /quit to leave, /reset to start over")
    while True:
        if scripted:
            text = scripted.pop(0)
        elif args.message:
            return 0
        else:
            try:
                text = console.input("[bold green]you>[/bold green] ")
            except EOFError:
                return 0
        if text.strip() in ("", "/quit", "/exit"):
            return 0
        if text.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append(common_pb2.ChatMessage(role="user", content=text))
        request = gateway_pb2.GatewayServiceChatRequest(
            job_id=args.job, messages=history, original_model=args.original,
            options=common_pb2.GenerationOptions(max_new_tokens=args.max_new_tokens,
                                                 temperature=args.temperature))
        if args.trial is not None:
            request.trial_number = args.trial
        reply = []
        console.print("[bold cyan]model>[/bold cyan] ", end="")
        for chunk in stub.Chat(request):
            reply.append(chunk.text)
            console.out(chunk.text, end="", highlight=False)
        console.print()
        history.append(common_pb2.ChatMessage(role="assistant", content="".join(reply)))


def cmd_cancel(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import gateway_pb2

    job = gateway_stub(args.gateway, args.token).CancelJob(gateway_pb2.CancelJobRequest(job_id=args.job)).job
    console.print(f"job {job.name}: {phase_label(job.phase)}")
    return 0


def cmd_resume(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import gateway_pb2

    request = gateway_pb2.ResumeJobRequest(job_id=args.job)
    if args.n_trials is not None:
        request.n_trials = args.n_trials
    job = gateway_stub(args.gateway, args.token).ResumeJob(request).job
    console.print(f"job {job.name}: {phase_label(job.phase)}")
    return 0


def _log_to_file(path: Path) -> None:
    """Embedded services log to a file in the data folder, keeping the terminal for progress."""
    import logging

    from abliterate.rpc.logging import JsonFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter("embedded"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def cmd_run(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import gateway_pb2

    spec = build_spec(args)
    if spec.n_trials < 1:  # checked before the (slow) model load
        raise InvalidArgument(f"--n-trials must be >= 1, got {spec.n_trials}")
    if args.device_map:
        spec.model.device_map = args.device_map
    if not spec.name:
        spec.name = derived_job_name(spec)
    from abliterate.embedded import Embedded  # torch, lazily

    data_dir = Path(args.data_dir).expanduser().resolve()
    _log_to_file(data_dir / "abliterate.log")
    embedded = Embedded(spec.model, data_dir, batch_size=args.batch_size or 0)
    try:
        with console.status(f"loading {spec.model.source} ..."):
            embedded.start()
        stub = gateway_stub(embedded.gateway_address)
        job = submit_or_resume(stub, spec, console)
        if job.phase != gateway_pb2.JOB_PHASE_SUCCEEDED:
            job = watch(stub, job.id, console)
        if job.phase != gateway_pb2.JOB_PHASE_SUCCEEDED:
            console.print(f"[red]job {job.name} ended {phase_label(job.phase)}"
                          + (f": {job.error}" if job.error else ""))
            console.print("run the same command again to resume it")
            return 1
        front = stub.GetParetoFront(gateway_pb2.GetParetoFrontRequest(job_id=job.id)).front
        console.print(front_table(front))
        if args.no_export:
            return 0
        output = args.output or str(data_dir / f"export-{job.name}")
        with console.status(f"exporting to {output} ..."):
            result = _export(stub, job.id, str(Path(output).expanduser().resolve()), args.trial, overwrite=True)
        console.print(f"[green]trial {result.trial_number} exported to {result.path}[/green] "
                      f"({len(result.files)} files, {result.bytes_written / 1e6:.1f} MB)")
        return 0
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted; completed trials are saved. Run the same command again "
                      "to resume.[/yellow]")
        try:
            embedded.stop(grace_s=0)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            # A trial in flight runs in a worker thread that cannot be interrupted: leave now.
            os._exit(EXIT_INTERRUPTED)
    finally:
        embedded.stop()


def cmd_serve(args: argparse.Namespace, console: Any) -> int:
    rest = [a for a in args.args if a != "--"]
    if args.service == "gateway":
        from services.gateway.__main__ import main as serve_main
    elif args.service == "optimizer":
        from services.optimizer.__main__ import main as serve_main
    elif args.service == "extractor":
        from services.extractor.__main__ import main as serve_main
    elif args.service == "evaluator":
        from services.evaluator.__main__ import main as serve_main
    elif args.service == "torch":
        from services.torch_host import main as serve_main
    else:
        from abliterate.embedded import serve_all as serve_main
    return int(serve_main(rest) or 0)


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "watch": cmd_watch, "jobs": cmd_jobs, "trials": cmd_trials,
            "export": cmd_export, "chat": cmd_chat, "cancel": cmd_cancel, "resume": cmd_resume,
            "serve": cmd_serve, "vast": lambda args, console: _vast_run(args)}


def _vast_run(args) -> int:
    from abliterate.vast.cli import run as vast_run

    return vast_run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = _console()
    try:
        return COMMANDS[args.command](args, console)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED
    except AbliterateError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2 if isinstance(exc, InvalidArgument) else 1
    except Exception as exc:  # noqa: BLE001 - a user sees the cause; the traceback goes to the log
        logging.getLogger("abliterate.cli").exception("command %s failed", args.command)
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The subcommands of ``abliterate`` and :func:`main`, which turns every failure into a one-line message.

The client commands (everything but ``run`` and ``serve``) never import torch; ``run`` and ``serve``
import it lazily, once their input has been checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from abliterate.cli.client import (
    all_trials,
    audit_job,
    client_tls,
    export_trial,
    gateway_client,
    is_connection_failure,
    no_gateway_message,
    submit_or_resume,
    watch,
)
from abliterate.cli.display import (
    audit_table,
    front_table,
    geometry_table,
    harness_table,
    make_console,
    method_summary_lines,
    phase_label,
)
from abliterate.cli.parser import build_parser
from abliterate.cli.plot import plot_geometry, plot_trials, require_matplotlib
from abliterate.cli.spec import (
    build_spec,
    check_prompt_sets,
    derived_job_name,
    judge_from_flags,
    parse_prompt_set,
    read_job_file,
)
from abliterate.errors import AbliterateError, FailedPrecondition, InvalidArgument, Unavailable

EXIT_INTERRUPTED = 130
#: Commands that talk to a gateway at --gateway (run starts its own on loopback ports).
CLIENT_COMMANDS = frozenset(
    {"submit", "watch", "jobs", "trials", "export", "chat", "cancel", "resume", "audit", "geometry"}
)
#: Status codes of a job failure caused by its input: resuming the job runs the same input again.
INPUT_ERROR_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
)


def cmd_submit(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import gateway_pb2

    spec = build_spec(args, read_job_file(args.file) if args.file else None)
    # Local prompt paths are read by the extractor on its own machine, so only what is the same
    # everywhere (bundled sets, inline lists, split syntax) is checked here.
    check_prompt_sets(spec, read_local_files=False)
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        job = client.submit_job(spec)
        console.print(f"job [bold]{job.name}[/bold] submitted: {job.id}")
        if args.watch:
            job = watch(client, job.id, console)
            return 0 if job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED else 1
    return 0


def cmd_watch(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import gateway_pb2

    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        job = watch(client, args.job, console, replay=args.replay)
    console.print(f"job {job.name}: {phase_label(job.phase)}" + (f" ({escape(job.error)})" if job.error else ""))
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
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        listing = client.list_jobs(phases, limit=args.limit)
    table = Table(title=f"{listing.total} job(s)")
    for column in ("name", "id", "phase", "trials", "selected", "model", "created"):
        table.add_column(column)
    for job in listing.jobs:
        table.add_row(
            job.name,
            job.id[:12],
            phase_label(job.phase),
            f"{job.n_trials_complete}/{job.spec.n_trials}",
            str(job.auto_selected_trial) if job.HasField("auto_selected_trial") else "",
            job.spec.model.source,
            job.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)
    return 0


def cmd_trials(args: argparse.Namespace, console: Any) -> int:
    from google.protobuf import json_format

    if args.plot:
        require_matplotlib()  # before any call, so a missing extra is said at once
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        front = client.pareto_front(args.job, kl_cap=args.kl_cap)
        if args.json:
            print(json_format.MessageToJson(front, preserving_proto_field_name=True))
        else:
            console.print(front_table(front))
        if args.plot:
            trials = all_trials(client, args.job) or list(front.trials)
            plot_trials(trials, front, args.plot)
            console.print(f"plot written to {args.plot}")
    return 0


def cmd_export(args: argparse.Namespace, console: Any) -> int:
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        result = export_trial(
            client, args.job, args.output, args.trial, args.format, args.hub_repo, args.private, args.overwrite
        )
    console.print(
        f"trial {result.trial_number} exported to {result.path} ({len(result.files)} files, "
        f"{result.bytes_written / 1e6:.1f} MB)" + (f"; {result.hub_url}" if result.hub_url else "")
    )
    return 0


def cmd_chat(args: argparse.Namespace, console: Any) -> int:
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        return _chat(client, args, console)


def _chat(client: Any, args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import common_pb2, gateway_pb2

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
            job_id=args.job,
            messages=history,
            original_model=args.original,
            options=common_pb2.GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
        )
        if args.trial is not None:
            request.trial_number = args.trial
        reply = []
        console.print("[bold cyan]model>[/bold cyan] ", end="")
        for chunk in client.chat(request):
            reply.append(chunk.text)
            console.out(chunk.text, end="", highlight=False)
        console.print()
        history.append(common_pb2.ChatMessage(role="assistant", content="".join(reply)))


def cmd_cancel(args: argparse.Namespace, console: Any) -> int:
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        job = client.cancel_job(args.job)
    console.print(f"job {job.name}: {phase_label(job.phase)}")
    return 0


def cmd_resume(args: argparse.Namespace, console: Any) -> int:
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        job = client.resume_job(args.job, args.n_trials)
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


def resuming_can_help(job: Any) -> bool:
    """False when the job FAILED on its input (INVALID_ARGUMENT, NOT_FOUND, ...): a resume runs it again.

    The gateway stores a failure as ``CODE: message`` (``services/gateway/orchestrator.py``); a cancelled or
    interrupted job, or one that failed on an unavailable service, may get further on the next attempt."""
    from abliterate.v1 import gateway_pb2

    if job.phase != gateway_pb2.JOB_PHASE_FAILED:
        return True
    code = job.error.split(":", 1)[0].strip()
    return code not in INPUT_ERROR_CODES


def cmd_run(args: argparse.Namespace, console: Any) -> int:
    from abliterate.v1 import gateway_pb2

    spec = build_spec(args)
    check_prompt_sets(spec, read_local_files=True)  # before the (slow) model load
    if spec.options.judge.kind == "llm" and spec.options.judge.api_key_env:
        from abliterate.core.llm_judge import api_key

        api_key(spec.options.judge.api_key_env)  # a missing key is said before the model loads
    if args.device_map:
        spec.model.device_map = args.device_map
    if not spec.name:
        spec.name = derived_job_name(spec)
    from abliterate_services.embedded import Embedded  # torch, lazily

    data_dir = Path(args.data_dir).expanduser().resolve()
    _log_to_file(data_dir / "abliterate.log")
    embedded = Embedded(spec.model, data_dir, batch_size=args.batch_size or 0)
    try:
        with console.status(f"loading {spec.model.source} ..."):
            embedded.start()
        with gateway_client(embedded.gateway_address) as client:
            job = submit_or_resume(client, spec, console)
            if job.phase != gateway_pb2.JOB_PHASE_SUCCEEDED:
                job = watch(client, job.id, console)
            if job.phase != gateway_pb2.JOB_PHASE_SUCCEEDED:
                console.print(
                    f"[red]job {job.name} ended {phase_label(job.phase)}"
                    + (f": {escape(job.error)}" if job.error else "")
                )
                if resuming_can_help(job):
                    console.print("run the same command again to resume it")
                else:
                    console.print("resuming would fail the same way: fix the input and run again")
                return 1
            front = client.pareto_front(job.id)
            console.print(front_table(front))
            if args.no_export:
                return 0
            output = args.output or str(data_dir / f"export-{job.name}")
            with console.status(f"exporting to {output} ..."):
                result = export_trial(
                    client, job.id, str(Path(output).expanduser().resolve()), args.trial, overwrite=True
                )
        console.print(
            f"[green]trial {result.trial_number} exported to {result.path}[/green] "
            f"({len(result.files)} files, {result.bytes_written / 1e6:.1f} MB)"
        )
        return 0
    except KeyboardInterrupt:
        console.print(
            "\n[yellow]interrupted; completed trials are saved. Run the same command again to resume.[/yellow]"
        )
        try:
            embedded.stop(grace_s=0)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            # A trial in flight runs in a worker thread that cannot be interrupted: leave now.
            os._exit(EXIT_INTERRUPTED)
    finally:
        embedded.stop()


def cmd_geometry(args: argparse.Namespace, console: Any) -> int:
    from google.protobuf import json_format

    if args.plot:
        require_matplotlib()
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        job = client.get_job(args.job)
    if not job.diagnostics:
        raise FailedPrecondition(f"job {job.name} has no direction set yet (phase {phase_label(job.phase)})")
    if args.json:
        print(
            json.dumps(
                [
                    json_format.MessageToDict(
                        layer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                    )
                    for layer in job.diagnostics
                ]
            )
        )
    else:
        console.print(geometry_table(job))
        for line in method_summary_lines(job):
            console.print(line)
    if args.plot:
        plot_geometry(job, args.plot)
        console.print(f"plot written to {args.plot}")
    return 0


def cmd_audit(args: argparse.Namespace, console: Any) -> int:
    judge = judge_from_flags(args)
    prompts = parse_prompt_set(args.prompts) if args.prompts else None
    with gateway_client(args.gateway, args.token, client_tls(args)) as client:
        with console.status("auditing on long replies ..."):
            audited = audit_job(
                client,
                args.job,
                args.trial,
                args.min_new_tokens,
                args.max_new_tokens,
                judge,
                prompts,
            )
        console.print(audit_table(audited.trials))
    return 0


def cmd_reproduce(args: argparse.Namespace, console: Any) -> int:
    """Exit 0 when the re-measured scores match the recorded ones, 1 when they do not (or none were recorded)."""
    import json

    from abliterate.core.manifest import read_manifest

    read_manifest(args.path)  # a missing or unreadable manifest is refused before torch loads
    from abliterate.core.reproduce import KL_TOLERANCE, reproduce  # torch, lazily

    if args.json:
        result = reproduce(args.path, args.model)
    else:
        with console.status("reproducing ...") as status:
            result = reproduce(args.path, args.model, progress=status.update)
    if args.json:
        print(
            json.dumps(
                {
                    "kl": result.kl,
                    "refusals": result.refusals,
                    "recorded_kl": result.recorded_kl,
                    "recorded_refusals": result.recorded_refusals,
                    "recorded_pruned": result.recorded_pruned,
                    "kl_matches": result.kl_matches,
                    "refusals_match": result.refusals_match,
                    "matches": result.matches,
                    "notes": result.notes,
                }
            )
        )
    else:
        recorded_kl = "-" if result.recorded_kl is None else f"{result.recorded_kl:.6f}"
        recorded_refusals = "-" if result.recorded_refusals is None else str(result.recorded_refusals)
        if result.recorded_pruned:
            recorded_refusals = f">= {recorded_refusals} (pruned)"
        console.print(f"KL        recorded {recorded_kl}  measured {result.kl:.6f}  (tolerance {KL_TOLERANCE:g})")
        console.print(f"refusals  recorded {recorded_refusals}  measured {result.refusals}/{result.n_refusal_prompts}")
        for note in result.notes:
            console.print(f"[yellow]note:[/yellow] {escape(note)}")
        verdict = {True: "[green]reproduced[/green]", False: "[red]does not match[/red]", None: "nothing to compare"}
        console.print(verdict[result.matches])
    return 0 if result.matches else 1


def cmd_lm_eval(args: argparse.Namespace, console: Any) -> int:
    import json

    from abliterate.core.manifest import read_manifest

    read_manifest(args.path)  # a missing or unreadable manifest is refused before torch loads
    from abliterate.core.harness import HARNESS_FILE, compare, harness_rows  # torch, lazily

    settings = dict(
        tasks=[task.strip() for task in args.tasks.split(",") if task.strip()],
        include_path=args.include_path,
        model_source=args.model,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        apply_chat_template=args.apply_chat_template,
    )
    if args.json:
        table = compare(args.path, **settings)
        print(json.dumps({key: table[key] for key in table if key != "results"}))
        return 0
    with console.status("lm-eval ...") as status:
        table = compare(args.path, **settings, progress=status.update)
    console.print(harness_table(harness_rows(table)))
    console.print(f"stored in {HARNESS_FILE} and the model card of the export")
    return 0


def cmd_copy_study(args: argparse.Namespace, console: Any) -> int:
    from abliterate.study_copy import copy_study

    copied = copy_study(args.source, args.destination, args.study, args.new_name)
    console.print(f"copied study {escape(copied.name)} ({copied.n_trials} trials) to {escape(args.destination)}")
    return 0


def cmd_serve(args: argparse.Namespace, console: Any) -> int:
    rest = [arg for arg in args.args if arg != "--"]
    if args.service == "gateway":
        from abliterate_services.gateway.__main__ import main as serve_main
    elif args.service == "optimizer":
        from abliterate_services.optimizer.__main__ import main as serve_main
    elif args.service == "extractor":
        from abliterate_services.extractor.__main__ import main as serve_main
    elif args.service == "evaluator":
        from abliterate_services.evaluator.__main__ import main as serve_main
    elif args.service == "torch":
        from abliterate_services.torch_host import main as serve_main
    else:
        from abliterate_services.embedded import serve_all as serve_main
    return int(serve_main(rest) or 0)


def cmd_vast(args: argparse.Namespace, console: Any) -> int:
    from abliterate.vast.cli import run as vast_run

    return vast_run(args)


COMMANDS = {
    "run": cmd_run,
    "submit": cmd_submit,
    "watch": cmd_watch,
    "jobs": cmd_jobs,
    "trials": cmd_trials,
    "export": cmd_export,
    "chat": cmd_chat,
    "cancel": cmd_cancel,
    "resume": cmd_resume,
    "audit": cmd_audit,
    "geometry": cmd_geometry,
    "reproduce": cmd_reproduce,
    "lm-eval": cmd_lm_eval,
    "copy-study": cmd_copy_study,
    "serve": cmd_serve,
    "vast": cmd_vast,
}


def print_error(console: Any, message: str) -> None:
    """``error: message`` on one line (a terminal wraps it; rich would otherwise break it at its width).

    The message is escaped: it quotes user input such as ``train[:40]``, which rich would read as markup."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (exit 2) or the help (exit 0)
        return exc.code if isinstance(exc.code, int) else 1
    console = make_console()
    try:
        return COMMANDS[args.command](args, console)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED
    except Unavailable as exc:
        connection_failed = args.command in CLIENT_COMMANDS and is_connection_failure(exc)
        print_error(console, no_gateway_message(args.gateway) if connection_failed else str(exc))
        return 1
    except AbliterateError as exc:
        print_error(console, str(exc))
        return 2 if isinstance(exc, InvalidArgument) else 1
    except Exception as exc:  # noqa: BLE001 - a user sees the cause; the traceback goes to the log
        logging.getLogger("abliterate.cli").exception("command %s failed", args.command)
        print_error(console, f"{type(exc).__name__}: {exc}")
        return 1

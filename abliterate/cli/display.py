"""What the client commands print: rich tables of jobs and Pareto fronts, and the live job progress."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def make_console() -> Any:
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def phase_label(phase: int) -> str:
    from abliterate.v1 import gateway_pb2

    return gateway_pb2.JobPhase.Name(phase).removeprefix("JOB_PHASE_")


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _params_summary(params: Any) -> str:
    from abliterate.v1 import common_pb2

    scope = "per-layer" if params.direction_scope == common_pb2.DIRECTION_SCOPE_PER_LAYER else "global"
    parts = [
        scope + (f"@{params.direction_index:.2f}" if params.HasField("direction_index") and scope == "global" else "")
    ]
    for name, kernel in sorted(params.components.items()):
        parts.append(f"{name}={kernel.max_weight:.2f}@{kernel.max_weight_position:.1f}")
    return " ".join(parts)


def trial_line(trial: Any) -> str:
    """One scored trial: ``trial 3: refusals 5/64, KL 0.1234``; a pruned one says what was proven."""
    scores = trial.scores
    degenerate = f", {scores.degenerate} degenerate" if scores.degenerate else ""
    degenerate += f", {scores.unjudged} unjudged" if scores.unjudged else ""
    if scores.pruned:
        by = f" by trial {scores.dominated_by}" if scores.HasField("dominated_by") else ""
        return (
            f"trial {trial.number}: refusals >= {scores.refusals}/{scores.n_refusal_prompts}{degenerate}, "
            f"KL {scores.kl:.4f} (pruned: certainly dominated{by})"
        )
    return (
        f"trial {trial.number}: refusals {scores.refusals}/{scores.n_refusal_prompts}{degenerate}, KL {scores.kl:.4f}"
    )


def front_table(front: Any) -> Any:
    from rich.table import Table

    table = Table(title=f"Pareto front ({len(front.trials)} trials; KL cap {front.kl_cap:g})")
    table.add_column("", width=1)
    table.add_column("trial", justify="right")
    table.add_column("refusals", justify="right")
    table.add_column("KL", justify="right")
    table.add_column("degenerate", justify="right")  # replies that repeat themselves: neither refusal nor answer
    table.add_column("audited", justify="right")  # abliterate audit: refusals on long replies, judged whole
    table.add_column("parameters")
    chosen = front.auto_selected_trial if front.HasField("auto_selected_trial") else None
    for trial in front.trials:
        n_prompts = trial.scores.n_refusal_prompts
        table.add_row(
            "*" if trial.number == chosen else "",
            str(trial.number),
            f"{trial.scores.refusals}/{n_prompts}" if n_prompts else str(trial.scores.refusals),
            f"{trial.scores.kl:.4f}",
            str(trial.scores.degenerate),
            audit_cell(trial),
            _params_summary(trial.params),
        )
    table.caption = f"* auto-selected: {front.selection_rule}"
    return table


# Per-layer method diagnostics the geometry table shows when the direction set has them: field -> header.
METHOD_COLUMNS = {
    "probe_accuracy": "probe acc.",
    "compliance_cosine": "cos(c, r)",
    "calibration_factor": "calibration",
    "helpfulness_angle_deg": "helpful angle",
}


def geometry_table(job: Any) -> Any:
    """The residual geometry of a job's direction set, one row per residual (extractor diagnostics), with
    the methods' diagnostics (probe accuracy, CAA overlap, calibration, helpfulness angle, subspace energy)
    as further columns where the set has them."""
    from rich.table import Table

    table = Table(title=f"Residual geometry of job {job.name} (direction set {job.direction_set_id[:12]})")
    for name in ("residual", "mean-diff norm", "separation (d)", "cos(means)", "cos to next", "sacred overlap"):
        table.add_column(name, justify="right")
    present = [key for key in METHOD_COLUMNS if any(layer.HasField(key) for layer in job.diagnostics)]
    for key in present:
        table.add_column(METHOD_COLUMNS[key], justify="right")
    has_energy = any(layer.subspace_energy for layer in job.diagnostics)
    if has_energy:
        table.add_column("subspace energy", justify="right")
    for layer in job.diagnostics:
        row = [
            str(layer.residual_index),
            f"{layer.mean_diff_norm:.3f}",
            f"{layer.separation:.2f}",
            f"{layer.means_cosine:.3f}",
            f"{layer.cosine_to_next:.3f}" if layer.HasField("cosine_to_next") else "-",
            f"{layer.sacred_overlap:.3f}" if layer.HasField("sacred_overlap") else "-",
        ]
        row += [f"{getattr(layer, key):.3f}" if layer.HasField(key) else "-" for key in present]
        if has_energy:
            row.append(" ".join(f"{share:.2f}" for share in layer.subspace_energy))
        table.add_row(*row)
    return table


def method_summary_lines(job: Any) -> list[str]:
    """The direction methods' reports of a job (cones, top heads, reply labels) as lines of text."""
    if not job.HasField("methods"):
        return []
    methods, lines = job.methods, []
    if methods.HasField("labels"):
        labels = methods.labels
        lines.append(
            f"reply labels: harmful {labels.harmful_refused} refused / {labels.harmful_complied} complied, "
            f"harmless {labels.harmless_refused} refused / {labels.harmless_complied} complied"
        )
    if methods.HasField("cones"):
        cones = methods.cones
        lines.append(
            f"concept cones at residual {cones.layer}: sizes {list(cones.sizes)}, silhouette {cones.silhouette:.3f}"
        )
    if methods.top_heads:
        heads = ", ".join(f"{h.layer}.{h.head} ({h.score:.3g})" for h in methods.top_heads[:8])
        lines.append(f"top attention heads (block.head, score): {heads}")
    return lines


def audit_cell(trial: Any) -> str:
    """``12/64 (markers, 100-150 tok)`` for an audited trial, ``-`` otherwise."""
    if not trial.HasField("audit"):
        return "-"
    audit = trial.audit
    degenerate = f", {audit.degenerate} degenerate" if audit.degenerate else ""
    return (
        f"{audit.refusals}/{audit.n_prompts}{degenerate} "
        f"({audit.judge}, {audit.min_new_tokens}-{audit.max_new_tokens} tok)"
    )


def audit_table(trials: Any) -> Any:
    """Search-time and audited refusals side by side, one row per audited trial."""
    from rich.table import Table

    table = Table(title=f"Audit on long replies ({len(trials)} trials)")
    for name in ("trial", "search refusals", "audited refusals", "mean reply", "KL", "capability (original)"):
        table.add_column(name, justify="right")
    for trial in trials:
        audit = trial.audit
        capability = (
            f"{audit.capability_accuracy:.0%} ({audit.capability_original:.0%}) of {audit.capability_questions}"
            if audit.capability_questions
            else "-"
        )
        table.add_row(
            str(trial.number),
            f"{trial.scores.refusals}/{trial.scores.n_refusal_prompts}",
            audit_cell(trial),
            f"{audit.mean_tokens:.0f} tok",
            f"{trial.scores.kl:.4f}",
            capability,
        )
    return table


def harness_table(rows: Any) -> Any:
    """lm-eval's metrics of the original and of the export side by side (core/harness.HarnessRow rows)."""
    from rich.table import Table

    table = Table(title="lm-evaluation-harness")
    for name, justify in (("task", "left"), ("metric", "left"), ("original", "right"), ("abliterated", "right")):
        table.add_column(name, justify=justify)
    table.add_column("change", justify="right")
    for row in rows:
        table.add_row(row.task, row.metric, f"{row.original:.4f}", f"{row.edited:.4f}", f"{row.delta:+.4f}")
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
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        from abliterate.v1 import gateway_pb2

        self.n_trials = job.spec.n_trials
        self.n_complete = job.n_trials_complete
        self.phase = job.phase
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        with progress:
            task = progress.add_task(
                phase_label(self.phase), total=self.n_trials or None, completed=self.n_complete, info=""
            )
            for response in stream:
                event = response.event
                if event.HasField("eta_s"):
                    self.eta = event.eta_s
                kind = event.WhichOneof("event")
                if kind == "phase_changed":
                    self.phase = event.phase_changed.current
                    if event.phase_changed.previous != event.phase_changed.current:
                        progress.console.print(
                            f"phase {phase_label(self.phase)}"
                            + (f": {escape(event.phase_changed.message)}" if event.phase_changed.message else "")
                        )
                    else:  # the snapshot a watch starts with
                        progress.console.print(
                            f"job {job.name} is {phase_label(self.phase)} ({self.n_complete}/{self.n_trials} trials)"
                        )
                    if self.phase == gateway_pb2.JOB_PHASE_FAILED:
                        self.error = event.phase_changed.message
                elif kind == "progress":
                    step = event.progress
                    detail = f"{step.phase} {step.done}/{step.total}" if step.total else step.phase
                    progress.update(task, info=f"{detail} {step.message}".strip()[:80])
                elif kind == "trial_finished":
                    finished = event.trial_finished
                    self.n_complete = finished.n_complete
                    self.n_trials = finished.n_trials or self.n_trials
                    progress.console.print(f"{trial_line(finished.trial)} ({finished.n_complete}/{finished.n_trials})")
                elif kind == "trial_failed":
                    failed = event.trial_failed
                    progress.console.print(
                        f"[yellow]trial {failed.number} failed: {escape(failed.error)}"
                        + (" (will retry)" if failed.will_retry else "")
                    )
                elif kind == "pareto_front":
                    front = event.pareto_front
                    if front.HasField("auto_selected_trial"):
                        chosen = next((t for t in front.trials if t.number == front.auto_selected_trial), None)
                        if chosen is not None:
                            self.best = (
                                f"best: #{chosen.number} refusals {chosen.scores.refusals}"
                                f"/{chosen.scores.n_refusal_prompts} KL {chosen.scores.kl:.3f}"
                            )
                elif kind == "error":
                    error = event.error
                    style = "yellow" if error.recoverable else "red"
                    progress.console.print(f"[{style}]{error.code}: {escape(error.message)}")
                    if not error.recoverable:
                        self.error = f"{error.code}: {error.message}"
                eta = f"ETA {format_eta(self.eta)}" if self.phase == gateway_pb2.JOB_PHASE_OPTIMIZING else ""
                info = " ".join(part for part in (self.best, eta) if part)
                progress.update(
                    task,
                    description=phase_label(self.phase),
                    total=self.n_trials or None,
                    completed=self.n_complete,
                    **({"info": info} if kind != "progress" else {}),
                )
        return self.phase

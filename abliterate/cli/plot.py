"""``abliterate trials JOB --plot FILE.png``: refusals vs KL of every trial.

matplotlib is an optional extra (``pip install 'abliterate[plot]'``); without it the command says so
instead of failing with an ImportError.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from abliterate.errors import FailedPrecondition

PLOT_INSTALL_HINT = "pip install 'abliterate[plot]'"


class PlottingUnavailable(FailedPrecondition):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise PlottingUnavailable, with the install command, when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401 - only checks that it is there
    except ImportError as exc:
        raise PlottingUnavailable(
            f"--plot needs matplotlib, which is not installed; install it with {PLOT_INSTALL_HINT}"
        ) from exc


def plot_trials(trials: Sequence[Any], front: Any, path: str) -> None:
    """Refusals vs KL of every trial, the Pareto front highlighted, the auto-selected trial marked."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the plot goes to a file
    import matplotlib.pyplot as plt

    front_numbers = {trial.number for trial in front.trials}
    figure, axes = plt.subplots(figsize=(7, 5), dpi=100)
    others = [trial for trial in trials if trial.number not in front_numbers]
    if others:
        axes.scatter(
            [trial.scores.kl for trial in others],
            [trial.scores.refusals for trial in others],
            color="0.6",
            s=18,
            label="trials",
        )
    front_by_kl = sorted(front.trials, key=lambda trial: trial.scores.kl)
    if front_by_kl:
        kls = [trial.scores.kl for trial in front_by_kl]
        refusals = [trial.scores.refusals for trial in front_by_kl]
        axes.step(kls, refusals, where="post", color="tab:red", alpha=0.6)
        axes.scatter(kls, refusals, color="tab:red", s=30, label="Pareto front", zorder=3)
        for trial in front_by_kl:
            axes.annotate(
                str(trial.number),
                (trial.scores.kl, trial.scores.refusals),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    if front.HasField("auto_selected_trial"):
        chosen = next((trial for trial in front.trials if trial.number == front.auto_selected_trial), None)
        if chosen is not None:
            axes.scatter(
                [chosen.scores.kl],
                [chosen.scores.refusals],
                marker="*",
                s=220,
                color="gold",
                edgecolor="black",
                zorder=4,
                label=f"auto-selected (#{chosen.number})",
            )
    if front.kl_cap:
        axes.axvline(front.kl_cap, color="tab:blue", linestyle="--", linewidth=1, label=f"KL cap {front.kl_cap:g}")
    axes.set_xlabel("KL divergence (first token)")
    axes.set_ylabel("refusals")
    axes.set_title("Refusals vs KL")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def plot_geometry(job: Any, path: str) -> None:
    """Four panels over the residual index: mean-difference norm, separation, cosine of each direction
    with the next residual's, and (when asked for) overlap with the sacred directions."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(job.diagnostics)
    if not layers:
        raise FailedPrecondition(f"job {job.name} has no direction set diagnostics yet")
    index = [layer.residual_index for layer in layers]
    panels = [
        ("||mean(harmful) - mean(harmless)||", [layer.mean_diff_norm for layer in layers], index),
        ("separation along r (Cohen's d)", [layer.separation for layer in layers], index),
        (
            "cos(r_i, r_i+1)",
            [layer.cosine_to_next for layer in layers if layer.HasField("cosine_to_next")],
            [layer.residual_index for layer in layers if layer.HasField("cosine_to_next")],
        ),
        (
            "max |cos(r, sacred)|",
            [layer.sacred_overlap for layer in layers if layer.HasField("sacred_overlap")],
            [layer.residual_index for layer in layers if layer.HasField("sacred_overlap")],
        ),
    ]
    figure, grid = plt.subplots(2, 2, figsize=(10, 7), dpi=100, sharex=True)
    for axes, (title, values, where) in zip(grid.flat, panels):
        axes.set_title(title, fontsize=10)
        if values:
            axes.plot(where, values, marker="o", markersize=3, color="tab:blue")
        else:
            axes.text(0.5, 0.5, "no sacred directions in this job", ha="center", va="center", transform=axes.transAxes)
        axes.grid(alpha=0.3)
    for axes in grid[1]:
        axes.set_xlabel("residual index (0 = embeddings, i = output of block i-1)")
    figure.suptitle(f"Residual geometry: job {job.name}, direction set {job.direction_set_id[:12]}")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)

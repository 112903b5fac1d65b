"""The ``abliterate`` command.

- ``abliterate run MODEL ...``: embedded mode, the whole pipeline in one process (all four services on
  loopback ports, SQLite in ``--data-dir``): extract, optimize, show the Pareto front, export the chosen
  trial. Re-running the same command resumes the same job and study.
- Client commands against a running gateway (``--gateway HOST:PORT``, ``--token``; env
  ``ABLITERATE_GATEWAY`` / ``ABLITERATE_TOKEN``): ``submit``, ``watch``, ``jobs``, ``trials``
  (``--plot FILE.png``), ``export``, ``chat``, ``cancel``, ``resume``.
- ``abliterate serve {extractor,evaluator,optimizer,gateway,torch,all}``.

Modules: :mod:`.parser` (flags and their range checks), :mod:`.spec` (job specs and the input checks
made before a model loads), :mod:`.display` (rich output), :mod:`.client` (gateway calls), :mod:`.plot`
(the optional matplotlib plot) and :mod:`.commands` (the subcommands and :func:`main`).

The client commands never import torch (``run`` and ``serve`` import it lazily).
"""

from __future__ import annotations

from abliterate.cli.client import all_trials, export_trial, gateway_client, submit_or_resume, watch
from abliterate.cli.commands import COMMANDS, main
from abliterate.cli.display import JobWatcher, front_table, phase_label
from abliterate.cli.parser import DEFAULT_DATA_DIR, DEFAULT_GATEWAY, DEFAULT_SETS, build_parser
from abliterate.cli.plot import plot_trials
from abliterate.cli.spec import build_spec, check_prompt_sets, derived_job_name, parse_prompt_set
from abliterate.errors import InvalidArgument

__all__ = [
    "COMMANDS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_GATEWAY",
    "DEFAULT_SETS",
    "InvalidArgument",
    "JobWatcher",
    "all_trials",
    "build_parser",
    "build_spec",
    "check_prompt_sets",
    "derived_job_name",
    "export_trial",
    "front_table",
    "gateway_client",
    "main",
    "parse_prompt_set",
    "phase_label",
    "plot_trials",
    "submit_or_resume",
    "watch",
]

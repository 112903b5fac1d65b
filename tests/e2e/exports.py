"""An embedded job on a tiny model folder, exported: the export folder the manifest-reading commands read."""

from __future__ import annotations

import sys

from abliterate import cli
from abliterate.specs import ModelSpec
from abliterate.v1 import gateway_pb2
from abliterate_services.embedded import Embedded

# Marker letters common enough in a random model's byte-level replies that some count as refusals.
MARKERS = list("abcdefghijklm")


def run_and_export(model_dir, data, *flags: str):
    """(export folder, the job's direction set id, its Pareto trials) of a 3-trial embedded job."""
    from rich.console import Console

    args = cli.build_parser().parse_args(
        ["run", str(model_dir), "--n-trials", "3", "--n-prompts", "8", "--max-new-tokens", "6", "--seed", "3", *flags]
    )
    spec = cli.build_spec(args)
    spec.name = "reproduce-me"
    spec.options.refusal_markers.extend(MARKERS)
    embedded = Embedded(ModelSpec(source=str(model_dir)), data).start()
    try:
        with cli.gateway_client(embedded.gateway_address) as client:
            console = Console(file=sys.stdout, width=140)
            job = cli.watch(client, cli.submit_or_resume(client, spec, console).id, console)
            assert job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED
            trials = list(client.pareto_front(job.id).trials)
        out = data / "export"
        assert cli.main(["export", "reproduce-me", str(out), "--gateway", embedded.gateway_address]) == 0
    finally:
        embedded.stop()
    return out, job.direction_set_id, trials

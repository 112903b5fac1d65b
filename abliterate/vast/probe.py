"""``python -m abliterate.vast.probe``: run ON the instance (over SSH); prints one JSON
object with the job state as the processes see it -- never the instance's uptime:

- ``stack``: the ``abliterate serve all`` process (pid file + /proc), alive or not;
- ``gateway``: reachable or not, and every job's phase and trial counts (ListJobs);
- ``exports``: exported model folders (a config.json and at least one weight file).

Torch-free (grpc only). The CLI decides "running" and "exported" from this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

RUNNING_PHASES = {"QUEUED", "EXTRACTING", "OPTIMIZING"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def stack_state(root: Path) -> dict:
    pid_file = root / "stack.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return {"alive": False, "pid": None}
    alive = Path(f"/proc/{pid}").exists()
    if alive:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            alive = "abliterate" in cmdline
        except OSError:
            alive = False
    return {"alive": alive, "pid": pid}


def exports(root: Path) -> list[dict]:
    found = []
    base = root / "exports"
    if not base.is_dir():
        return found
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        files = [f for f in folder.iterdir() if f.is_file()]
        weights = [f for f in files if f.name.endswith(WEIGHT_SUFFIXES)]
        adapter = (folder / "adapter_config.json").exists()
        if weights and ((folder / "config.json").exists() or adapter):
            found.append({"name": folder.name, "bytes": sum(f.stat().st_size for f in files)})
    return found


def gateway_jobs(address: str, token: str | None, timeout_s: float = 5.0) -> dict:
    try:
        import grpc

        from abliterate.rpc.channels import make_channel
        from abliterate.v1 import gateway_pb2, gateway_pb2_grpc
    except ImportError as exc:
        return {"reachable": False, "error": f"client libraries missing: {exc}", "jobs": []}
    channel = make_channel(address, token=token or None)
    try:
        resp = gateway_pb2_grpc.GatewayServiceStub(channel).ListJobs(gateway_pb2.ListJobsRequest(), timeout=timeout_s)
    except grpc.RpcError as err:
        return {"reachable": False, "error": f"{err.code().name}: {err.details()}", "jobs": []}
    finally:
        channel.close()
    jobs = []
    for job in resp.jobs:
        phase = gateway_pb2.JobPhase.Name(job.phase).removeprefix("JOB_PHASE_")
        jobs.append(
            {
                "id": job.id,
                "name": job.name,
                "phase": phase,
                "trials_complete": job.n_trials_complete,
                "trials_target": job.spec.n_trials,
                "model": job.spec.model.source,
                "auto_selected_trial": job.auto_selected_trial if job.HasField("auto_selected_trial") else None,
            }
        )
    return {"reachable": True, "jobs": jobs}


def probe(root: Path, gateway: str, token: str | None) -> dict:
    return {"stack": stack_state(root), "gateway": gateway_jobs(gateway, token), "exports": exports(root)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m abliterate.vast.probe")
    p.add_argument("--root", default="/workspace/abliterate")
    p.add_argument("--gateway", default="127.0.0.1:50050")
    args = p.parse_args(argv)
    print(json.dumps(probe(Path(args.root), args.gateway, os.environ.get("ABLITERATE_GATEWAY_TOKEN"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What runs on the instance: the layout under /workspace/abliterate, the onstart script,
the idempotent start-stack script, and the remote command lines the CLI sends over SSH.

On a Vast.ai instance the container IS our torch image (no Docker inside), so the stack
is ``abliterate serve all`` (the four services in one process: extractor+evaluator on
the GPU, optimizer and gateway on SQLite under data/) bound to 127.0.0.1 only; the CLI
reaches the gateway through an SSH tunnel.
"""

from __future__ import annotations

import shlex

REMOTE_ROOT = "/workspace/abliterate"
DATA_DIR = f"{REMOTE_ROOT}/data"
EXPORTS_DIR = f"{REMOTE_ROOT}/exports"
LOGS_DIR = f"{REMOTE_ROOT}/logs"
HF_HOME = f"{REMOTE_ROOT}/huggingface"
ENV_FILE = f"{REMOTE_ROOT}/env"
PID_FILE = f"{REMOTE_ROOT}/stack.pid"
START_SCRIPT = f"{REMOTE_ROOT}/start-stack.sh"
STACK_LOG = f"{LOGS_DIR}/stack.log"
GATEWAY_PORT = 50050
LOGS = {"stack": STACK_LOG, "onstart": f"{LOGS_DIR}/onstart.log"}

# Written to the instance; sourced by every remote command (the container env does not reach SSH sessions).
_WRITE_ENV = (
    'python -c \'import os, shlex; print("\\n".join(f"export {k}={shlex.quote(v)}" for k, v in '
    'sorted(os.environ.items()) if k.startswith("ABLITERATE_") or k in ("HF_TOKEN",)))\''
)

START_STACK = f"""#!/bin/bash
# abliterate stack on a Vast.ai instance (idempotent: a running stack is left alone).
set -euo pipefail
mkdir -p {DATA_DIR} {EXPORTS_DIR} {LOGS_DIR} {HF_HOME}
[ -f {ENV_FILE} ] && . {ENV_FILE}
export HF_HOME={HF_HOME} ABLITERATE_DATA_DIR={REMOTE_ROOT}
if [ -f {PID_FILE} ] && kill -0 "$(cat {PID_FILE})" 2>/dev/null; then
    echo "stack already running (pid $(cat {PID_FILE}))"; exit 0
fi
: "${{ABLITERATE_MODEL:?ABLITERATE_MODEL is not set in {ENV_FILE}}}"
nohup abliterate serve all --model "$ABLITERATE_MODEL" --data-dir {DATA_DIR} --host 127.0.0.1 \\
    --gateway-port {GATEWAY_PORT} --device-map "${{ABLITERATE_DEVICE_MAP:-auto}}" \\
    ${{ABLITERATE_GATEWAY_TOKEN:+--auth-token "$ABLITERATE_GATEWAY_TOKEN"}} >> {STACK_LOG} 2>&1 &
echo $! > {PID_FILE}
echo "stack started (pid $!), log {STACK_LOG}"
"""


def onstart_script(start: bool = True) -> str:
    """The instance's onstart: lay out /workspace/abliterate, save the env for SSH sessions, start the stack."""
    lines = [
        f"mkdir -p {LOGS_DIR}",
        f"umask 077; {_WRITE_ENV} > {ENV_FILE}",
        f"cat > {START_SCRIPT} <<'ABLITERATE_EOF'\n{START_STACK}ABLITERATE_EOF",
        f"chmod 700 {START_SCRIPT}",
    ]
    if start:
        lines.append(f"bash {START_SCRIPT} >> {LOGS['onstart']} 2>&1")
    return "\n".join(lines) + "\n"


def _sourced(command: str) -> str:
    return f"[ -f {ENV_FILE} ] && . {ENV_FILE}; {command}"


def setup_command() -> str:
    """Reads the start script on stdin, installs it, and runs it (start or no-op)."""
    return f"mkdir -p {REMOTE_ROOT} && cat > {START_SCRIPT} && chmod 700 {START_SCRIPT} && bash {START_SCRIPT}"


def probe_command() -> str:
    return _sourced(f"python -m abliterate.vast.probe --root {REMOTE_ROOT} --gateway 127.0.0.1:{GATEWAY_PORT}")


def submit_command(n_trials: int | None = None, name: str | None = None, extra: list[str] | None = None) -> str:
    args = [
        "abliterate",
        "submit",
        '"$ABLITERATE_MODEL"',
        "--gateway",
        f"127.0.0.1:{GATEWAY_PORT}",
        "--token",
        '"$ABLITERATE_GATEWAY_TOKEN"',
    ]
    if n_trials:
        args += ["--n-trials", str(int(n_trials))]
    if name:
        args += ["--name", shlex.quote(name)]
    args += [shlex.quote(a) for a in extra or []]
    return _sourced(" ".join(args))


def export_command(job: str, trial: int | None = None) -> str:
    out = f"{EXPORTS_DIR}/{job}"
    args = [
        "abliterate",
        "export",
        shlex.quote(job),
        shlex.quote(out),
        "--gateway",
        f"127.0.0.1:{GATEWAY_PORT}",
        "--token",
        '"$ABLITERATE_GATEWAY_TOKEN"',
    ]
    if trial is not None:
        args += ["--trial", str(int(trial))]
    return _sourced(" ".join(args))


def logs_command(which: str, lines: int, follow: bool) -> str:
    path = LOGS[which]
    return f"tail -n {int(lines)} {'-F ' if follow else ''}{path}"


GPU_QUERY = "nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits"


def parse_gpus(text: str) -> list[dict]:
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        try:
            gpus.append(
                {
                    "index": int(parts[0]),
                    "name": parts[1],
                    "used_mib": int(float(parts[2])),
                    "total_mib": int(float(parts[3])),
                    "util": int(float(parts[4])),
                }
            )
        except ValueError:
            continue
    return gpus


FETCH_PATHS = [EXPORTS_DIR, f"{DATA_DIR}/optuna.db", f"{DATA_DIR}/gateway.db"]

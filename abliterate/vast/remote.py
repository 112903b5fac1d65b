"""SSH/SCP to an instance, as argument lists for the system ``ssh``/``scp`` (no shell on our
side). A :class:`Runner` executes them; tests swap in one that records instead."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from abliterate.errors import InvalidArgument

SSH_OPTIONS = [
    "-o",
    "StrictHostKeyChecking=accept-new",
    "-o",
    "ConnectTimeout=30",
    "-o",
    "ServerAliveInterval=30",
    "-o",
    "BatchMode=yes",
]
DEFAULT_TIMEOUT_S = 120
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]+$")


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    user: str = "root"
    key: str | None = None

    def __post_init__(self) -> None:
        if not _HOST_RE.match(self.host):
            raise InvalidArgument(f"bad SSH host {self.host!r}")
        if not 1 <= self.port <= 65535:
            raise InvalidArgument(f"bad SSH port {self.port}")
        if not re.match(r"^[a-z_][a-z0-9_-]*$", self.user):
            raise InvalidArgument(f"bad SSH user {self.user!r}")

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}"

    def key_args(self) -> list[str]:
        return ["-i", str(Path(self.key).expanduser())] if self.key else []


def parse_ssh_url(url: str, key: str | None = None) -> Target:
    """``ssh://user@host:port``, ``user@host:port``, ``-p PORT user@host`` or ``ssh -p PORT user@host``."""
    text = url.strip()
    m = re.match(r"^(?:ssh://)?(?:(?P<user>[^@\s]+)@)?(?P<host>[A-Za-z0-9.-]+):(?P<port>\d+)/?$", text)
    if m:
        return Target(m["host"], int(m["port"]), m["user"] or "root", key)
    m = re.match(r"^(?:ssh\s+)?-p\s*(?P<port>\d+)\s+(?:(?P<user>[^@\s]+)@)?(?P<host>[A-Za-z0-9.-]+)$", text)
    if m:
        return Target(m["host"], int(m["port"]), m["user"] or "root", key)
    raise InvalidArgument(f"cannot read SSH address {url!r}")


def target_of(instance: dict, key: str | None = None) -> Target:
    """The SSH endpoint of a Vast instance row (direct port when mapped, else the proxy)."""
    ports = instance.get("ports") or {}
    direct = (ports.get("22/tcp") or [{}])[0].get("HostPort") if isinstance(ports, dict) else None
    if direct and instance.get("public_ipaddr"):
        return Target(str(instance["public_ipaddr"]).strip(), int(direct), "root", key)
    host, port = instance.get("ssh_host"), instance.get("ssh_port")
    if not host or not port:
        raise InvalidArgument(
            f"instance {instance.get('id')} has no SSH address yet (state "
            f"{instance.get('actual_status') or instance.get('cur_state')}); try again shortly"
        )
    return Target(str(host).strip(), int(port), "root", key)


def remote_shell(command: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> str:
    """The remote command line: ``timeout N bash -lc '<command>'`` (exit 124 = timed out)."""
    inner = f"bash -lc {shlex.quote(command)}"
    return f"timeout {int(timeout_s)} {inner}" if timeout_s else inner


def ssh_command(
    target: Target, command: str, timeout_s: int | None = DEFAULT_TIMEOUT_S, tty: bool = False
) -> list[str]:
    return [
        "ssh",
        *SSH_OPTIONS,
        *(["-t"] if tty else []),
        *target.key_args(),
        "-p",
        str(target.port),
        target.login,
        remote_shell(command, timeout_s),
    ]


def tunnel_command(target: Target, local_port: int, remote_port: int = 50050) -> list[str]:
    """Forward 127.0.0.1:local_port to the instance's 127.0.0.1:remote_port (the gateway never listens publicly)."""
    return [
        "ssh",
        *SSH_OPTIONS,
        *target.key_args(),
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}",
        "-p",
        str(target.port),
        target.login,
    ]


def scp_from_command(target: Target, remote_paths: Sequence[str], local_dir: str) -> list[str]:
    for path in remote_paths:
        if ".." in path or not path.startswith("/"):
            raise InvalidArgument(f"remote path must be absolute without '..': {path!r}")
    return [
        "scp",
        *SSH_OPTIONS,
        *target.key_args(),
        "-r",
        "-P",
        str(target.port),
        *(f"{target.login}:{shlex.quote(p)}" for p in remote_paths),
        local_dir,
    ]


def scp_to_command(target: Target, local_path: str, remote_path: str) -> list[str]:
    return [
        "scp",
        *SSH_OPTIONS,
        *target.key_args(),
        "-P",
        str(target.port),
        local_path,
        f"{target.login}:{shlex.quote(remote_path)}",
    ]


@dataclass
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


@dataclass
class Runner:
    """Runs argument lists (never through a shell). ``capture`` False streams to the terminal."""

    default_timeout_s: float = DEFAULT_TIMEOUT_S + 30
    calls: list[list[str]] = field(default_factory=list)

    def run(
        self, argv: list[str], capture: bool = True, timeout_s: float | None = None, input_text: str | None = None
    ) -> Result:
        self.calls.append(list(argv))
        try:
            proc = subprocess.run(
                argv,
                capture_output=capture,
                text=True,
                input=input_text,
                timeout=timeout_s or self.default_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Result(124, "", f"timed out: {argv[0]}")
        except FileNotFoundError:
            return Result(127, "", f"{argv[0]} not found: install OpenSSH")
        return Result(proc.returncode, proc.stdout or "", proc.stderr or "")

    def popen(self, argv: list[str]) -> subprocess.Popen:
        self.calls.append(list(argv))
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

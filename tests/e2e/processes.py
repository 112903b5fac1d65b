"""Run the four services as separate OS processes on loopback, for end-to-end tests and benchmarks.

Each service is started the way an operator starts it: ``python -m abliterate_services.<name>``,
configured only through ``ABLITERATE_<SERVICE>_<FIELD>`` environment variables,
listening on a free ``127.0.0.1`` port, its output in a log file. A
:class:`ServiceProcess` can be killed (SIGKILL, no clean-up at all) and started
again on the same port; a :class:`Stack` holds the whole topology (extractor,
evaluators, optimizer, gateway) in start order.

PostgreSQL state goes into a private schema (:func:`pg_schema`), so a restarted
gateway resumes only this run's jobs, and everything is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LOOPBACK = "127.0.0.1"

# module -> the <SERVICE> part of its ABLITERATE_<SERVICE>_<FIELD> variables
SERVICES = {
    "abliterate_services.extractor": "extractor",
    "abliterate_services.evaluator": "evaluator",
    "abliterate_services.optimizer": "optimizer",
    "abliterate_services.gateway": "gateway",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def postgres_ok(url: str = PG_URL) -> bool:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def pg_schema(url: str = PG_URL, prefix: str = "e2e") -> Iterator[str]:
    """A fresh schema in ``url``'s database; yields a URL whose connections use it (dropped at the end)."""
    import sqlalchemy as sa

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def save_tiny_model(path: Path, arch: str = "llama", layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random model and its tokenizer, saved as a local model directory."""
    from tests.tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    make_model(arch, tok, layers=layers, hidden=hidden, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def base_env(threads: int = 1) -> dict[str, str]:
    """This environment without any ABLITERATE_/HF_ setting, offline, ``threads`` torch threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABLITERATE_", "HF_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def torch_settings(model_dir: Path, **extra) -> dict[str, str]:
    """Settings of a torch service (extractor, evaluator) on a local model, on CPU."""
    return {
        "model": str(model_dir),
        "dtype": "float32",
        "device_map": "cpu",
        "log_level": "WARNING",
        **{k: str(v) for k, v in extra.items()},
    }


class ServiceProcess:
    """One ``python -m <module>`` on a fixed loopback port; start, kill -9, start again."""

    def __init__(
        self,
        name: str,
        module: str,
        settings: dict[str, str],
        log_dir: Path,
        port: int | None = None,
        threads: int = 1,
        cwd: Path | None = None,
    ) -> None:
        assert module in SERVICES, module
        self.name = name
        self.module = module
        self.port = port or free_port()
        self.settings = dict(settings)
        self.log_dir = Path(log_dir)
        self.threads = threads
        # Working directory of the process (relative paths it is sent, e.g. export paths, land there).
        self.cwd = Path(cwd) if cwd is not None else ROOT
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = self.log_dir / f"{name}.log"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def env(self) -> dict[str, str]:
        service = SERVICES[self.module].upper()
        env = base_env(self.threads)
        settings = {**self.settings, "address": self.address}
        env.update({f"ABLITERATE_{service}_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    def start(self) -> "ServiceProcess":
        """Launch the process (no wait); its output is appended to ``log_path``."""
        assert not self.alive, f"{self.name} is already running"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = self.log_path.open("a")
        log.write(f"\n===== start #{self.starts} at {time.strftime('%H:%M:%S')} =====\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=self.cwd,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def healthy(self, timeout_s: float = 2.0) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from abliterate.rpc import make_channel

        channel = make_channel(self.address)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s).status
            return status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False
        finally:
            channel.close()

    def wait_healthy(self, timeout_s: float = 120.0) -> "ServiceProcess":
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if not self.alive:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode if self.proc else None}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not SERVING after {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def kill(self) -> None:
        """SIGKILL: no signal handler, no graceful shutdown, no clean-up (kill -9)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL when it does not exit in time; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def restart(self, timeout_s: float = 120.0) -> "ServiceProcess":
        self.kill()
        return self.start().wait_healthy(timeout_s)

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except FileNotFoundError:
            return "(no log)"


class Stack:
    """Extractor, N evaluators, optimizer and gateway as processes (started in that order)."""

    def __init__(
        self,
        model_dir: Path,
        workdir: Path,
        storage_url: str,
        n_evaluators: int = 2,
        evaluator_settings: dict | None = None,
        optimizer_settings: dict | None = None,
        gateway_settings: dict | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        logs = self.workdir / "logs"
        self.extractor = ServiceProcess("extractor", "abliterate_services.extractor", torch_settings(model_dir), logs)
        self.evaluators = [
            ServiceProcess(
                f"evaluator{i + 1}",
                "abliterate_services.evaluator",
                # Export root "/": the tests export to their own tmp folders (confinement: test_export_confinement).
                torch_settings(model_dir, **{"export_root": "/", **(evaluator_settings or {})}),
                logs,
            )
            for i in range(n_evaluators)
        ]
        self.optimizer = ServiceProcess(
            "optimizer",
            "abliterate_services.optimizer",
            {
                "storage_url": storage_url,
                "health_interval_s": "0.5",
                "busy_retry_s": "0.3",
                "grace_s": "2",
                "log_level": "INFO",
                # A killed optimizer's trials are re-enqueued 3 s after its last heartbeat.
                "heartbeat_interval_s": "1",
                "grace_period_s": "3",
                "database_check_s": "1",
                **{k: str(v) for k, v in (optimizer_settings or {}).items()},
            },
            logs,
        )
        self.gateway = ServiceProcess(
            "gateway",
            "abliterate_services.gateway",
            {
                "storage_url": storage_url,
                "extractor_address": self.extractor.address,
                "optimizer_address": self.optimizer.address,
                "evaluator_addresses": ",".join(e.address for e in self.evaluators),
                "retry_window_s": "180",
                "grace_s": "1",
                "log_level": "INFO",
                **{k: str(v) for k, v in (gateway_settings or {}).items()},
            },
            logs,
        )
        self._channels: dict[tuple[str, int], object] = {}

    @property
    def services(self) -> list[ServiceProcess]:
        return [self.extractor, *self.evaluators, self.optimizer, self.gateway]

    def start(self, timeout_s: float = 180.0) -> "Stack":
        """Start every service not running (all launched at once), then wait until each is SERVING."""
        for svc in self.services:
            if not svc.alive:
                svc.start()
        for svc in self.services:
            svc.wait_healthy(timeout_s)
        return self

    ensure_up = start

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for svc in reversed(self.services):
            svc.terminate(timeout_s=15)

    def logs(self, n_chars: int = 2500) -> str:
        return "\n".join(f"----- {s.name} -----\n{s.log_tail(n_chars)}" for s in self.services)

    def _channel(self, svc: ServiceProcess):
        """A channel to the current incarnation of ``svc`` (a fresh one after a restart)."""
        from abliterate.rpc import make_channel

        key = (svc.name, svc.starts)
        channel = self._channels.get(key)
        if channel is None:
            for old in [k for k in self._channels if k[0] == svc.name]:
                self._channels.pop(old).close()
            channel = self._channels[key] = make_channel(svc.address)
        return channel

    def gateway_stub(self):
        from abliterate.v1 import gateway_pb2_grpc

        return gateway_pb2_grpc.GatewayServiceStub(self._channel(self.gateway))

    def optimizer_stub(self):
        from abliterate.v1 import optimizer_pb2_grpc

        return optimizer_pb2_grpc.OptimizerServiceStub(self._channel(self.optimizer))

    def evaluator_stub(self, index: int = 0):
        from abliterate.v1 import evaluator_pb2_grpc

        return evaluator_pb2_grpc.EvaluatorServiceStub(self._channel(self.evaluators[index]))

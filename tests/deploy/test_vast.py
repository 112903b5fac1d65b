"""``abliterate vast``: the official vastai SDK pointed at a local fake of the Vast.ai REST
API (loopback, records every call); ssh/scp replaced by a runner that records the argument
lists it is given. Proves the seed's safety rules and the calls of the happy path."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("vastai", reason="vastai SDK missing: pip install vastai==1.9.1 (the `deploy` extra)")

from abliterate.errors import InvalidArgument  # noqa: E402
from abliterate.vast import cli, remote, rules, stack  # noqa: E402
from abliterate.vast.state import State  # noqa: E402

GB = 1_000_000_000


# ---------------------------------------------------------------------------- the fake Vast.ai API


def instance_row(instance_id: int, label: str = "", status: str = "running") -> dict:
    return {
        "id": instance_id,
        "label": label,
        "actual_status": status,
        "cur_state": status,
        "gpu_name": "H100 SXM",
        "num_gpus": 2,
        "dph_total": 5.5,
        "disk_space": 200,
        "ssh_host": "ssh5.vast.ai",
        "ssh_port": 20000 + instance_id % 1000,
        "public_ipaddr": "203.0.113.7",
        "ports": {},
        "start_date": time.time() - 3600,
        "extra_env": [],
    }


class FakeVast:
    """Records (method, path, query, body) of every request; serves canned answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict, dict | None]] = []
        self.instances: dict[int, dict] = {}
        self.offers = [
            {
                "id": 4242,
                "gpu_name": "H100 SXM",
                "num_gpus": 2,
                "gpu_ram": 81559,
                "disk_space": 500,
                "dph_total": 4.9,
                "inet_down": 900,
                "geolocation": "Norway, NO",
            },
            {
                "id": 4343,
                "gpu_name": "H100 SXM",
                "num_gpus": 2,
                "gpu_ram": 81559,
                "disk_space": 800,
                "dph_total": 5.2,
                "inet_down": 700,
                "geolocation": "Texas, US",
            },
        ]
        self.hub: dict[str, list[dict]] = {}
        self.next_id = 777
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null") if length else None
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                path = parts.path
                if path.startswith("/api/models/"):  # the Hub's model metadata
                    repo = path[len("/api/models/") :]
                    if repo not in fake.hub:
                        return self._reply(404, {"error": "not found"})
                    return self._reply(200, {"id": repo, "siblings": fake.hub[repo]})
                fake.calls.append((method, path, query, body))
                if self.headers.get("Authorization") != "Bearer test-key_123":
                    return self._reply(401, {"error": "bad key"})
                if method == "POST" and path == "/api/v0/bundles/":
                    return self._reply(200, {"offers": fake.offers})
                if method == "PUT" and path.startswith("/api/v0/asks/"):
                    new = fake.next_id
                    fake.next_id += 1
                    fake.instances[new] = instance_row(new, body.get("label") or "")
                    return self._reply(200, {"success": True, "new_contract": new})
                if method == "GET" and path == "/api/v1/instances/":
                    rows = [dict(r) for r in fake.instances.values()]
                    return self._reply(200, {"instances": rows, "next_token": None, "total_instances": len(rows)})
                if path.startswith("/api/v0/instances/"):
                    instance_id = int(path.strip("/").split("/")[-1])
                    if instance_id not in fake.instances:
                        return self._reply(404, {"error": "no such instance"})
                    if method == "GET":
                        return self._reply(200, {"instances": dict(fake.instances[instance_id])})
                    if method == "PUT":
                        fake.instances[instance_id]["actual_status"] = body.get("state")
                        return self._reply(200, {"success": True})
                    if method == "DELETE":
                        del fake.instances[instance_id]
                        return self._reply(200, {"success": True})
                return self._reply(404, {"error": f"unexpected {method} {path}"})

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

            def do_PUT(self):  # noqa: N802
                self._handle("PUT")

            def do_DELETE(self):  # noqa: N802
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def sent(self, method: str | None = None) -> list[tuple[str, str, dict, dict | None]]:
        return [c for c in self.calls if method is None or c[0] == method]

    def mutations(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _, _ in self.calls if m in ("PUT", "DELETE") or p.startswith("/api/v0/asks/")]


class FakeRunner(remote.Runner):
    """Records ssh/scp argument lists; answers the probe and nvidia-smi with canned output."""

    def __init__(self, probe: dict | None = None, probe_rc: int = 0) -> None:
        super().__init__()
        self.probe = (
            probe
            if probe is not None
            else {"stack": {"alive": True, "pid": 42}, "gateway": {"reachable": True, "jobs": []}, "exports": []}
        )
        self.probe_rc = probe_rc
        self.inputs: list[str | None] = []
        self.popened: list[list[str]] = []

    def run(self, argv, capture=True, timeout_s=None, input_text=None):
        self.calls.append(list(argv))
        self.inputs.append(input_text)
        text = " ".join(argv)
        if "abliterate.vast.probe" in text:
            return remote.Result(
                self.probe_rc,
                json.dumps(self.probe) if self.probe_rc == 0 else "",
                "" if self.probe_rc == 0 else "ssh: connect to host refused",
            )
        if "nvidia-smi" in text:
            return remote.Result(
                0, "0, NVIDIA H100 80GB HBM3, 40960, 81559, 97\n1, NVIDIA H100 80GB HBM3, 512, 81559, 0\n"
            )
        return remote.Result(0, "ok\n", "")

    def popen(self, argv):
        self.popened.append(list(argv))

        class Dummy:
            def terminate(self):
                pass

            def wait(self, timeout=None):
                return 0

            def kill(self):
                pass

        return Dummy()


@pytest.fixture
def fake():
    server = FakeVast()
    yield server
    server.close()


@pytest.fixture
def vast(fake, tmp_path, monkeypatch):
    """Run ``abliterate vast ...`` against the fake; returns (exit code, output)."""
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    state_file = tmp_path / "state.json"

    def run(*argv: str, runner: FakeRunner | None = None, answer: str | None = None) -> tuple[int, str]:
        out = io.StringIO()

        def input_fn(prompt: str) -> str:
            out.write(prompt)
            if answer is None:
                raise EOFError
            return answer

        code = cli.main(
            ["--api-key", "test-key_123", "--vast-url", fake.url, "--state", str(state_file), *argv],
            runner=runner or FakeRunner(),
            input_fn=input_fn,
            out=out,
        )
        return code, out.getvalue()

    run.state_file = state_file
    return run


def created(vast, fake, *extra: str) -> int:
    code, out = vast(
        "create",
        "--model",
        "Qwen/Qwen2.5-7B-Instruct",
        "--model-size-gb",
        "15.2",
        "--gpu",
        "H100",
        "--num-gpus",
        "2",
        "--image",
        "registry.example/abliterate-torch:0.1.0",
        *extra,
    )
    assert code == 0, out
    return max(fake.instances)


# ---------------------------------------------------------------------------- disk guard


def test_create_refuses_a_too_small_disk_and_sends_nothing(vast, fake):
    code, out = vast("create", "--model", "org/model", "--model-size-gb", "40", "--disk", "90", "--image", "img:1")
    assert code == 1 and "below the required 100 GB" in out and "--force-disk" in out
    assert fake.calls == []  # not even a search
    assert not vast.state_file.exists()


def test_disk_guard_rule():
    assert rules.required_disk_gb(40) == 100
    assert rules.disk_guard(None, 15.2) == (60.0, None)  # 50.4 rounded up
    assert rules.disk_guard(100, 40) == (100.0, None)
    disk, warning = rules.disk_guard(50, 40, force=True)
    assert disk == 50 and "forced" in warning


def test_forced_small_disk_proceeds_with_a_warning(vast, fake):
    code, out = vast(
        "create",
        "--model",
        "org/model",
        "--model-size-gb",
        "40",
        "--disk",
        "90",
        "--force-disk",
        "--gpu",
        "H100",
        "--image",
        "img:1",
    )
    assert code == 0 and "WARNING" in out and "(forced)" in out
    assert fake.sent("PUT")[0][3]["disk"] == 90


def test_model_size_from_hub_metadata(vast, fake):
    fake.hub["org/big"] = [
        {"rfilename": "model-00001-of-00002.safetensors", "size": 30 * GB},
        {"rfilename": "model-00002-of-00002.safetensors", "size": 10 * GB},
        {"rfilename": "pytorch_model.bin", "size": 40 * GB},  # duplicate format: not counted
        {"rfilename": "config.json", "size": 700},
    ]
    code, out = vast("create", "--model", "org/big", "--hf-endpoint", fake.url, "--disk", "99", "--image", "img:1")
    assert code == 1 and "40 GB" in out and "required 100 GB" in out
    assert fake.calls == []
    assert rules.hub_model_size_gb("org/big", endpoint=fake.url) == pytest.approx(40.0)
    fake.hub["org/gguf"] = [{"rfilename": "m-Q4.gguf", "size": 4 * GB}, {"rfilename": "m-Q8.gguf", "size": 8 * GB}]
    assert rules.hub_model_size_gb("org/gguf", endpoint=fake.url) == pytest.approx(8.0)
    code, out = vast("create", "--model", "org/missing", "--hf-endpoint", fake.url, "--image", "img:1")
    assert code == 1 and "not found on the Hub" in out


# ---------------------------------------------------------------------------- happy path


def test_happy_path_sends_the_expected_calls(vast, fake):
    code, out = vast("search", "--gpu", "H100", "--num-gpus", "2", "--min-disk", "120", "--max-price", "6.5")
    assert code == 0 and "4242" in out
    method, path, _, body = fake.calls[-1]
    assert (method, path) == ("POST", "/api/v0/bundles/")
    assert body["gpu_name"] == {"eq": "H100 SXM"} and body["num_gpus"] == {"eq": 2}
    assert body["disk_space"] == {"gte": 120.0} and body["dph_total"] == {"lte": 6.5}
    assert body["order"] == [["dph_total", "asc"]] and body["rentable"] == {"eq": True}

    fake.calls.clear()
    instance_id = created(vast, fake)
    (s_method, s_path, _, search), (c_method, c_path, _, create) = fake.calls
    assert (s_method, s_path) == ("POST", "/api/v0/bundles/")
    assert search["disk_space"] == {"gte": 60.0} and search["dph_total"] == {"lte": 6.0}  # H100 cap x 2 GPUs
    assert (c_method, c_path) == ("PUT", "/api/v0/asks/4242/")  # the cheapest offer
    assert create["image"] == "registry.example/abliterate-torch:0.1.0" and create["disk"] == 60.0
    assert create["env"]["ABLITERATE_MODEL"] == "Qwen/Qwen2.5-7B-Instruct"
    assert len(create["env"]["ABLITERATE_GATEWAY_TOKEN"]) >= 24 and "HF_TOKEN" not in create["env"]
    assert "abliterate serve all" in create["onstart"] and "--host 127.0.0.1" in create["onstart"]
    assert create["runtype"] == "ssh_direc ssh_proxy"  # the SDK's spelling of --ssh --direct
    assert create["label"].startswith("abliterate-")
    record = State(vast.state_file).get(instance_id)
    assert record["gateway_token"] == create["env"]["ABLITERATE_GATEWAY_TOKEN"] and record["disk_gb"] == 60.0
    assert (vast.state_file.stat().st_mode & 0o777) == 0o600

    fake.calls.clear()
    code, out = vast("list")
    assert code == 0 and str(instance_id) in out and "yes" in out
    assert fake.calls[0][:2] == ("GET", "/api/v1/instances/")

    fake.calls.clear()
    runner = FakeRunner()
    code, out = vast("destroy", "--yes", runner=runner)
    assert code == 0, out
    assert fake.mutations() == [("DELETE", f"/api/v0/instances/{instance_id}/")]
    assert any("abliterate.vast.probe" in " ".join(c) for c in runner.calls)  # job state checked first
    assert "no exported model" in out
    assert not State(vast.state_file).owns(instance_id)


# ---------------------------------------------------------------------------- confirmation and ownership


@pytest.mark.parametrize("verb", ["destroy", "stop"])
@pytest.mark.parametrize("answer", [None, "n", "", "maybe"])
def test_without_confirmation_nothing_is_sent(vast, fake, verb, answer):
    instance_id = created(vast, fake)
    fake.calls.clear()
    code, out = vast(verb, answer=answer)
    assert code == cli.EXIT_ABORTED and "nothing sent" in out and f"{verb} instance {instance_id}? [y/N]" in out
    assert fake.mutations() == []
    assert instance_id in fake.instances and fake.instances[instance_id]["actual_status"] == "running"


@pytest.mark.parametrize("verb,expected", [("destroy", "DELETE"), ("stop", "PUT")])
def test_yes_or_y_proceeds(vast, fake, verb, expected):
    instance_id = created(vast, fake)
    fake.calls.clear()
    code, out = vast(verb, answer="y")
    assert code == 0, out
    assert fake.mutations() == [(expected, f"/api/v0/instances/{instance_id}/")]
    if verb == "stop":
        assert fake.sent("PUT")[0][3] == {"state": "stopped"}


def test_never_acts_on_an_instance_it_did_not_create_unless_named(vast, fake):
    fake.instances[555] = instance_row(555, "someone-elses")
    code, out = vast("destroy", "--yes")
    assert code == 1 and "no live instance created by this CLI" in out
    code, out = vast("stop", "--yes")
    assert code == 1
    assert fake.mutations() == []
    code, out = vast("destroy", "555", "--yes")
    assert code == 0 and "was not created by this CLI" in out
    assert fake.mutations() == [("DELETE", "/api/v0/instances/555/")]


def test_several_of_ours_must_be_named(vast, fake):
    created(vast, fake)
    created(vast, fake)
    code, out = vast("destroy", "--yes")
    assert code == 2 and "name one" in out
    assert fake.mutations() == [("PUT", "/api/v0/asks/4242/")] * 2


# ---------------------------------------------------------------------------- "running" = job process state


def _probe(phase: str, alive: bool = True, exports: list[str] = ()) -> dict:
    return {
        "stack": {"alive": alive, "pid": 42},
        "gateway": {
            "reachable": alive,
            "jobs": [
                {
                    "id": "a" * 32,
                    "name": "qwen-job",
                    "phase": phase,
                    "trials_complete": 40,
                    "trials_target": 200,
                    "model": "m",
                    "auto_selected_trial": None,
                }
            ],
        },
        "exports": [{"name": n, "bytes": 1} for n in exports],
    }


def test_warnings_before_stop_come_from_the_job_state(vast, fake):
    created(vast, fake)
    code, out = vast("stop", runner=FakeRunner(_probe("OPTIMIZING")), answer="n")
    assert "job qwen-job is running (OPTIMIZING, 40/200 trials)" in out and code == cli.EXIT_ABORTED
    code, out = vast("stop", runner=FakeRunner(_probe("SUCCEEDED")), answer="n")
    assert "qwen-job finished but has not exported its model" in out and "is running" not in out
    code, out = vast("stop", runner=FakeRunner(_probe("SUCCEEDED", exports=["qwen-job"])), answer="n")
    assert "WARNING" not in out
    # The phase says OPTIMIZING but no process runs it (the instance is up, the job is not): not running.
    code, out = vast("status", runner=FakeRunner(_probe("OPTIMIZING", alive=False)))
    assert "running: no" in out and "stack process: not running" in out
    code, out = vast("status", runner=FakeRunner(_probe("EXTRACTING")))
    assert "running: yes" in out
    code, out = vast("stop", runner=FakeRunner(probe_rc=255), answer="n")
    assert "could not read the job state" in out
    assert fake.mutations() == [("PUT", "/api/v0/asks/4242/")]


def test_probe_reads_processes_and_exports(tmp_path):
    from abliterate.vast import probe

    root = tmp_path / "abliterate"
    (root / "exports" / "done").mkdir(parents=True)
    (root / "exports" / "done" / "config.json").write_text("{}")
    (root / "exports" / "done" / "model.safetensors").write_bytes(b"x" * 10)
    (root / "exports" / "partial").mkdir()
    (root / "exports" / "partial" / "config.json").write_text("{}")
    (root / "stack.pid").write_text("999999999")
    report = probe.probe(root, "127.0.0.1:1", None)
    assert report["exports"] == [{"name": "done", "bytes": 12}]
    assert report["stack"] == {"alive": False, "pid": 999999999}
    assert report["gateway"]["reachable"] is False


# ---------------------------------------------------------------------------- ssh/scp commands


def test_ssh_commands(vast, fake, tmp_path):
    instance_id = created(vast, fake)
    port = 20000 + instance_id % 1000
    runner = FakeRunner()
    assert vast("setup", runner=runner)[0] == 0
    env_call, setup_call = runner.calls
    assert env_call[: len(remote.SSH_OPTIONS) + 1] == ["ssh", *remote.SSH_OPTIONS]
    assert env_call[env_call.index("-p") + 1] == str(port)
    assert "root@ssh5.vast.ai" in env_call and env_call[-1].startswith("timeout 120 bash -lc ")
    assert "ABLITERATE_GATEWAY_TOKEN" in runner.inputs[0] and "Qwen/Qwen2.5-7B-Instruct" in runner.inputs[0]
    assert runner.inputs[1] == stack.START_STACK and "start-stack.sh" in setup_call[-1]

    runner = FakeRunner()
    assert vast("start", "--n-trials", "50", "--name", "qwen-job", runner=runner)[0] == 0
    assert 'abliterate submit "$ABLITERATE_MODEL" --gateway 127.0.0.1:50050' in runner.calls[0][-1]
    assert "--n-trials 50 --name qwen-job" in runner.calls[0][-1]

    runner = FakeRunner()
    assert vast("logs", "-n", "30", runner=runner)[0] == 0
    assert "tail -n 30 /workspace/abliterate/logs/stack.log" in runner.calls[0][-1]

    runner = FakeRunner()
    assert vast("export", "qwen-job", "--trial", "7", runner=runner)[0] == 0
    assert "abliterate export qwen-job /workspace/abliterate/exports/qwen-job" in runner.calls[0][-1]
    assert "--trial 7" in runner.calls[0][-1]

    runner = FakeRunner()
    dest = tmp_path / "results"
    assert vast("fetch", "--dest", str(dest), runner=runner)[0] == 0
    scp = runner.calls[0]
    assert scp[0] == "scp" and "-r" in scp and scp[scp.index("-P") + 1] == str(port) and scp[-1] == str(dest)
    assert "root@ssh5.vast.ai:/workspace/abliterate/exports" in scp
    assert "root@ssh5.vast.ai:/workspace/abliterate/data/optuna.db" in scp
    assert fake.mutations() == [("PUT", "/api/v0/asks/4242/")]  # none of these touched the instance's state


def test_ssh_address_formats_and_validation():
    assert remote.parse_ssh_url("ssh://root@1.2.3.4:2222") == remote.Target("1.2.3.4", 2222)
    assert remote.parse_ssh_url("-p 2222 root@ssh4.vast.ai") == remote.Target("ssh4.vast.ai", 2222)
    assert remote.parse_ssh_url("ssh -p 41 user@host.example") == remote.Target("host.example", 41, "user")
    assert remote.parse_ssh_url("root@h:22") == remote.Target("h", 22)
    with pytest.raises(InvalidArgument):
        remote.parse_ssh_url("root@h;rm -rf /:22")
    direct = instance_row(9)
    direct["ports"] = {"22/tcp": [{"HostPort": "40022"}]}
    assert remote.target_of(direct) == remote.Target("203.0.113.7", 40022)
    for bad in ("org/model;reboot", "../etc", "/abs/path", "a$(x)", "x`y`", "a" * 501):
        with pytest.raises(InvalidArgument):
            rules.check_model_name(bad)
    with pytest.raises(InvalidArgument):
        rules.check_api_key("abc;def")
    with pytest.raises(InvalidArgument):
        rules.check_instance_id("0")


def test_scripts_are_valid_bash(tmp_path):
    for name, text in (("onstart", stack.onstart_script()), ("start", stack.START_STACK)):
        path = tmp_path / f"{name}.sh"
        path.write_text(text)
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)


def test_start_stack_script_runs_and_is_idempotent(tmp_path):
    """The start script itself, against a fake `abliterate` on PATH and a temporary root."""
    root = tmp_path / "root"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_bin = bindir / "abliterate"
    fake_bin.write_text('#!/bin/sh\necho "abliterate $*"\nexec sleep 30\n')
    fake_bin.chmod(0o755)
    script = stack.START_STACK.replace(stack.REMOTE_ROOT, str(root))
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "ABLITERATE_MODEL": "org/m", "ABLITERATE_GATEWAY_TOKEN": "tok"}
    first = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert first.returncode == 0 and "stack started" in first.stdout, first.stderr
    pid = int((root / "stack.pid").read_text())
    try:
        second = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)
        assert "already running" in second.stdout
        deadline = time.monotonic() + 10
        log = root / "logs" / "stack.log"
        while "serve all" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        assert "serve all --model org/m" in text and "--host 127.0.0.1" in text and "--auth-token tok" in text
    finally:
        import os
        import signal

        os.kill(pid, signal.SIGTERM)


# ---------------------------------------------------------------------------- watch through the tunnel


def test_watch_shows_job_progress_through_the_tunnel(vast, fake):
    """The tunnel is ssh -L to the instance's 127.0.0.1:50050; here its local end is a fake gateway."""
    import grpc

    from abliterate.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    seen_tokens = []

    class Gateway(gateway_pb2_grpc.GatewayServiceServicer):
        def ListJobs(self, request, context):  # noqa: N802
            seen_tokens.append(dict(context.invocation_metadata()).get("authorization"))
            spec = gateway_pb2.JobSpec(name="qwen-job", n_trials=200, model=common_pb2.ModelSpec(source="m"))
            job = gateway_pb2.Job(
                id="b" * 32, name="qwen-job", phase=gateway_pb2.JOB_PHASE_OPTIMIZING, n_trials_complete=12, spec=spec
            )
            return gateway_pb2.ListJobsResponse(jobs=[job], total=1)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(Gateway(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        instance_id = created(vast, fake)
        token = State(vast.state_file).get(instance_id)["gateway_token"]
        runner = FakeRunner()
        code, out = vast("watch", "--once", "--local-port", str(port), runner=runner)
        assert code == 0, out
    finally:
        server.stop(None)
    tunnel = runner.popened[0]
    assert tunnel[0] == "ssh" and "-N" in tunnel and f"127.0.0.1:{port}:127.0.0.1:50050" in tunnel
    assert any("nvidia-smi" in " ".join(c) for c in runner.calls)
    assert "job qwen-job" in out and "OPTIMIZING" in out and "12/200 trials" in out
    assert "gpu0 NVIDIA H100 80GB HBM3" in out and "40.0/79.6 GiB" in out
    assert seen_tokens == [f"Bearer {token}"]
    assert ("GET", f"/api/v0/instances/{instance_id}/") in [(m, p) for m, p, _, _ in fake.calls]


def test_missing_api_key_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    out = io.StringIO()
    code = cli.main(["--state", str(tmp_path / "s.json"), "--vast-url", "http://127.0.0.1:9", "list"], out=out)
    assert code == 1 and "VAST_API_KEY" in out.getvalue()


def test_tiers_and_register():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(["vast", "tiers"])
    assert args.command == "vast" and args.vast_command == "tiers"
    out = io.StringIO()
    assert cli.run(args, out=out) == 0 and "H200" in out.getvalue() and "2 x model size + 20 GB" in out.getvalue()
    assert Path(cli.__file__).exists()

"""``abliterate vast ...`` (also ``abliterate-vast``): run the stack on rented Vast.ai GPUs,
over the official ``vastai`` SDK and the system ``ssh``/``scp``.

    search   offers by GPU type, count, minimum disk and price cap
    create   an instance with our image and onstart script (disk guard first)
    list     instances (ours marked)
    setup    (re)install and start the stack over SSH (idempotent)
    start    submit the job to the instance's gateway
    status   is the job running? (judged by the job's processes and phase, not uptime)
    watch    live table: instance state, job progress through an SSH tunnel, GPU memory
    logs     the stack's log
    export   export a job's model on the instance
    fetch    copy exported models and the study (SQLite) back
    stop     stop an instance (confirmation or --yes; warns if the model is not exported)
    destroy  destroy an instance (same rules)
    tiers    GPU tiers and the sizing rule

Rules enforced here: a disk guard before create (disk >= 2 x model size + 20 GB; model size
from --model-size-gb or the Hub's metadata; --force-disk to override); stop/destroy only
after a confirmation prompt or --yes; without an explicit id, only instances this CLI
created (recorded in a local state file) are ever acted on.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from abliterate.errors import AbliterateError, FailedPrecondition, InvalidArgument, NotFound
from abliterate.vast import remote, rules, stack
from abliterate.vast.state import State

DEFAULT_URL = "https://console.vast.ai"
EXIT_ABORTED = 1


# ---------------------------------------------------------------------------- context


class Context:
    """What the commands need: the SDK, the SSH runner, the state file, a prompt, an output stream."""

    def __init__(
        self,
        args: argparse.Namespace,
        runner: remote.Runner | None = None,
        input_fn: Callable[[str], str] | None = None,
        out=None,
        sdk: Any = None,
    ) -> None:
        self.args = args
        self.runner = runner or remote.Runner()
        self.input_fn = input_fn or input
        self.out = out or sys.stdout
        self._sdk = sdk
        self.state = State(getattr(args, "state", None))

    @property
    def sdk(self):
        if self._sdk is None:
            from vastai import VastAI

            key = rules.check_api_key(self.args.api_key or os.environ.get("VAST_API_KEY"))
            url = self.args.vast_url or os.environ.get("VAST_URL") or DEFAULT_URL
            self._sdk = VastAI(api_key=key, server_url=url, retry=2, raw=True, quiet=True)
        return self._sdk

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        self.say(f"WARNING: {text}")

    def confirm(self, question: str) -> bool:
        if getattr(self.args, "yes", False):
            return True
        try:
            answer = self.input_fn(f"{question} [y/N] ")
        except EOFError:
            return False
        return answer.strip().lower() in ("y", "yes")

    # -- instances

    def instances(self) -> list[dict]:
        return list(self.sdk.show_instances() or [])

    def resolve(self, named: str | None) -> dict:
        """The instance to act on: the one named, else the single one this CLI created."""
        rows = self.instances()
        if named is not None:
            instance_id = rules.check_instance_id(named)
            row = next((r for r in rows if int(r.get("id", -1)) == instance_id), None)
            if row is None:
                raise NotFound(f"instance {instance_id} not found in your Vast.ai account")
            if not self.state.owns(instance_id):
                self.say(f"note: instance {instance_id} was not created by this CLI; acting on it because you named it")
            return row
        ours = [r for r in rows if self.state.owns(int(r.get("id", -1)))]
        if not ours:
            raise FailedPrecondition(
                f"no live instance created by this CLI (state file {self.state.path}); name an instance id explicitly"
            )
        if len(ours) > 1:
            raise InvalidArgument(
                "several instances created by this CLI: " + ", ".join(str(r["id"]) for r in ours) + "; name one"
            )
        return ours[0]

    def target(self, row: dict) -> remote.Target:
        return remote.target_of(row, getattr(self.args, "ssh_key", None))

    def ssh(
        self,
        row: dict,
        command: str,
        capture: bool = True,
        timeout_s: int = remote.DEFAULT_TIMEOUT_S,
        input_text: str | None = None,
        tty: bool = False,
    ) -> remote.Result:
        argv = remote.ssh_command(self.target(row), command, timeout_s=timeout_s, tty=tty)
        return self.runner.run(
            argv, capture=capture, timeout_s=timeout_s + 30 if timeout_s else None, input_text=input_text
        )


# ---------------------------------------------------------------------------- offers and create


def offer_query(gpu: str, num_gpus: int, min_disk_gb: float, max_price: float, min_inet_down: float) -> dict:
    """The SDK's pre-parsed search filter (Vast's field names)."""
    name = (
        rules.tier(gpu).gpu_name if any(t.name.lower() == gpu.lower() for t in rules.TIERS) else gpu.replace("_", " ")
    )
    query = {
        "gpu_name": {"eq": name},
        "num_gpus": {"eq": int(num_gpus)},
        "disk_space": {"gte": float(min_disk_gb)},
        "dph_total": {"lte": float(max_price)},
        "rentable": {"eq": True},
    }
    if min_inet_down:
        query["inet_down"] = {"gte": float(min_inet_down)}
    return query


def default_price(gpu: str, num_gpus: int) -> float:
    try:
        return rules.tier(gpu).max_price_per_gpu * num_gpus
    except InvalidArgument:
        raise InvalidArgument(f"no default price cap for GPU {gpu!r}: give --max-price") from None


def search_offers(
    ctx: Context, gpu: str, num_gpus: int, min_disk: float, max_price: float | None, limit: int, min_inet_down: float
) -> list[dict]:
    cap = max_price if max_price is not None else default_price(gpu, num_gpus)
    query = offer_query(gpu, num_gpus, min_disk, cap, min_inet_down)
    return list(ctx.sdk.search_offers(query=query, order="dph_total", limit=limit, storage=min_disk) or [])


def _offer_row(o: dict) -> str:
    return (
        f"{o.get('id', '?'):>10}  {o.get('num_gpus', '?')}x {o.get('gpu_name', '?'):<14} "
        f"{(o.get('gpu_ram') or 0) / 1024:>5.0f} GB  disk {o.get('disk_space', 0):>6.0f} GB  "
        f"${o.get('dph_total', 0):.3f}/h  net {o.get('inet_down', 0):.0f} Mb/s  {o.get('geolocation', '')}"
    )


def cmd_search(ctx: Context) -> int:
    a = ctx.args
    offers = search_offers(ctx, a.gpu, a.num_gpus, a.min_disk, a.max_price, a.limit, a.min_inet_down)
    if not offers:
        ctx.say("no offers match")
        return 1
    ctx.say(f"{'offer':>10}  gpus")
    for o in offers:
        ctx.say(_offer_row(o))
    return 0


def model_size_gb(ctx: Context) -> float:
    a = ctx.args
    if a.model_size_gb is not None:
        if a.model_size_gb <= 0:
            raise InvalidArgument("--model-size-gb must be positive")
        return float(a.model_size_gb)
    size = rules.hub_model_size_gb(a.model, endpoint=a.hf_endpoint, token=os.environ.get("HF_TOKEN"))
    ctx.say(f"model {a.model}: {size:.1f} GB of weights (Hub metadata)")
    return size


def cmd_create(ctx: Context) -> int:
    a = ctx.args
    model = rules.check_model_name(a.model)
    size = model_size_gb(ctx)
    disk, warning = rules.disk_guard(a.disk, size, force=a.force_disk)  # raises before any Vast call
    if warning:
        ctx.warn(warning)
    image = a.image or os.environ.get("ABLITERATE_VAST_IMAGE")
    if not image:
        raise InvalidArgument(
            "no image: give --image REGISTRY/abliterate-torch:TAG (or ABLITERATE_VAST_IMAGE); "
            "build it from deploy/Dockerfile.torch and push it"
        )
    try:
        t = rules.tier(a.gpu)
        need = rules.vram_needed_gb(size, a.load_in_4bit)
        if t.vram_gb * a.num_gpus < need:
            ctx.warn(
                f"{a.num_gpus}x {t.name} has {t.vram_gb * a.num_gpus} GB VRAM; this model needs about "
                f"{need:.0f} GB (see docs/deploy.md sizing)"
            )
    except InvalidArgument:
        pass
    if a.offer is not None:
        offer_id = rules.check_instance_id(a.offer)
    else:
        offers = search_offers(ctx, a.gpu, a.num_gpus, disk, a.max_price, 5, a.min_inet_down)
        if not offers:
            raise NotFound("no offer matches (GPU, count, disk, price cap); try `abliterate vast search`")
        offer_id = int(offers[0]["id"])
        ctx.say("cheapest offer: " + _offer_row(offers[0]))
    token = secrets.token_urlsafe(24)
    label = f"abliterate-{secrets.token_hex(4)}"
    env = {"ABLITERATE_MODEL": model, "ABLITERATE_GATEWAY_TOKEN": token, "ABLITERATE_DEVICE_MAP": a.device_map}
    if a.pass_hf_token:
        if not os.environ.get("HF_TOKEN"):
            raise InvalidArgument("--pass-hf-token given but HF_TOKEN is not set")
        env["HF_TOKEN"] = os.environ["HF_TOKEN"]
    resp = ctx.sdk.create_instance(
        offer_id,
        image=image,
        disk=disk,
        env=env,
        label=label,
        onstart_cmd=stack.onstart_script(start=True),
        ssh=True,
        direct=True,
    )
    if not isinstance(resp, dict) or not resp.get("success", True) or "new_contract" not in resp:
        raise FailedPrecondition(f"Vast.ai refused the create: {resp}")
    instance_id = int(resp["new_contract"])
    ctx.state.add(
        instance_id,
        label=label,
        model=model,
        model_size_gb=size,
        disk_gb=disk,
        image=image,
        offer=offer_id,
        gateway_token=token,
    )
    ctx.say(f"created instance {instance_id} ({label}), disk {disk:g} GB, image {image}")
    ctx.say(
        f"next: abliterate vast list; abliterate vast status {instance_id}; "
        f"abliterate vast start {instance_id} --n-trials 200; abliterate vast watch {instance_id}"
    )
    return 0


# ---------------------------------------------------------------------------- list / status


def cmd_list(ctx: Context) -> int:
    rows = ctx.instances()
    if not rows:
        ctx.say("no instances")
        return 0
    ctx.say(f"{'id':>10}  ours  {'status':<10} {'label':<22} gpus                 $/h     disk   ssh")
    for r in rows:
        ours = "yes" if ctx.state.owns(int(r["id"])) else "-"
        ssh = f"{r.get('ssh_host', '')}:{r.get('ssh_port', '')}" if r.get("ssh_host") else ""
        ctx.say(
            f"{r['id']:>10}  {ours:<4}  {str(r.get('actual_status') or r.get('cur_state') or '?'):<10} "
            f"{str(r.get('label') or ''):<22} {r.get('num_gpus', '?')}x {str(r.get('gpu_name', '?')):<14} "
            f"{r.get('dph_total', 0):>6.3f}  {r.get('disk_space', 0):>5.0f}  {ssh}"
        )
    stale = [k for k in ctx.state.instances if k not in {str(r["id"]) for r in rows}]
    if stale:
        ctx.say(f"(state file lists instances no longer in your account: {', '.join(stale)})")
    return 0


def probe(ctx: Context, row: dict) -> tuple[dict | None, str]:
    """The job state as the instance's processes report it, or ``(None, why)``."""
    if str(row.get("actual_status") or "") not in ("running", ""):
        return None, f"instance is {row.get('actual_status')}"
    try:
        result = ctx.ssh(row, stack.probe_command(), timeout_s=60)
    except InvalidArgument as exc:
        return None, str(exc)
    if result.returncode != 0:
        return None, (result.stderr or result.stdout).strip()[-300:] or f"ssh exited {result.returncode}"
    try:
        return json.loads(result.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, f"unreadable probe output: {result.stdout[-200:]!r}"


def judge(report: dict | None) -> dict:
    """``running`` (bool), ``jobs`` (running ones), ``unexported`` (finished without an export)."""
    if report is None:
        return {"running": None, "jobs": [], "unexported": [], "exports": []}
    jobs = report.get("gateway", {}).get("jobs", [])
    exported = {e["name"] for e in report.get("exports", [])}
    running = [j for j in jobs if j["phase"] in ("QUEUED", "EXTRACTING", "OPTIMIZING")]
    if not report.get("stack", {}).get("alive"):
        running = []  # a phase says OPTIMIZING but no process runs it: not running (it will resume on start)
    unexported = [
        j for j in jobs if j["phase"] == "SUCCEEDED" and j["name"] not in exported and j["id"] not in exported
    ]
    return {
        "running": bool(running),
        "jobs": running,
        "unexported": unexported,
        "exports": sorted(exported),
        "stack_alive": report.get("stack", {}).get("alive", False),
        "all_jobs": jobs,
    }


def cmd_status(ctx: Context) -> int:
    row = ctx.resolve(ctx.args.instance)
    report, why = probe(ctx, row)
    verdict = judge(report)
    ctx.say(f"instance {row['id']}: {row.get('actual_status')}")
    if report is None:
        ctx.say(f"job state unknown: {why}")
        return 1
    ctx.say(f"stack process: {'alive' if verdict['stack_alive'] else 'not running'}")
    for j in verdict["all_jobs"]:
        ctx.say(f"job {j['name']}: {j['phase']} {j['trials_complete']}/{j['trials_target']} trials")
    ctx.say("running: " + ("yes" if verdict["running"] else "no"))
    ctx.say("exports: " + (", ".join(verdict["exports"]) or "none"))
    return 0


# ---------------------------------------------------------------------------- stack over SSH


def cmd_setup(ctx: Context) -> int:
    row = ctx.resolve(ctx.args.instance)
    record = ctx.state.get(int(row["id"]))
    if record:
        env = "".join(
            f"export {k}={shlex.quote(str(v))}\n"
            for k, v in (("ABLITERATE_MODEL", record["model"]), ("ABLITERATE_GATEWAY_TOKEN", record["gateway_token"]))
        )
        ctx.ssh(
            row,
            f"mkdir -p {stack.REMOTE_ROOT} && [ -s {stack.ENV_FILE} ] || (umask 077; cat > {stack.ENV_FILE})",
            input_text=env,
        )
    result = ctx.ssh(row, stack.setup_command(), input_text=stack.START_STACK)
    ctx.say((result.stdout + result.stderr).strip())
    return 0 if result.returncode == 0 else 1


def cmd_start(ctx: Context) -> int:
    row = ctx.resolve(ctx.args.instance)
    extra = list(ctx.args.submit_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    result = ctx.ssh(row, stack.submit_command(ctx.args.n_trials, ctx.args.name, extra), capture=False, timeout_s=300)
    return result.returncode


def cmd_export(ctx: Context) -> int:
    row = ctx.resolve(ctx.args.instance)
    result = ctx.ssh(row, stack.export_command(ctx.args.job, ctx.args.trial), capture=False, timeout_s=3600)
    return result.returncode


def cmd_logs(ctx: Context) -> int:
    row = ctx.resolve(ctx.args.instance)
    cmd = stack.logs_command(ctx.args.which, ctx.args.lines, ctx.args.follow)
    result = ctx.ssh(row, cmd, capture=False, timeout_s=0 if ctx.args.follow else 60, tty=ctx.args.follow)
    return result.returncode


def cmd_fetch(ctx: Context) -> int:
    row = ctx.resolve(ctx.args.instance)
    dest = os.path.abspath(ctx.args.dest)
    os.makedirs(dest, exist_ok=True)
    argv = remote.scp_from_command(ctx.target(row), stack.FETCH_PATHS, dest)
    result = ctx.runner.run(argv, capture=False, timeout_s=6 * 3600)
    if result.returncode == 0:
        ctx.say(f"copied exports and the study (optuna.db, gateway.db) to {dest}")
    return result.returncode


# ---------------------------------------------------------------------------- watch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def gateway_jobs(address: str, token: str | None) -> tuple[list[dict], str]:
    from abliterate.vast.probe import gateway_jobs as fetch

    result = fetch(address, token, timeout_s=5.0)
    return result["jobs"], result.get("error", "")


def watch_lines(row: dict, jobs: list[dict], jobs_error: str, gpus: list[dict]) -> list[str]:
    lines = [
        f"instance {row.get('id')}  {row.get('actual_status')}  {row.get('num_gpus', '?')}x "
        f"{row.get('gpu_name', '?')}  ${row.get('dph_total', 0):.3f}/h"
    ]
    if jobs_error:
        lines.append(f"gateway: unreachable ({jobs_error})")
    for j in jobs:
        lines.append(
            f"job {j['name']:<30} {j['phase']:<12} {j['trials_complete']}/{j['trials_target']} trials"
            + (f"  selected #{j['auto_selected_trial']}" if j.get("auto_selected_trial") is not None else "")
        )
    if not jobs and not jobs_error:
        lines.append("no jobs yet (abliterate vast start)")
    for g in gpus:
        lines.append(
            f"gpu{g['index']} {g['name']:<22} {g['used_mib'] / 1024:6.1f}/{g['total_mib'] / 1024:.1f} GiB  "
            f"util {g['util']}%"
        )
    return lines


def cmd_watch(ctx: Context) -> int:
    a = ctx.args
    row = ctx.resolve(a.instance)
    instance_id = int(row["id"])
    token = a.token or ctx.state.get(instance_id).get("gateway_token")
    port = a.local_port or _free_port()
    tunnel = ctx.runner.popen(remote.tunnel_command(ctx.target(row), port, stack.GATEWAY_PORT))
    try:
        if not _wait_port(port, a.tunnel_timeout):
            ctx.warn(f"SSH tunnel to the gateway did not open on 127.0.0.1:{port}")
        while True:
            fresh = ctx.sdk.show_instance(instance_id) or row
            jobs, err = gateway_jobs(f"127.0.0.1:{port}", token)
            gpu = ctx.ssh(fresh, stack.GPU_QUERY, timeout_s=30)
            gpus = stack.parse_gpus(gpu.stdout) if gpu.returncode == 0 else []
            ctx.say(f"--- {time.strftime('%H:%M:%S')}")
            for line in watch_lines(fresh, jobs, err, gpus):
                ctx.say(line)
            if a.once:
                return 0
            time.sleep(a.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        tunnel.terminate()
        try:
            tunnel.wait(timeout=5)
        except Exception:  # noqa: BLE001
            tunnel.kill()


# ---------------------------------------------------------------------------- stop / destroy


def _guarded(ctx: Context, verb: str, act: Callable[[int], Any]) -> int:
    row = ctx.resolve(ctx.args.instance)
    instance_id = int(row["id"])
    report, why = probe(ctx, row)
    verdict = judge(report)
    if report is None:
        ctx.warn(f"could not read the job state ({why}): assume a job may be running and its model not exported")
    else:
        for j in verdict["jobs"]:
            ctx.warn(f"job {j['name']} is running ({j['phase']}, {j['trials_complete']}/{j['trials_target']} trials)")
        for j in verdict["unexported"]:
            ctx.warn(
                f"job {j['name']} finished but has not exported its model "
                f"(abliterate vast export {instance_id} {j['name']}; then fetch)"
            )
        if not verdict["exports"]:
            ctx.warn("no exported model on this instance")
    if verb == "destroy":
        ctx.warn("destroy deletes the instance and its disk: everything not fetched is lost")
    if not ctx.confirm(f"{verb} instance {instance_id}?"):
        ctx.say(f"not confirmed: nothing sent ({verb} needs 'y' or --yes)")
        return EXIT_ABORTED
    act(instance_id)
    ctx.say(f"{verb} sent for instance {instance_id}")
    return 0


def cmd_stop(ctx: Context) -> int:
    return _guarded(ctx, "stop", lambda i: ctx.sdk.stop_instance(i))


def cmd_destroy(ctx: Context) -> int:
    def act(instance_id: int) -> None:
        ctx.sdk.destroy_instance(instance_id)
        ctx.state.remove(instance_id)

    return _guarded(ctx, "destroy", act)


def cmd_tiers(ctx: Context) -> int:
    ctx.say(f"{'tier':<11} {'gpu_name':<11} {'VRAM':>5}  {'$/h/GPU cap':>11}  fits")
    for t in rules.TIERS:
        ctx.say(f"{t.name:<11} {t.gpu_name:<11} {t.vram_gb:>4}G  {t.max_price_per_gpu:>11.2f}  {t.models}")
    ctx.say(f"disk: at least 2 x model size + {rules.DISK_HEADROOM_GB:g} GB (download + export + headroom)")
    return 0


COMMANDS: dict[str, Callable[[Context], int]] = {
    "search": cmd_search,
    "create": cmd_create,
    "list": cmd_list,
    "status": cmd_status,
    "setup": cmd_setup,
    "start": cmd_start,
    "watch": cmd_watch,
    "logs": cmd_logs,
    "export": cmd_export,
    "fetch": cmd_fetch,
    "stop": cmd_stop,
    "destroy": cmd_destroy,
    "tiers": cmd_tiers,
}


# ---------------------------------------------------------------------------- parser


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--api-key", default=None, help="Vast.ai API key (default $VAST_API_KEY)")
    p.add_argument("--vast-url", default=None, help=f"Vast.ai API server (default $VAST_URL or {DEFAULT_URL})")
    p.add_argument(
        "--state",
        default=None,
        help="state file of the instances this CLI created "
        "(default $ABLITERATE_VAST_STATE or ~/.config/abliterate/vast-instances.json)",
    )
    p.add_argument("--ssh-key", default=None, help="SSH private key (default: ssh's own choice)")
    sub = p.add_subparsers(dest="vast_command", required=True, metavar="COMMAND")

    def instance_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("instance", nargs="?", help="instance id (default: the one this CLI created)")

    def offer_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--gpu", default="RTX_4090", help="tier (see `tiers`) or Vast gpu_name, e.g. H100_SXM")
        q.add_argument("--num-gpus", type=int, default=1, choices=range(1, 9), metavar="N")
        q.add_argument("--max-price", type=float, help="price cap, $/hour for the whole offer (default: tier cap x N)")
        q.add_argument("--min-inet-down", type=float, default=100.0, help="minimum download Mb/s (0 = any)")

    q = sub.add_parser("search", help="search offers")
    offer_args(q)
    q.add_argument("--min-disk", type=float, default=60.0, help="minimum disk, GB")
    q.add_argument("--limit", type=int, default=10)

    q = sub.add_parser("create", help="create an instance (disk guard first)")
    q.add_argument("--model", required=True, help="HF model id the stack loads")
    q.add_argument("--model-size-gb", type=float, help="weights size, GB (default: from the Hub's metadata)")
    q.add_argument("--hf-endpoint", help="Hub endpoint (default $HF_ENDPOINT or https://huggingface.co)")
    q.add_argument("--disk", type=float, help="disk GB (default: 2 x model + 20, rounded up)")
    q.add_argument("--force-disk", action="store_true", help="allow a disk below the guard")
    q.add_argument("--offer", help="offer id (default: the cheapest match)")
    q.add_argument("--image", help="image (default $ABLITERATE_VAST_IMAGE): our torch image, pushed to a registry")
    q.add_argument("--device-map", default="auto")
    q.add_argument("--load-in-4bit", action="store_true", help="(sizing only) the model will be loaded in 4-bit")
    q.add_argument("--pass-hf-token", action="store_true", help="give the instance $HF_TOKEN (gated models)")
    offer_args(q)

    sub.add_parser("list", help="list instances (ours marked)")
    for name, text in (
        ("status", "is the job running (process state) and exported?"),
        ("setup", "install/start the stack over SSH (idempotent)"),
    ):
        instance_arg(sub.add_parser(name, help=text))

    q = sub.add_parser("start", help="submit the job to the instance's gateway")
    instance_arg(q)
    q.add_argument("--n-trials", type=int)
    q.add_argument("--name")
    q.add_argument("submit_args", nargs=argparse.REMAINDER, help="-- then more `abliterate submit` flags")

    q = sub.add_parser("watch", help="live progress through an SSH tunnel to the gateway")
    instance_arg(q)
    q.add_argument("--interval", type=float, default=10.0)
    q.add_argument("--once", action="store_true", help="print one snapshot and exit")
    q.add_argument("--local-port", type=int, help="local end of the tunnel (default: a free port)")
    q.add_argument("--tunnel-timeout", type=float, default=20.0)
    q.add_argument("--token", help="gateway token (default: the one recorded at create)")

    q = sub.add_parser("logs", help="the stack's log")
    instance_arg(q)
    q.add_argument("--which", choices=sorted(stack.LOGS), default="stack")
    q.add_argument("--lines", "-n", type=int, default=200)
    q.add_argument("--follow", "-f", action="store_true")

    q = sub.add_parser("export", help="export a job's model on the instance (to exports/JOB)")
    q.add_argument("job")
    instance_arg(q)
    q.add_argument("--trial", type=int)

    q = sub.add_parser("fetch", help="copy exports and the study back")
    instance_arg(q)
    q.add_argument("--dest", default="./vast-results")

    for name, text in (("stop", "stop an instance"), ("destroy", "destroy an instance and its disk")):
        q = sub.add_parser(name, help=text + " (asks first)")
        instance_arg(q)
        q.add_argument("--yes", "-y", action="store_true", help="do not ask")

    sub.add_parser("tiers", help="GPU tiers and sizing")
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``vast`` to a parent CLI's subparsers; dispatch with :func:`run`."""
    p = subparsers.add_parser(
        "vast", help="rent Vast.ai GPUs: create, start, watch, fetch, destroy", description=__doc__.split("\n\n")[0]
    )
    return _configure(p)


def build_parser() -> argparse.ArgumentParser:
    return _configure(argparse.ArgumentParser(prog="abliterate vast", description=__doc__.split("\n\n")[0]))


def run(args: argparse.Namespace, console: Any = None, **kw) -> int:
    """Run a parsed ``vast`` command. Refusals and API/network failures raise AbliterateError
    (the caller prints them: :func:`main` here, or ``abliterate.cli.main``)."""
    try:
        return COMMANDS[args.vast_command](Context(args, **kw))
    except AbliterateError:
        raise
    except (RuntimeError, OSError) as exc:  # the SDK's "no API key", HTTP and connection errors
        raise FailedPrecondition(f"Vast.ai: {exc}") from exc


def main(argv: Sequence[str] | None = None, **kw) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, **kw)
    except AbliterateError as exc:
        print(f"error: {exc}", file=kw.get("out") or sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the torch services share: their settings, the device lock, the model
slot, ModelInfo, and "start the server, load the model, flip health".

The server starts first (health NOT_SERVING, RPCs answer UNAVAILABLE "model is
still loading"), the model loads in a background thread, and health turns
SERVING once every servicer has its model. The main thread waits for
SIGTERM/SIGINT the whole time, so a signal during loading also stops cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from abliterate.caps import DEFAULT_MAX_PROMPT_TOKENS
from abliterate.errors import AbliterateError, FailedPrecondition, InvalidArgument, Unavailable
from abliterate.memory import DEFAULT_MALLOC_ARENAS, limit_malloc_arenas
from abliterate.rpc import build_server, configure_logging, serve_until_signal
from abliterate.rpc.convert import model_spec_from_pb, model_spec_to_pb
from abliterate.rpc.limits import MIB
from abliterate.rpc.metrics import Metrics, serve_metrics
from abliterate.rpc.streams import DEFAULT_MAX_STREAMS
from abliterate.specs import ModelSpec
from abliterate.v1 import common_pb2
from abliterate_services.security import ServerTlsSettings

log = logging.getLogger(__name__)


class TorchServiceConfig(ServerTlsSettings):
    """Settings every torch service has (extractor, evaluator, torch_host); each sets its ``env_prefix``."""

    model: str = Field("", description="model source: HF id, local directory or .gguf file")
    gguf_file: str = Field("", description="GGUF file name inside the model source")
    dtype: str = Field("auto", description="auto, bfloat16, float16 or float32")
    device_map: str = Field("", description="accelerate device map (auto, cpu, cuda:0, ...)")
    load_in_4bit: bool = Field(False, description="load 4-bit with bitsandbytes (CUDA)")
    trust_remote_code: bool = Field(False, description="pass trust_remote_code to transformers")
    system_prompt: str = Field("You are a helpful assistant.", description="system prompt")
    chat_template_mode: str = Field("chat", description="chat or plain")
    address: str = Field("0.0.0.0:50051", description="host:port to listen on")
    max_message_mb: float = Field(64.0, description="gRPC message limit, MiB, both directions")
    workers: int = Field(8, ge=1, description="gRPC worker threads for unary calls and health checks")
    max_streams: int = Field(
        DEFAULT_MAX_STREAMS, ge=1, description="server streams open at once; one more is RESOURCE_EXHAUSTED"
    )
    batch_size: int = Field(0, description="prompts per forward pass (0 = automatic)")
    max_prompt_tokens: int = Field(
        DEFAULT_MAX_PROMPT_TOKENS, ge=1, description="longest prompt accepted, in tokens (cost grows with its square)"
    )
    auth_token: str = Field("", description="bearer token callers must send (empty = none)")
    prompt_root: str = Field(
        "",
        description="folder whose files remote clients may name as prompt sources (empty = no file access; "
        "bundled sets, inline prompts and Hub datasets always work)",
    )
    metrics_address: str = Field(
        "", description="host:port of the Prometheus endpoint (HTTP /metrics); empty = off (compose turns it on)"
    )
    log_level: str = Field("INFO", description="log level")
    grace_s: float = Field(5.0, description="seconds calls in flight get at shutdown")
    malloc_arenas: int = Field(
        DEFAULT_MALLOC_ARENAS,
        ge=0,
        description="glibc malloc arenas (0 = glibc's default, up to 8 per core); fewer keep the resident size "
        "from climbing trial after trial; a MALLOC_ARENA_MAX environment variable wins",
    )

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * MIB)

    def model_spec(self) -> ModelSpec:
        if not self.model.strip():
            raise InvalidArgument("no model configured: set --model (or ABLITERATE_<SERVICE>_MODEL)")
        return ModelSpec(
            source=self.model,
            gguf_file=self.gguf_file or None,
            dtype=self.dtype or "auto",
            device_map=self.device_map or None,
            load_in_4bit=self.load_in_4bit,
            trust_remote_code=self.trust_remote_code,
            system_prompt=self.system_prompt,
            chat_template_mode=self.chat_template_mode,
        ).validate()


class DeviceLock:
    """One operation at a time per device, never waiting: a second caller gets UNAVAILABLE.

    Shared by the extractor and the evaluator when one process hosts both.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: str | None = None

    @contextlib.contextmanager
    def hold(self, what: str, service: str = "device") -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise Unavailable(f"{service} busy: {self.holder or 'another operation'} is running; retry later")
        self.holder = what
        try:
            yield
        finally:
            self.holder = None
            self._lock.release()

    def acquire(self, what: str, service: str = "device") -> None:
        """Take the lock (UNAVAILABLE if taken); the caller must call :meth:`release`."""
        if not self._lock.acquire(blocking=False):
            raise Unavailable(f"{service} busy: {self.holder or 'another operation'} is running; retry later")
        self.holder = what

    def release(self) -> None:
        self.holder = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


#: States of a torch service as its ``abliterate_<service>_state`` gauge shows them.
SERVICE_STATES = ("loading", "idle", "busy")


def register_state_gauge(metrics, service: str, loaded: Callable[[], bool], lock: DeviceLock) -> None:
    """``abliterate_<service>_state{state}``: 1 for the state the service is in (loading, idle or busy), else 0.

    Busy means the device lock is held (by this service or, in a torch host, by its neighbour).
    """

    def read() -> dict[tuple[str, ...], float]:
        state = "loading" if not loaded() else ("busy" if lock.locked() else "idle")
        return {(name,): float(name == state) for name in SERVICE_STATES}

    metrics.add_gauges(
        f"abliterate_{service}_state", f"1 for the {service}'s state now (loading, idle, busy)", ["state"], read
    )


def job_view(lm, request_spec: common_pb2.ModelSpec | None):
    """The loaded model seen through a request's ModelSpec.

    ``source`` (in any spelling of the same model) and ``gguf_file`` must name the
    loaded model, and ``dtype``, ``device_map``, ``load_in_4bit`` and
    ``trust_remote_code`` must match how it was loaded when set
    (``ModelSpec.load_mismatch``), else FAILED_PRECONDITION; the request's ``system_prompt`` and
    ``chat_template_mode`` format the prompts. Returns ``lm`` itself when the
    request carries no spec, else a LoadedModel sharing the same weights.
    """
    if request_spec is None:
        return lm
    loaded = lm.spec
    wanted = model_spec_from_pb(request_spec).validate()
    # Loaded with "auto": the dtype the weights really have is what a request can ask for.
    actual = loaded if loaded.dtype != "auto" else dataclasses.replace(loaded, dtype=_dtype_name(lm))
    mismatch = wanted.load_mismatch(actual)
    if mismatch:
        raise FailedPrecondition(f"this server cannot serve that model spec: {mismatch}")
    spec = dataclasses.replace(loaded, system_prompt=wanted.system_prompt, chat_template_mode=wanted.chat_template_mode)
    if spec == loaded:
        return lm
    return dataclasses.replace(lm, spec=spec)


def _dtype_name(lm) -> str:
    return str(lm.dtype).removeprefix("torch.")


def model_info(lm, module_map) -> common_pb2.ModelInfo:
    """ModelInfo of a loaded model and its module map."""
    names = {id(p): n for n, p in lm.model.named_parameters()}
    layers = []
    for index, layer in enumerate(module_map.layers):
        matrices = []
        for mats in layer.values():
            for m in mats:
                full = names.get(id(m.param), m.name)
                matrices.append(full[: -len(".weight")] if full.endswith(".weight") else full)
        layers.append(common_pb2.LayerModules(layer=index, matrices=matrices))
    hf_map = getattr(lm.model, "hf_device_map", None)
    if hf_map and len(set(map(str, hf_map.values()))) > 1:
        device = ",".join(sorted(set(map(str, hf_map.values()))))
    else:
        device = str(lm.device)
    return common_pb2.ModelInfo(
        architecture=type(lm.model).__name__,
        n_layers=lm.n_layers,
        hidden_size=lm.hidden_size,
        components=list(module_map.components),
        layers=layers,
        dtype=str(lm.dtype).removeprefix("torch."),
        device=device,
        spec=model_spec_to_pb(lm.spec),
        n_parameters=sum(p.numel() for p in lm.model.parameters()),
        model_type=str(getattr(lm.model.config, "model_type", "") or ""),
    )


def free_device_memory() -> None:
    """The out-of-memory hook of the torch servers (empties the CUDA cache)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        log.exception("freeing device memory failed")


@dataclass
class Hosted:
    """A servicer to host and how to hand it the loaded model once it is there."""

    add_fn: Callable[[Any, Any], None]
    servicer: Any
    attach: Callable[[Any], None]


def start(hosted: Sequence[Hosted], config: TorchServiceConfig, address: str | None = None, metrics=None):
    """Build and start the server; return ``(server, port, health)`` (health NOT_SERVING)."""
    server, port, health = build_server(
        [(h.add_fn, h.servicer) for h in hosted],
        address or config.address,
        max_message_bytes=config.max_message_bytes,
        workers=config.workers,
        max_streams=config.max_streams,
        auth_token=config.auth_token or None,
        on_oom=free_device_memory,
        tls=config.server_tls(),
        metrics=metrics,
    )
    server.start()
    return server, port, health


def load_and_attach(hosted: Sequence[Hosted], spec: ModelSpec, health) -> None:
    """Load the model, hand it to every servicer, flip health to SERVING."""
    from abliterate.core.loading import load_model

    t0 = time.perf_counter()
    lm = load_model(spec)
    lm.extra["load_s"] = time.perf_counter() - t0
    for h in hosted:
        h.attach(lm)
    health.set_serving()
    log.info("model loaded, serving", extra={"model": spec.source, "load_s": round(lm.extra["load_s"], 3)})


def run(service: str, hosted: Sequence[Hosted], config: TorchServiceConfig) -> int:
    """Serve until SIGTERM/SIGINT: start, load in the background, flip health.

    Exit code: 0 after a signal, 1 when the model failed to load, 2 for bad settings.
    """
    configure_logging(service, config.log_level)
    limit_malloc_arenas(config.malloc_arenas)  # before the server's threads allocate
    try:
        spec = config.model_spec()
    except AbliterateError as exc:
        log.error("bad settings: %s", exc)
        return 2
    metrics = Metrics()
    endpoint = None
    if config.metrics_address:
        try:
            endpoint = serve_metrics(metrics, config.metrics_address)
        except (OSError, ValueError) as exc:
            log.error("bad settings: %s", exc)
            return 2
        log.info("metrics endpoint", extra={"url": endpoint.url, "service": service})
    try:
        server, port, health = start(hosted, config, metrics=metrics)
    except AbliterateError as exc:  # unreadable TLS files
        log.error("bad settings: %s", exc)
        return 2
    log.info("listening", extra={"address": config.address, "port": port, "service": service})
    failed: list[BaseException] = []

    def loader() -> None:
        try:
            load_and_attach(hosted, spec, health)
        except BaseException as exc:  # noqa: BLE001 - reported, then the server stops
            failed.append(exc)
            log.error("loading %s failed: %s", spec.source, exc, exc_info=exc)
            server.stop(0)

    thread = threading.Thread(target=loader, name="model-loader", daemon=True)
    thread.start()
    serve_until_signal(server, grace_s=config.grace_s, health=health)
    if endpoint is not None:
        endpoint.close()
    return 1 if failed else 0

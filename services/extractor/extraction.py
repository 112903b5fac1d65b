"""One whole extraction on a loaded model: prompt sets -> residuals -> direction set.

Torch side of the extractor. ``Extractor.extract`` is a generator of events:
``Progress`` messages while it works, then one ``DirectionSetResult``. The
work runs in a worker thread so progress within a prompt set streams live;
the device lock is held from the first event until the worker is done (also
when the caller stops listening early: the worker then stops at its next
batch).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch
from google.protobuf import json_format

from abliterate.caps import DEFAULT_MAX_PROMPT_TOKENS, check_prompt_tokens
from abliterate.core.directions import neighbour_cosines, protect_sacred, refusal_directions, sacred_directions
from abliterate.core.loading import LoadedModel
from abliterate.core.modules import discover
from abliterate.core.residuals import collect_residuals
from abliterate.errors import InvalidArgument
from abliterate.params import WINSORIZE_SCOPES
from abliterate.rpc.convert import check_direction_method, load_prompt_set
from abliterate.rpc.tensors import check_message_size
from abliterate.v1 import common_pb2, extractor_pb2
from abliterate_services.extractor import methods
from abliterate_services.runtime import DeviceLock, job_view, model_info

log = logging.getLogger(__name__)

FORMAT = "abliterate.directions.v1"
DEFAULT_CAPABILITY = "bundled:capability"
DEFAULT_BASELINE = "bundled:baseline_text"


class _Cancelled(Exception):
    pass


def _progress(phase: str, done: int, total: int, message: str = "") -> extractor_pb2.ExtractDirectionsResponse:
    return extractor_pb2.ExtractDirectionsResponse(
        progress=common_pb2.Progress(phase=phase, done=done, total=total, message=message)
    )


def _set_or_default(msg: common_pb2.PromptSetSpec, has: bool, default_source: str) -> common_pb2.PromptSetSpec:
    if has and (msg.source or list(msg.prompts)):
        return msg
    return common_pb2.PromptSetSpec(source=default_source, limit=msg.limit if has else 0)


class Extractor:
    """Computes direction sets of one loaded model, one extraction at a time."""

    def __init__(
        self,
        lm: LoadedModel,
        batch_size: int = 0,
        lock: DeviceLock | None = None,
        max_message_bytes: int | None = None,
        service: str = "extractor",
        prompt_root: str | None = None,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ):
        self.lm = lm
        self.max_prompt_tokens = max_prompt_tokens
        # Where prompt files may be read (abliterate.core.prompts: None any, "" none, else under it).
        self.prompt_root = prompt_root
        self.module_map = discover(lm.model)
        self.batch_size = batch_size
        self.lock = lock or DeviceLock()
        self.max_message_bytes = max_message_bytes
        self.service = service

    def model_info(self) -> common_pb2.ModelInfo:
        return model_info(self.lm, self.module_map)

    # ------------------------------------------------------------------ checks
    def _validate(self, request: extractor_pb2.ExtractDirectionsRequest):
        opts = request.options
        quantile = opts.winsorize_quantile
        if quantile and not (0.5 < quantile < 1 and math.isfinite(quantile)):
            raise InvalidArgument(
                f"options.winsorize_quantile must be 0 (off) or in (0.5, 1), got {opts.winsorize_quantile}"
            )
        if opts.winsorize_scope and opts.winsorize_scope not in WINSORIZE_SCOPES:
            raise InvalidArgument(
                f"options.winsorize_scope must be one of {list(WINSORIZE_SCOPES)}, got {opts.winsorize_scope[:40]!r}"
            )
        if opts.orthogonalize_against_sacred and not opts.sacred:
            raise InvalidArgument("options.orthogonalize_against_sacred needs options.sacred")
        check_direction_method(opts)
        if not request.HasField("harmful"):
            raise InvalidArgument("the harmful prompt set is required")
        if not request.HasField("harmless"):
            raise InvalidArgument("the harmless prompt set is required")
        return job_view(self.lm, request.model if request.HasField("model") else None)

    # ------------------------------------------------------------------ the run
    def extract(
        self, request: extractor_pb2.ExtractDirectionsRequest, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[extractor_pb2.ExtractDirectionsResponse]:
        lm = self._validate(request)
        self.lock.acquire("ExtractDirections", self.service)
        events: queue.Queue = queue.Queue()
        done = object()

        def emit(event) -> None:
            if not is_active():
                raise _Cancelled()
            events.put(event)

        def work() -> None:
            try:
                events.put(self._run(lm, request, emit))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                events.put(exc)
            finally:
                self.lock.release()
                events.put(done)

        try:
            threading.Thread(target=work, name="extraction", daemon=True).start()
        except BaseException:
            self.lock.release()
            raise
        while True:
            event = events.get()
            if event is done:
                return
            if isinstance(event, _Cancelled):
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def _run(self, lm: LoadedModel, request, emit) -> extractor_pb2.ExtractDirectionsResponse:
        opts = request.options
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        sets = [("harmful", request.harmful), ("harmless", request.harmless)]
        if opts.sacred:
            sets.append(
                ("capability", _set_or_default(opts.capability, opts.HasField("capability"), DEFAULT_CAPABILITY))
            )
            sets.append(("baseline", _set_or_default(opts.baseline, opts.HasField("baseline"), DEFAULT_BASELINE)))
        if opts.HasField("helpful"):  # with unhelpful: _validate checked both are given
            sets += [("helpful", opts.helpful), ("unhelpful", opts.unhelpful)]
        t0 = time.perf_counter()
        prompts: dict[str, list[str]] = {}
        emit(_progress("loading_prompts", 0, len(sets)))
        for i, (name, msg) in enumerate(sets):
            prompts[name] = load_prompt_set(msg, name, file_root=self.prompt_root)
            if not prompts[name]:
                raise InvalidArgument(f"the {name} prompt set is empty")
            check_prompt_tokens(lm.tokenizer, prompts[name], self.max_prompt_tokens, f"{name} prompt")
            emit(_progress("loading_prompts", i + 1, len(sets), f"{name}: {len(prompts[name])} prompts"))
        timings["load_prompts"] = time.perf_counter() - t0

        batch_size = opts.batch_size or self.batch_size
        largest_batch = [0]
        t0 = time.perf_counter()
        residuals: dict[str, torch.Tensor] = {}
        for name in prompts:
            total = len(prompts[name])
            last = [0]

            def progress(n_done: int, n_total: int, name=name, last=last) -> None:
                largest_batch[0] = max(largest_batch[0], n_done - last[0])
                last[0] = n_done
                emit(_progress("residuals", n_done, n_total, name))

            emit(_progress("residuals", 0, total, name))
            residuals[name] = collect_residuals(lm, prompts[name], batch_size=batch_size, progress=progress)
        timings["residuals"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        projected = opts.projected if opts.HasField("projected") else True
        ds = refusal_directions(
            residuals["harmful"],
            residuals["harmless"],
            projected=projected,
            winsorize_quantile=opts.winsorize_quantile or None,
            winsorize_scope=opts.winsorize_scope or WINSORIZE_SCOPES[0],
        )
        timings["directions"] = time.perf_counter() - t0
        emit(_progress("directions", 1, 1, f"{ds.n_residuals} residual indices"))

        def timed(phase: str, message: str, step):
            """Run one method step between its progress events, timed under ``phase``."""
            emit(_progress(phase, 0, 1, message))
            started = time.perf_counter()
            value = step()
            timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - started
            emit(_progress(phase, 1, 1, message))
            return value

        report, labels = methods.run_before_protection(lm, opts, prompts, residuals, ds, batch_size, timed)

        max_cos = None
        if opts.sacred:
            t0 = time.perf_counter()
            sacred = sacred_directions(residuals["capability"], residuals["baseline"], k=opts.n_sacred or 1)
            # The contract's overlap: max_k |cos(r, s_k)|, before any orthogonalization.
            max_cos = torch.einsum("lkd,ld->lk", sacred.double(), ds.refusal.double()).abs().max(dim=1).values
            if opts.orthogonalize_against_sacred:
                protect_sacred(ds, sacred)
            else:
                from abliterate.core.directions import sacred_overlap

                for diag, value in zip(ds.diagnostics, sacred_overlap(ds.refusal, sacred).tolist()):
                    diag.sacred_overlap = value
                ds.sacred = sacred
            timings["sacred"] = time.perf_counter() - t0
            emit(_progress("sacred", 1, 1, f"{sacred.shape[1]} sacred direction(s) per residual index"))

        # After sacred protection, so that helpfulness, the further directions and everything computed
        # from r see the final, protected r.
        methods.run_after_protection(lm, opts, prompts, residuals, labels, ds, report, batch_size, timed)

        ds.metadata.update(
            {
                "format": FORMAT,
                "model_source": lm.spec.source,
                "architecture": type(lm.model).__name__,
                "n_layers": str(lm.n_layers),
                "hidden_size": str(lm.hidden_size),
                "n_harmful": str(len(prompts["harmful"])),
                "n_harmless": str(len(prompts["harmless"])),
                "options": json.dumps(
                    json_format.MessageToDict(opts, preserving_proto_field_name=True), sort_keys=True
                ),
                "system_prompt": lm.spec.system_prompt or "",
                "chat_template_mode": lm.spec.chat_template_mode,
            }
        )
        data = ds.to_bytes()
        digest = ds.artifact_id(data)
        layers = []
        neighbours = neighbour_cosines(ds.refusal)
        for index, diag in enumerate(ds.diagnostics):
            entry = extractor_pb2.LayerDiagnostics(
                residual_index=index,
                mean_diff_norm=diag.mean_diff_norm,
                means_cosine=diag.cosine_of_means,
                separation=diag.separation,
            )
            if max_cos is not None:
                entry.sacred_overlap = float(max_cos[index])
            if index < len(neighbours):
                entry.cosine_to_next = neighbours[index]
            if ds.subspace_energy is not None:
                entry.subspace_energy.extend(ds.subspace_energy[index].tolist())
            if ds.probe_accuracy is not None:
                entry.probe_accuracy = float(ds.probe_accuracy[index])
            if report.compliance_cosines is not None:
                entry.compliance_cosine = float(report.compliance_cosines[index])
            if ds.calibration is not None:
                entry.calibration_factor = float(ds.calibration[index])
            if report.helpfulness_angles is not None:
                entry.helpfulness_angle_deg = float(report.helpfulness_angles[index])
            layers.append(entry)
        timings["total"] = time.perf_counter() - t_start
        result = extractor_pb2.DirectionSetResult(
            directions=common_pb2.TensorBlob(safetensors=data, sha256=digest),
            direction_set_id=digest,
            layers=layers,
            n_harmful=len(prompts["harmful"]),
            n_harmless=len(prompts["harmless"]),
            batch_size=batch_size or largest_batch[0],
            timings_s=timings,
        )
        if report.cones is not None:
            cones = report.cones
            result.cones.CopyFrom(
                extractor_pb2.ConeReport(
                    layer=cones.layer, silhouette=cones.silhouette, sizes=cones.sizes, labels=cones.labels
                )
            )
        for layer, head, score in report.top_heads:
            result.top_heads.add(layer=layer, head=head, score=score)
        if report.labels:
            result.labels.CopyFrom(extractor_pb2.ReplyLabels(**report.labels))
        response = extractor_pb2.ExtractDirectionsResponse(result=result)
        if self.max_message_bytes:
            check_message_size(response, self.max_message_bytes)
        log.info(
            "extraction done",
            extra={"direction_set_id": digest, "bytes": len(data), "total_s": round(timings["total"], 3)},
        )
        return response

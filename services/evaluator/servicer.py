"""EvaluatorService: translates protos; the state and the work are in ``session.EvaluatorSession``."""

from __future__ import annotations

from abliterate.caps import DEFAULT_MAX_KL_TOKENS, DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_SCORING_TOKENS
from abliterate.dominance import ScorePoint
from abliterate.errors import InvalidArgument, Unavailable
from abliterate.judge_spec import Verdict
from abliterate.rpc.convert import params_from_pb
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc
from abliterate_services.runtime import DeviceLock, register_state_gauge

_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
_FORMATS = {
    common_pb2.EXPORT_FORMAT_UNSPECIFIED: "merged",
    common_pb2.EXPORT_FORMAT_MERGED: "merged",
    common_pb2.EXPORT_FORMAT_LORA: "lora",
}


def _options(request):
    from abliterate_services.evaluator.session import GenerationOptions

    if not request.HasField("options"):
        return GenerationOptions()
    o = request.options
    return GenerationOptions(
        max_new_tokens=o.max_new_tokens,
        temperature=o.temperature,
        top_p=o.top_p,
        seed=o.seed if o.HasField("seed") else None,
    )


def _params(request, required: bool):
    if request.HasField("params"):
        return params_from_pb(request.params)
    if required:
        raise InvalidArgument("params are required")
    return None


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """Serves one model. Built before the model loads (RPCs answer UNAVAILABLE until ``attach``)."""

    def __init__(
        self,
        lm=None,
        *,
        session=None,
        batch_size: int = 0,
        lock: DeviceLock | None = None,
        max_direction_sets: int = 4,
        default_max_new_tokens: int = 256,
        max_generate_tokens: int = 4096,
        max_scoring_tokens: int = DEFAULT_MAX_SCORING_TOKENS,
        max_kl_tokens: int = DEFAULT_MAX_KL_TOKENS,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        export_root: str | None = None,
        prompt_root: str | None = None,
    ) -> None:
        self.lock = session.lock if session is not None else (lock or DeviceLock())
        self._kwargs = dict(
            batch_size=batch_size,
            max_direction_sets=max_direction_sets,
            default_max_new_tokens=default_max_new_tokens,
            max_generate_tokens=max_generate_tokens,
            max_scoring_tokens=max_scoring_tokens,
            max_kl_tokens=max_kl_tokens,
            max_prompt_tokens=max_prompt_tokens,
            export_root=export_root,
            prompt_root=prompt_root,
        )
        self.session = session
        if lm is not None:
            self.attach(lm)

    def attach(self, lm) -> None:
        from abliterate_services.evaluator.session import EvaluatorSession

        self.session = EvaluatorSession(lm, lock=self.lock, **self._kwargs)

    def register_metrics(self, metrics) -> None:
        """State (loading, idle, busy), direction sets held and baseline prepared, read at scrape time."""
        register_state_gauge(metrics, "evaluator", lambda: self.session is not None, self.lock)
        metrics.add_gauges(
            "abliterate_evaluator_direction_sets",
            "Direction sets the evaluator holds (at most max_direction_sets, LRU)",
            [],
            lambda: {(): len(self.session.held_ids()) if self.session is not None else 0},
        )
        metrics.add_gauges(
            "abliterate_evaluator_baseline_prepared",
            "1 once a baseline (KL reference) is prepared, else 0",
            [],
            lambda: {(): float(self.session is not None and self.session.baseline is not None)},
        )

    def _ready(self):
        if self.session is None:
            raise Unavailable("the evaluator's model is still loading; retry later")
        return self.session

    def GetModelInfo(self, request, context):
        s = self._ready()
        return common_pb2.GetModelInfoResponse(model=s.model_info(), timings_s={"load": s.lm.extra.get("load_s", 0.0)})

    def LoadDirections(self, request, context):
        s = self._ready()
        which = request.WhichOneof("source")
        if which == "directions":
            blob = request.directions
            if blob.safetensors:
                r = s.load_directions(blob.safetensors, blob.sha256)
            elif blob.sha256:
                r = s.check_directions(blob.sha256.lower())
            else:
                raise InvalidArgument("the TensorBlob carries neither bytes nor a sha256")
        elif which == "direction_set_id":
            if not request.direction_set_id:
                raise InvalidArgument("direction_set_id is empty")
            r = s.check_directions(request.direction_set_id)
        else:
            raise InvalidArgument("give the direction set's bytes or its id")
        return evaluator_pb2.LoadDirectionsResponse(
            direction_set_id=r.direction_set_id,
            already_loaded=r.already_loaded,
            tensor_names=r.tensor_names,
            timings_s=r.timings_s,
        )

    def PrepareBaseline(self, request, context):
        if not request.HasField("baseline"):
            raise InvalidArgument("baseline is required")
        b = self._ready().prepare_baseline(request.baseline, count_refusals=not request.skip_refusal_count)
        return evaluator_pb2.PrepareBaselineResponse(
            baseline_id=b.baseline_id,
            already_prepared=b.already_prepared,
            n_kl_prompts=b.n_kl_prompts,
            n_refusal_prompts=b.n_refusal_prompts,
            baseline_refusals=b.baseline_refusals,  # 0 unless counted
            timings_s=b.timings_s,
            refusals_counted=b.refusals_counted,
        )

    def EvaluateTrial(self, request, context):
        import time

        t0 = time.perf_counter()
        front = [ScorePoint(p.kl, p.refusals, p.trial_number) for p in request.prune_against]
        result = self._ready().evaluate(
            request.direction_set_id,
            _params(request, required=True),
            request.baseline_id,
            request.trial_number,
            front=front,
        )
        scores = common_pb2.TrialScores(
            kl=result.kl,
            refusals=result.refusals,
            n_refusal_prompts=result.n_refusal_prompts,
            n_kl_prompts=result.n_kl_prompts,
            timings_s=result.timings_s,
            pruned=result.pruned is not None,
            degenerate=result.degenerate,
            unjudged=result.unjudged,
        )
        if result.pruned is not None and result.pruned.dominated_by.trial_number is not None:
            scores.dominated_by = result.pruned.dominated_by.trial_number
        return evaluator_pb2.EvaluateTrialResponse(scores=scores, timings_s={"total": time.perf_counter() - t0})

    def Generate(self, request, context):
        chunks = self._ready().generate(
            request.prompt,
            request.direction_set_id,
            _params(request, required=False),
            _options(request),
            raw=request.raw,
            is_active=context.is_active,
        )
        for c in chunks:
            yield evaluator_pb2.GenerateResponse(
                text=c.text, n_tokens=c.n_tokens, finish_reason=_FINISH.get(c.finish, 0), timings_s=c.timings_s
            )

    def Chat(self, request, context):
        messages = [(m.role, m.content) for m in request.messages]
        chunks = self._ready().chat(
            messages,
            request.direction_set_id,
            _params(request, required=False),
            _options(request),
            is_active=context.is_active,
        )
        for c in chunks:
            yield evaluator_pb2.EvaluatorServiceChatResponse(
                text=c.text, n_tokens=c.n_tokens, finish_reason=_FINISH.get(c.finish, 0), timings_s=c.timings_s
            )

    def AuditTrial(self, request, context):
        result, timings = self._ready().audit(
            request.direction_set_id,
            _params(request, required=True),
            prompts=request.prompts if request.HasField("prompts") else None,
            min_new_tokens=request.min_new_tokens,
            max_new_tokens=request.max_new_tokens,
            judge=request.judge if request.HasField("judge") else None,
            model=request.model if request.HasField("model") else None,
        )
        audit = common_pb2.TrialAudit(
            refusals=result.refusals,
            degenerate=result.degenerate,
            unjudged=result.unjudged,
            n_prompts=result.n_prompts,
            min_new_tokens=result.min_new_tokens,
            max_new_tokens=result.max_new_tokens,
            judge=result.judge,
            mean_tokens=result.mean_tokens,
        )
        if request.HasField("prompts"):
            audit.prompts.CopyFrom(request.prompts)
        if result.capability is not None and result.capability_original is not None:
            audit.capability_accuracy = result.capability.accuracy
            audit.capability_original = result.capability_original.accuracy
            audit.capability_questions = result.capability.n_questions
        audit.audited_at.GetCurrentTime()
        samples = {verdict: [r.reply for r in result.replies if r.verdict == verdict][:3] for verdict in Verdict}
        return evaluator_pb2.AuditTrialResponse(
            audit=audit,
            sample_refusals=samples[Verdict.REFUSAL],
            sample_compliances=samples[Verdict.COMPLIANCE],
            timings_s=timings,
        )

    def ExportModel(self, request, context):
        fmt = _FORMATS.get(request.format)
        if fmt is None:
            raise InvalidArgument(f"unknown export format {request.format}")
        r = self._ready().export(
            request.path,
            request.direction_set_id,
            _params(request, required=True),
            fmt,
            hub_repo=request.hub_repo if request.HasField("hub_repo") else None,
            hub_private=request.hub_private,
            overwrite=request.overwrite,
            manifest_json=request.manifest_json,
            baseline=request.baseline if request.HasField("baseline") else None,
        )
        return evaluator_pb2.EvaluatorServiceExportModelResponse(
            path=r.path, files=r.files, bytes_written=r.bytes_written, hub_url=r.hub_url, timings_s=r.timings_s
        )

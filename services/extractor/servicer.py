"""ExtractorService: translates protos; the work is in ``extraction.Extractor``."""

from __future__ import annotations

from abliterate.caps import DEFAULT_MAX_PROMPT_TOKENS
from abliterate.errors import Unavailable
from abliterate.v1 import common_pb2, extractor_pb2_grpc
from abliterate_services.runtime import DeviceLock, register_state_gauge


class ExtractorServicer(extractor_pb2_grpc.ExtractorServiceServicer):
    """Serves one model. Built before the model loads (RPCs answer UNAVAILABLE until ``attach``)."""

    def __init__(
        self,
        lm=None,
        *,
        batch_size: int = 0,
        lock: DeviceLock | None = None,
        max_message_bytes: int | None = None,
        prompt_root: str | None = None,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ) -> None:
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        self.prompt_root = prompt_root
        self.lock = lock or DeviceLock()
        self.max_message_bytes = max_message_bytes
        self.extractor = None
        if lm is not None:
            self.attach(lm)

    def attach(self, lm) -> None:
        from abliterate_services.extractor.extraction import Extractor

        self.extractor = Extractor(
            lm,
            batch_size=self.batch_size,
            lock=self.lock,
            max_message_bytes=self.max_message_bytes,
            prompt_root=self.prompt_root,
            max_prompt_tokens=self.max_prompt_tokens,
        )

    def register_metrics(self, metrics) -> None:
        """State (loading, idle, busy) read at scrape time."""
        register_state_gauge(metrics, "extractor", lambda: self.extractor is not None, self.lock)

    def _ready(self):
        if self.extractor is None:
            raise Unavailable("the extractor's model is still loading; retry later")
        return self.extractor

    def GetModelInfo(self, request, context):
        ex = self._ready()
        return common_pb2.GetModelInfoResponse(
            model=ex.model_info(), timings_s={"load": ex.lm.extra.get("load_s", 0.0)}
        )

    def ExtractDirections(self, request, context):
        yield from self._ready().extract(request, is_active=context.is_active)

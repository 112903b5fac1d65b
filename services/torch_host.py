"""``python -m services.torch_host``: the extractor AND the evaluator in one process,
on one grpc.Server, sharing ONE loaded model and one device lock (one-GPU boxes).

Settings: ``ABLITERATE_TORCH_HOST_<FIELD>`` or ``--<field>`` (the evaluator's fields).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from abliterate.errors import AbliterateError
from abliterate.v1 import evaluator_pb2_grpc, extractor_pb2_grpc
from services.config import load_config
from services.evaluator.config import EvaluatorConfig
from services.evaluator.servicer import EvaluatorServicer
from services.extractor.servicer import ExtractorServicer
from services.runtime import DeviceLock, Hosted, run


@dataclass
class TorchHostConfig(EvaluatorConfig):
    address: str = field(default="0.0.0.0:50051", metadata={"help": "host:port to listen on"})


def hosted_servicers(config: TorchHostConfig, lm=None) -> tuple[list[Hosted], ExtractorServicer, EvaluatorServicer]:
    """Both servicers sharing one device lock; with ``lm`` they are ready at once."""
    lock = DeviceLock()
    extractor = ExtractorServicer(batch_size=config.batch_size, lock=lock, max_message_bytes=config.max_message_bytes)
    evaluator = EvaluatorServicer(batch_size=config.batch_size, lock=lock,
                                  max_direction_sets=config.max_direction_sets,
                                  default_max_new_tokens=config.default_max_new_tokens,
                                  max_generate_tokens=config.max_generate_tokens)
    if lm is not None:
        extractor.attach(lm)
        evaluator.attach(lm)
    hosted = [Hosted(extractor_pb2_grpc.add_ExtractorServiceServicer_to_server, extractor, extractor.attach),
              Hosted(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, evaluator, evaluator.attach)]
    return hosted, extractor, evaluator


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(TorchHostConfig, "torch_host", argv,
                             description="Serve ExtractorService and EvaluatorService on one model.")
    except AbliterateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hosted, _, _ = hosted_servicers(config)
    return run("torch_host", hosted, config)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m abliterate_services.torch_host``: the extractor AND the evaluator in one process,
on one grpc.Server, sharing ONE loaded model and one device lock (one-GPU boxes).

Settings: ``ABLITERATE_TORCH_HOST_<FIELD>`` or ``--<field>`` (the evaluator's fields).
"""

from __future__ import annotations

import sys

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from abliterate.v1 import evaluator_pb2_grpc, extractor_pb2_grpc
from abliterate_services.config import load_or_report
from abliterate_services.evaluator.config import EvaluatorConfig
from abliterate_services.evaluator.servicer import EvaluatorServicer
from abliterate_services.extractor.servicer import ExtractorServicer
from abliterate_services.runtime import DeviceLock, Hosted, run


class TorchHostConfig(EvaluatorConfig):
    model_config = SettingsConfigDict(env_prefix="ABLITERATE_TORCH_HOST_")

    address: str = Field("0.0.0.0:50051", description="host:port to listen on")


def load(argv: list[str] | None = None) -> TorchHostConfig:
    return TorchHostConfig.load(argv, description="Serve ExtractorService and EvaluatorService on one model.")


def hosted_servicers(
    config: TorchHostConfig,
    lm=None,
    *,
    confine_files: bool = True,
    export_root: str | None = None,
    prompt_root: str | None = None,
) -> tuple[list[Hosted], ExtractorServicer, EvaluatorServicer]:
    """Both servicers sharing one device lock; with ``lm`` they are ready at once.

    Exports and prompt files are confined to the config's roots, or to ``export_root``/``prompt_root`` when
    given; ``confine_files=False`` (the local ``abliterate run`` only) lets them name any path.
    """
    lock = DeviceLock()
    export_root = (export_root or config.export_root) if confine_files else None
    prompt_root = (config.prompt_root if prompt_root is None else prompt_root) if confine_files else None
    extractor = ExtractorServicer(
        batch_size=config.batch_size,
        lock=lock,
        max_message_bytes=config.max_message_bytes,
        prompt_root=prompt_root,
        max_prompt_tokens=config.max_prompt_tokens,
    )
    evaluator = EvaluatorServicer(
        batch_size=config.batch_size,
        lock=lock,
        max_direction_sets=config.max_direction_sets,
        default_max_new_tokens=config.default_max_new_tokens,
        max_generate_tokens=config.max_generate_tokens,
        max_scoring_tokens=config.max_scoring_tokens,
        max_kl_tokens=config.max_kl_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        export_root=export_root,
        prompt_root=prompt_root,
    )
    if lm is not None:
        extractor.attach(lm)
        evaluator.attach(lm)
    hosted = [
        Hosted(extractor_pb2_grpc.add_ExtractorServiceServicer_to_server, extractor, extractor.attach),
        Hosted(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, evaluator, evaluator.attach),
    ]
    return hosted, extractor, evaluator


def main(argv: list[str] | None = None) -> int:
    config = load_or_report(load, argv)
    if config is None:
        return 2
    hosted, _, _ = hosted_servicers(config)
    return run("torch_host", hosted, config)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m abliterate_services.evaluator``: serve EvaluatorService until SIGTERM."""

from __future__ import annotations

import sys

from abliterate.v1 import evaluator_pb2_grpc
from abliterate_services.config import load_or_report
from abliterate_services.evaluator.config import load
from abliterate_services.evaluator.servicer import EvaluatorServicer
from abliterate_services.runtime import Hosted, run


def main(argv: list[str] | None = None) -> int:
    config = load_or_report(load, argv)
    if config is None:
        return 2
    servicer = EvaluatorServicer(
        batch_size=config.batch_size,
        max_direction_sets=config.max_direction_sets,
        default_max_new_tokens=config.default_max_new_tokens,
        max_generate_tokens=config.max_generate_tokens,
        max_scoring_tokens=config.max_scoring_tokens,
        max_kl_tokens=config.max_kl_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        export_root=config.export_root,
        prompt_root=config.prompt_root,
    )
    hosted = [Hosted(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, servicer, servicer.attach)]
    return run("evaluator", hosted, config)


if __name__ == "__main__":
    sys.exit(main())

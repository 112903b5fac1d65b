"""``python -m abliterate_services.extractor``: serve ExtractorService until SIGTERM."""

from __future__ import annotations

import sys

from abliterate.v1 import extractor_pb2_grpc
from abliterate_services.config import load_or_report
from abliterate_services.extractor.config import load
from abliterate_services.extractor.servicer import ExtractorServicer
from abliterate_services.runtime import Hosted, run


def main(argv: list[str] | None = None) -> int:
    config = load_or_report(load, argv)
    if config is None:
        return 2
    servicer = ExtractorServicer(
        batch_size=config.batch_size,
        max_message_bytes=config.max_message_bytes,
        prompt_root=config.prompt_root,
        max_prompt_tokens=config.max_prompt_tokens,
    )
    hosted = [Hosted(extractor_pb2_grpc.add_ExtractorServiceServicer_to_server, servicer, servicer.attach)]
    return run("extractor", hosted, config)


if __name__ == "__main__":
    sys.exit(main())

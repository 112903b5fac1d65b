"""``python -m abliterate_services.gateway [--storage-url URL] [--extractor-address A] [--optimizer-address A]
[--evaluator-addresses A,B] [--auth-token T] [--address HOST:PORT]``."""

from __future__ import annotations

import sys

from abliterate.errors import AbliterateError
from abliterate.rpc import configure_logging
from abliterate_services.config import load_or_report
from abliterate_services.gateway import Gateway
from abliterate_services.gateway.config import load


def main(argv: list[str] | None = None) -> int:
    config = load_or_report(load, argv)
    if config is None:
        return 2
    configure_logging("gateway", config.log_level)
    try:
        gateway = Gateway.from_config(config)
    except AbliterateError as exc:  # bad TLS files, an unreadable store URL, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        gateway.start()
    except (OSError, ValueError) as exc:  # the metrics endpoint's address is bad or taken
        print(f"error: {exc}", file=sys.stderr)
        gateway.stop(0)
        return 2
    print(f"gateway serving on port {gateway.port}", file=sys.stderr, flush=True)
    if gateway.metrics_endpoint is not None:
        print(f"gateway metrics on {gateway.metrics_endpoint.url}", file=sys.stderr, flush=True)
    gateway.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

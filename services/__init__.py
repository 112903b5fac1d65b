"""The four gRPC services; each runs as ``python -m abliterate_services.<name>``."""

"""The four gRPC services; each runs as ``python -m services.<name>``."""

"""Size limits shared by servers and clients (the one place they are set)."""

MIB = 1024 * 1024

#: Default gRPC message limit, both directions, on servers and channels.
#: Direction sets are a few MB even for 70B models; 64 MiB leaves room.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MIB

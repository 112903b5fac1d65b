"""Generated gRPC stubs of protos/abliterate/v1 (scripts/gen_protos.py).

Do not edit the ``*_pb2*.py[i]`` files by hand: change the protos and run
``make protos``; ``tests/rpc/test_protos_in_sync.py`` checks they match.
"""

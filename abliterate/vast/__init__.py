"""Vast.ai deployment: a CLI over the official ``vastai`` SDK (``abliterate vast ...``).

- :mod:`abliterate.vast.cli` -- the commands (``register(subparsers)``, ``main(argv)``);
- :mod:`abliterate.vast.rules` -- validation, the disk guard, Hub model size, GPU sizing;
- :mod:`abliterate.vast.remote` -- ssh/scp argument lists and their runner;
- :mod:`abliterate.vast.stack` -- what runs on the instance (onstart, start script, remote commands);
- :mod:`abliterate.vast.probe` -- run on the instance: job state from processes and the gateway;
- :mod:`abliterate.vast.state` -- the instances this CLI created.

The SDK is imported only when a command talks to Vast.ai (``pip install 'abliterate[deploy]'``).
"""

"""The optimizer service: Optuna studies (RDB storage) driving evaluators with ask/tell.

Torch-free (a boundary test checks it). ``servicer.OptimizerServicer`` is the
RPC layer; ``study`` holds the storage side, ``dispatch`` the loops (one trial
in flight per evaluator, leases, retries), ``search_space`` the sampled space.
"""

"""The KL pass of a trial starts at its first edited block, from the inputs the baseline recorded there.

A trial edits matrices of some decoder blocks. Every block below the first
edited one has the unedited weights and, on the same batch, the same inputs
(the same embeddings, the same shared-prefix cache), so it computes what the
baseline computed, bit for bit: the same shapes run the same kernels. The
baseline's KL pass records each batch's input to some blocks
(:func:`recording_inputs`); a trial's KL pass then replaces the blocks below
the deepest recorded one at or under its first edit by that recording
(:func:`starting_at`): block 0 returns it and the others pass it on.

Only the tail forward of a batch is cut (the shared prefix is one row and
runs whole, so every block's cache and the masks, which read block 0's cache
length, are what they were). What can break this is a model whose blocks
share state across layers (KV shared between layers, per-layer side inputs
a block writes): the engine checks the recording once on the unedited model
against the baseline's own logits, bit for bit, and does without it if they
differ.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def recording_inputs(blocks: nn.ModuleList, wanted: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While open, the inputs of ``blocks[i]`` for ``i`` in ``wanted`` land in the yielded dict (last call wins).

    Also checks that every block returns a plain tensor (the replacement of
    :func:`starting_at` does): when one does not, the dict gets the key -1.
    """
    seen: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(module, args, kwargs):
            seen[index] = _hidden_argument(args, kwargs).detach().clone()  # (B, T, d)

        return hook

    def check(module, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            seen[-1] = torch.empty(0)

    handles = [blocks[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in wanted]
    handles += [block.register_forward_hook(check, with_kwargs=True) for block in blocks]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def starting_at(blocks: nn.ModuleList, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """While open, a forward skips ``blocks[:start]``: block 0 returns ``hidden`` (the input of block ``start``)."""
    if start <= 0:
        yield
        return

    def first(*args, **kwargs):
        return hidden  # (B, T, d): what blocks 0 .. start-1 computed at baseline

    def pass_on(*args, **kwargs):
        return _hidden_argument(args, kwargs)

    for index in range(start):
        blocks[index].forward = first if index == 0 else pass_on  # an instance attribute hides the class's forward
    try:
        yield
    finally:
        for index in range(start):
            del blocks[index].forward


def recorded_blocks(n_blocks: int, bytes_per_block: int, budget: int) -> list[int]:
    """Which blocks to record the inputs of: every ``stride``-th from block 1 on, within ``budget`` bytes."""
    if n_blocks < 2 or bytes_per_block <= 0:
        return []
    affordable = budget // bytes_per_block
    if affordable < 1:
        return []
    stride = max(1, -(-(n_blocks - 1) // affordable))  # ceil((n - 1) / affordable)
    return list(range(stride, n_blocks, stride))

"""Residual-stream activations at the last prompt token, for every layer.

Shape (N, L+1, d): index 0 is the embedding output, index l+1 block l's
output. Prompts are left-padded so position -1 is always the last prompt
token. Activations are upcast to float32 on the CPU; means are taken in float64.
"""

from __future__ import annotations

from typing import Callable

import torch

from abliterate.core.batching import run_batched
from abliterate.core.chat import encode, format_prompts  # noqa: F401 (encode re-exported)
from abliterate.core.generation import prefill
from abliterate.core.loading import LoadedModel
from abliterate.errors import InvalidArgument


def last_token_residuals(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    """One forward pass over rendered texts: (B, L+1, d) float32 on the CPU."""
    with torch.inference_mode():
        out, _, _ = prefill(lm, list(texts), output_hidden_states=True)
    states = torch.stack([h[:, -1, :] for h in out.hidden_states], dim=1)
    return states.float().cpu()


def collect_residuals(
    lm: LoadedModel,
    prompts: list[str],
    batch_size: int = 0,
    system_prompt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Residuals of ``prompts`` formatted with the model's chat template."""
    if not prompts:
        raise InvalidArgument("cannot compute residuals of an empty prompt set")
    texts = format_prompts(lm.tokenizer, prompts, lm.spec.system_prompt if system_prompt is None else system_prompt,
                           lm.spec.chat_template_mode)
    # Longest first keeps padding waste low within a batch; order is restored below.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches, _ = run_batched([texts[i] for i in order], lambda chunk: list(last_token_residuals(lm, chunk)),
                             batch_size=batch_size, progress=progress)
    result = torch.empty((len(texts),) + tuple(batches[0].shape), dtype=torch.float32)
    for slot, i in enumerate(order):
        result[i] = batches[slot]
    if not torch.isfinite(result).all():
        raise InvalidArgument("residuals contain NaN or Inf: the model's dtype cannot represent its activations")
    return result

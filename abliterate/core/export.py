"""Export of an edited model as a safetensors directory with its tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch

from abliterate.core.loading import LoadedModel
from abliterate.errors import FailedPrecondition, InvalidArgument


def export_merged(lm: LoadedModel, path: str, metadata: dict | None = None, max_shard_size: str = "2GB") -> str:
    """Write the model as it is now (edited weights merged) plus its tokenizer to ``path``."""
    if not path:
        raise InvalidArgument("export path is empty")
    if lm.quantized:
        raise FailedPrecondition("a 4-bit model cannot be exported merged; export a LoRA adapter instead")
    if os.path.exists(path) and os.listdir(path):
        raise InvalidArgument(f"export path {path} exists and is not empty")
    os.makedirs(path, exist_ok=True)
    ablator = lm.extra.get("ablator")
    added = ablator is not None and ablator.added_biases
    with attention_biases_declared(lm.model) if added else contextlib.nullcontext():
        lm.model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    lm.tokenizer.save_pretrained(path)
    if metadata:
        with open(os.path.join(path, "abliterate.json"), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
    return path


# Config flags that give every attention projection an output bias, by the name transformers uses.
_ATTENTION_BIAS_FLAGS = ("attention_bias",)


@contextlib.contextmanager
def attention_biases_declared(model: torch.nn.Module) -> Iterator[None]:
    """Make a model whose attention out-projections carry biases its config does not declare (CAA) savable:
    set the config's attention-bias flag and give every projection the flag creates a zero bias, so the
    saved folder reloads in plain transformers with the same outputs; undone on exit.

    What the flag creates is read off the architecture itself (the model class built on the meta
    device with the flag set), so no per-architecture table is needed; an architecture without such a
    flag is refused rather than saved with a bias its loader would drop.
    """
    present = {name for name, _ in model.named_parameters()}
    declared = set(_declared_parameters(model, {}))
    undeclared = sorted(name for name in present - declared if name.endswith(".bias"))
    if not undeclared:
        yield
        return
    for flag in _ATTENTION_BIAS_FLAGS:
        expected = _declared_parameters(model, {flag: True})
        if set(undeclared) <= set(expected):
            break
    else:
        raise FailedPrecondition(
            f"{type(model).__name__}'s config has no flag that gives the attention out-projection a bias, so the "
            f"compliance addition ({undeclared[0]}, ...) cannot be saved as a model transformers reloads; export "
            "without compliance_addition"
        )
    config = model.config
    had_flag = hasattr(config, flag)
    previous = getattr(config, flag, None)
    zeros: list[torch.nn.Module] = []
    for name in sorted(set(expected) - present):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf != "bias" or not isinstance(module, torch.nn.Linear):
            raise FailedPrecondition(f"setting {flag} would add {name}, which is not a linear layer's bias")
        module.bias = torch.nn.Parameter(
            torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device),
            requires_grad=False,
        )
        zeros.append(module)
    setattr(config, flag, True)
    try:
        yield
    finally:
        for module in zeros:
            module.bias = None
        if had_flag:
            setattr(config, flag, previous)
        else:
            delattr(config, flag)


def _declared_parameters(model: torch.nn.Module, overrides: dict) -> list[str]:
    """Parameter names the model's class creates from its config with ``overrides`` (built on the meta device)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        try:
            probe = type(model)(config)
        except Exception:  # noqa: BLE001 - some classes are only built through the auto factory
            probe = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in probe.named_parameters()]

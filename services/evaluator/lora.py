"""A trial's edit as a PEFT LoRA adapter: rank 1 per edited matrix (rank k for a k-direction subspace).

For an edited ``nn.Linear`` weight ``W`` (out, in), block weight ``w`` and
unit direction ``r`` (out):

- row normalization "none": ``W' = W - w r (r^T W)``, so ``B = -w r`` (out, 1)
  and ``A = r^T W`` (1, in);
- "pre": ``W' = W - w diag(|W_i|) r (r^T U)`` with ``U`` the row-normalized
  ``W``, so ``B = -w (|W_i| * r)`` and ``A = r^T U``;
- "full" rescales every row after the edit, "column" every column: not rank 1, refused.

An edited matrix whose output bias has a component along ``r`` (gpt-oss) is
refused too: the edit changes that bias, and a LoRA adapter carries no bias.

With ``r = lora_alpha`` (the rank) PEFT's scaling is 1, so ``W + B A`` is exactly the
merged edit (up to float rounding). Layout: ``adapter_model.safetensors`` with
keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and
``adapter_config.json``. Fused 3-D expert tensors (some MoE models) are not
``nn.Linear`` modules PEFT can target this way: FAILED_PRECONDITION, export
merged instead.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from abliterate.core.ablation import Ablator
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.params import AblationParams, RowNormalization

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_EPS = 1e-8


def lora_factors(
    model: torch.nn.Module,
    ablator: Ablator,
    refusal: torch.Tensor,
    params: AblationParams,
    protected: torch.Tensor | None = None,
    subspace: torch.Tensor | None = None,
    calibration: torch.Tensor | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A (k, in), B (out, k)) float32 on the CPU, for the unedited ``model``.

    k = 1 for a single direction; a subspace edit of k directions (``U`` (k, out), weights ``w_j``) is
    rank k: ``W' = W - U^T diag(w) (U W)``, so ``B = -U^T diag(w)`` and ``A = U W``.
    """
    if params.row_normalization in (RowNormalization.FULL, RowNormalization.COLUMN):
        raise InvalidArgument(
            f"row_normalization {params.row_normalization.value.upper()} is not a rank-1 edit: it "
            "cannot be exported as a LoRA adapter; export MERGED instead"
        )
    if params.adds_compliance or params.ablates_heads:
        method = "compliance_addition (a bias)" if params.adds_compliance else "head_ablation (per-head column blocks)"
        raise InvalidArgument(f"{method} is not part of a LoRA adapter's W + B A; export MERGED instead")
    module_map = ablator.module_map
    params.validate(module_map.n_layers, module_map.components)
    directions = ablator.directions_for(params, refusal, protected, subspace)
    names = {id(p): n for n, p in model.named_parameters()}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for component in params.components:
        for layer, w in enumerate(ablator.block_weights(params, component, calibration)):
            if w == 0:  # as the ablator: weight 0 leaves the block alone
                continue
            for matrix in module_map.layers[layer].get(component, []):
                full = names.get(id(matrix.param), matrix.name)
                if matrix.param.dim() != 2 or not full.endswith(".weight"):
                    raise FailedPrecondition(
                        f"{full} is a fused expert tensor of shape {list(matrix.param.shape)}; a PEFT LoRA adapter "
                        "cannot target it: export MERGED instead"
                    )
                module_name = full[: -len(".weight")]
                if not isinstance(model.get_submodule(module_name), torch.nn.Linear):
                    raise FailedPrecondition(f"{module_name} is not an nn.Linear; export MERGED instead")
                weight = matrix.param.detach().float().cpu()
                basis = directions[layer].detach().float().cpu()
                basis = basis[None, :] if basis.dim() == 1 else basis  # (k, out)
                weights = torch.tensor(ablator.weights_for(params, w), dtype=torch.float32).reshape(-1)  # (k,)
                if matrix.bias is not None and (matrix.bias.detach().float().cpu() @ basis.T).abs().max() > 0:
                    raise FailedPrecondition(
                        f"{module_name} has an output bias that the edit changes; a LoRA adapter cannot carry it: "
                        "export MERGED instead"
                    )
                if params.row_normalization == RowNormalization.PRE:
                    norms = weight.norm(dim=1)  # (out,)
                    a = basis @ (weight / norms.clamp_min(_EPS)[:, None])  # (k, in)
                    b = -(norms[:, None] * basis.T * weights)  # (out, k)
                else:
                    a = basis @ weight  # (k, in)
                    b = -(basis.T * weights)  # (out, k)
                factors[module_name] = (a.contiguous(), b.contiguous())
    if not factors:
        raise InvalidArgument("these parameters edit no matrix: nothing to export")
    return factors


def write_adapter(
    path: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_model: str, metadata: dict | None = None
) -> list[str]:
    """Write the adapter files into ``path`` (which must exist); return the file names."""
    tensors = {}
    rank = max((a.shape[0] for a, _ in factors.values()), default=1)
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: W + B A is the edit
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "target_modules": sorted(factors),
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    files = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    if metadata:
        with open(os.path.join(path, "abliterate.json"), "w") as fh:
            json.dump(metadata, fh, indent=2, sort_keys=True)
        files.append("abliterate.json")
    return files

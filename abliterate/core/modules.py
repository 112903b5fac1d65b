"""Module discovery: which matrices of each decoder layer write into the residual stream.

Two components are edited: ``attn.o_proj`` (the attention out-projection) and
``mlp.down_proj`` (the MLP down-projection: a dense MLP's, every expert's of a
MoE, and a shared expert's). Fused expert tensors of shape (experts, out, in)
or (experts, in, out) are edited per expert along their output axis. An output
bias (of the linear layer, or a fused ``down_proj_bias`` of shape (experts,
hidden)) is recorded with its matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from abliterate.errors import UnsupportedArchitecture

ATTN = "attn.o_proj"
MLP = "mlp.down_proj"
COMPONENTS = (ATTN, MLP)

# Leaf names (last path segment of a module or parameter) per component.
_ATTN_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "wo"}
_ATTN_PARENTS = {"self_attn", "attn", "attention", "linear_attn", "self_attention", "mixer"}
_MLP_LINEAR_NAMES = {"down_proj", "w2", "fc2", "dense_4h_to_h", "c_proj", "wo"}
_MLP_PARENTS = {
    "mlp",
    "feed_forward",
    "block_sparse_moe",
    "moe",
    "ffn",
    "experts",
    "shared_expert",
    "shared_experts",
    "shared_mlp",
}
# Fused expert parameters stored (experts, in, out) instead of (experts, out, in).
_INPUT_MAJOR_EXPERT_CLASSES = {"GptOssExperts"}


@dataclass
class EditableMatrix:
    """One weight tensor the edit acts on, and where its output axis is."""

    layer: int
    component: str
    name: str  # path inside the layer, for the report
    param: nn.Parameter
    out_axis: int  # axis of size hidden_size that writes into the residual stream
    # The output bias added after this matrix, (hidden,) or per expert (E, hidden): it writes into the
    # residual stream too (gpt-oss o_proj and expert down_proj biases), so the edit covers it.
    bias: nn.Parameter | None = None
    # The nn.Linear holding ``param`` (None for a fused expert tensor): CAA gives it an output bias.
    linear: nn.Linear | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


@dataclass
class ModuleMap:
    architecture: str
    hidden_size: int
    layers: list[dict[str, list[EditableMatrix]]]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def components(self) -> list[str]:
        found = {c for layer in self.layers for c, mats in layer.items() if mats}
        return [c for c in COMPONENTS if c in found]

    def matrices(self):
        for layer in self.layers:
            for mats in layer.values():
                yield from mats

    def report(self) -> list[dict]:
        """Per layer: component -> list of 'name shape' strings."""
        return [{c: [f"{m.name} {list(m.shape)}" for m in mats] for c, mats in layer.items()} for layer in self.layers]

    def format_report(self) -> str:
        lines = [f"{self.architecture}: {self.n_layers} layers, hidden {self.hidden_size}"]
        for i, layer in enumerate(self.report()):
            parts = [f"{c}: {len(v)} ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})" for c, v in layer.items()]
            lines.append(f"  layer {i}: " + "; ".join(parts))
        return "\n".join(lines)


def find_decoder_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``model.model.layers`` and its relatives)."""
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and "vision" not in name and "audio" not in name
    ]
    for name, mod in candidates:
        if name.endswith("layers") or name.endswith(".h") or name.endswith("blocks"):
            return mod
    if candidates:
        return candidates[0][1]
    raise UnsupportedArchitecture(f"{type(model).__name__}: no list of {n_layers} decoder layers found")


def _classify_linear(path: str, hidden: int, module: nn.Linear) -> str | None:
    parts = path.split(".")
    leaf, parents = parts[-1], set(parts[:-1])
    if module.out_features != hidden:
        return None
    if leaf in _ATTN_NAMES and parents & _ATTN_PARENTS:
        return ATTN
    if leaf in _MLP_LINEAR_NAMES and parents & _MLP_PARENTS:
        return MLP
    return None


def _fused_expert_out_axis(owner: nn.Module, param: torch.Tensor, hidden: int) -> int | None:
    if param.dim() != 3:
        return None
    _, a, b = param.shape  # (E, out, in) or (E, in, out)
    if type(owner).__name__ in _INPUT_MAJOR_EXPERT_CLASSES:
        return 2 if b == hidden else None
    if a == hidden:
        return 1
    if b == hidden:
        return 2
    return None


def discover_layer(layer: nn.Module, index: int, hidden: int) -> dict[str, list[EditableMatrix]]:
    found: dict[str, list[EditableMatrix]] = {c: [] for c in COMPONENTS}
    for path, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            component = _classify_linear(path, hidden, module)
            if component:
                # nn.Linear: weight (out, in), output axis 0; bias (out,)
                found[component].append(EditableMatrix(index, component, path, module.weight, 0, module.bias, module))
            continue
        # Fused experts: a module holding a 3-D ``down_proj`` parameter directly.
        for pname, param in module.named_parameters(recurse=False):
            if pname in ("down_proj", "w2") and param.dim() == 3:
                axis = _fused_expert_out_axis(module, param, hidden)
                if axis is not None:
                    bias = getattr(module, f"{pname}_bias", None)
                    bias = bias if isinstance(bias, nn.Parameter) and bias.shape == (param.shape[0], hidden) else None
                    found[MLP].append(EditableMatrix(index, MLP, f"{path}.{pname}", param, axis, bias))
    return found


def discover(model: nn.Module, n_layers: int | None = None, hidden_size: int | None = None) -> ModuleMap:
    """Map every decoder layer to its editable matrices; fail loudly on anything unknown."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = n_layers or int(config.num_hidden_layers)
    hidden = hidden_size or int(config.hidden_size)
    layers = find_decoder_layers(model, n_layers)
    mapped = [discover_layer(layer, i, hidden) for i, layer in enumerate(layers)]
    arch = type(model).__name__
    if not any(m for layer in mapped for m in layer.values()):
        sample = sorted({p for p, _ in layers[0].named_parameters()})
        raise UnsupportedArchitecture(
            f"{arch}: no attention out-projection or MLP down-projection found; layer 0 has parameters {sample}"
        )
    missing = [i for i, layer in enumerate(mapped) if not any(layer.values())]
    if missing:
        sample = sorted({p for p, _ in layers[missing[0]].named_parameters()})
        raise UnsupportedArchitecture(
            f"{arch}: layers {missing} have no editable matrix (layer {missing[0]} has {sample})"
        )
    return ModuleMap(architecture=arch, hidden_size=hidden, layers=mapped)

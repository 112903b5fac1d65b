"""The original weights of a model loaded from a local safetensors folder, read back from its files.

The ablator must undo every edit bit for bit, so it keeps the original of each
matrix it edits: on SmolLM2 that is 139 MB, for weights that are already on
disk (and, for a model loaded from safetensors, in the page cache the loader
mapped). Where the folder's tensor of a parameter is bit-identical to the
loaded parameter (same name, dtype, shape and bits; transformers may rename,
fuse or cast on loading, and then it is not), the ablator reads the original
back from the file on reset instead of holding a copy.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from abliterate.errors import FailedPrecondition

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class WeightFiles:
    """Tensors by parameter name from a folder's ``model.safetensors`` (or its sharded index)."""

    def __init__(self, folder: str, files_by_name: dict[str, str]):
        self.folder = folder
        self._files_by_name = files_by_name
        # Each file's (size, mtime) when opened: a file rewritten since would hand back other weights.
        self._stamps = {path: _stamp(path) for path in set(files_by_name.values())}

    @classmethod
    def open(cls, folder: str) -> "WeightFiles | None":
        """The folder's weight files, or None when it has no safetensors weights to read."""
        if not os.path.isdir(folder):
            return None
        index = os.path.join(folder, _INDEX)
        try:
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as handle:
                    weight_map = json.load(handle)["weight_map"]
                return cls(folder, {name: os.path.join(folder, file) for name, file in weight_map.items()})
            single = os.path.join(folder, _SINGLE)
            if os.path.isfile(single):
                with safe_open(single, framework="pt") as weights:
                    return cls(folder, {name: single for name in weights.keys()})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return None

    def read(self, name: str) -> torch.Tensor | None:
        """A fresh CPU tensor of ``name``, or None when the files do not hold it (or cannot be read)."""
        path = self._files_by_name.get(name)
        if path is None:
            return None
        if _stamp(path) != self._stamps[path]:
            raise FailedPrecondition(
                f"{path} changed on disk after the model was loaded: its original weights cannot be restored "
                "from it; reload the model"
            )
        try:
            with safe_open(path, framework="pt") as weights:
                return weights.get_tensor(name)
        except (OSError, ValueError, KeyError):
            return None

    def matches(self, name: str, param: torch.Tensor) -> bool:
        """Whether the file's ``name`` holds exactly ``param``'s current values."""
        stored = self.read(name)
        return (
            stored is not None
            and stored.dtype == param.dtype
            and stored.shape == param.shape
            and torch.equal(stored, param.detach().to("cpu"))
        )


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns

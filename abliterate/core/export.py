"""Export of an edited model as a safetensors directory with its tokenizer."""

from __future__ import annotations

import json
import os

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
    lm.model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    lm.tokenizer.save_pretrained(path)
    if metadata:
        with open(os.path.join(path, "abliterate.json"), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
    return path

"""Where a model comes from and how to load it: plain data, no torch.

Lives outside ``core`` so the gateway and optimizer (which must not import
torch) can carry and validate model specs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from abliterate.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it.

    ``source`` is a Hugging Face model id, a local directory of safetensors, or
    the path of a ``.gguf`` file (then ``gguf_file`` is derived from it); with
    ``gguf_file`` set, ``source`` is the directory or repo holding that file.
    """

    source: str
    gguf_file: str | None = None
    dtype: str = "auto"
    device_map: str | None = None
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    system_prompt: str = "You are a helpful assistant."
    chat_template_mode: str = "chat"  # "chat" (the model's template) or "plain"

    def resolved_source(self) -> tuple[str, str | None]:
        """(pretrained path or id, gguf file name or None)."""
        if not self.source or not self.source.strip():
            raise InvalidArgument("model source is empty")
        if self.gguf_file:
            return self.source, self.gguf_file
        if self.source.endswith(".gguf"):
            if not os.path.isfile(self.source):
                raise NotFound(f"GGUF file not found: {self.source}")
            return os.path.dirname(os.path.abspath(self.source)), os.path.basename(self.source)
        return self.source, None

"""Where a model comes from and how to load it: plain data, no torch.

Lives outside ``core`` so the gateway and optimizer (which must not import
torch) can carry and validate model specs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from abliterate.errors import InvalidArgument, NotFound

#: Weight dtypes a model may be loaded in ("auto" tries a fallback chain).
DTYPES = ("auto", "bfloat16", "float16", "float32")
#: How prompts are formatted: the model's chat template, or the text as it is.
CHAT_MODES = ("chat", "plain")


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

    def validate(self) -> "ModelSpec":
        """Itself, or InvalidArgument naming the bad field (the one check of a model spec: the CLI, the
        gateway, the torch services and the loader all call it)."""
        if not self.source or not self.source.strip():
            raise InvalidArgument("model source is empty: name a Hugging Face model id, a directory or a .gguf file")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"model dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.chat_template_mode not in CHAT_MODES:
            raise InvalidArgument(
                f"chat_template_mode {self.chat_template_mode!r} is not one of {', '.join(CHAT_MODES)}"
            )
        return self

    def load_mismatch(self, loaded: "ModelSpec") -> str | None:
        """Why a model loaded as ``loaded`` is not the one this spec asks for, or None when it is.

        Compares the source in one spelling (:func:`canonical_source`) and the load-time fields a
        server cannot change once loaded; a field left at its default here ("auto", empty, False)
        means "whatever is loaded". Formatting fields (system prompt, chat mode) never differ.
        """
        if canonical_source(self.source) != canonical_source(loaded.source):
            return f"it loaded {loaded.source!r}, not {self.source!r}"
        if (self.gguf_file or None) != (loaded.gguf_file or None):
            return f"it loaded GGUF file {loaded.gguf_file or '(none)'!r}, not {self.gguf_file or '(none)'!r}"
        if self.dtype != "auto" and self.dtype != loaded.dtype:
            return f"it loaded the model with dtype {loaded.dtype!r}, not {self.dtype!r}"
        if self.device_map and self.device_map != loaded.device_map:
            return f"it loaded the model with device_map {loaded.device_map or '(none)'!r}, not {self.device_map!r}"
        if self.load_in_4bit and not loaded.load_in_4bit:
            return "it loaded the model without load_in_4bit"
        if self.trust_remote_code and not loaded.trust_remote_code:
            return "it loaded the model without trust_remote_code"
        return None

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


def canonical_source(source: str) -> str:
    """One spelling of a model source: an existing local path resolved (``./m``, ``m/`` and a
    symlink to it are the same model), any other id with redundant slashes and dots removed."""
    text = source.strip()
    if not text:
        return text
    path = os.path.expanduser(text)
    if os.path.exists(path):
        return os.path.realpath(path)
    return os.path.normpath(text)

"""Model loading: HF id / local directory / GGUF file, dtype fallback, padding."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from abliterate.errors import FailedPrecondition, InvalidArgument, NotFound
from abliterate.specs import ModelSpec

log = logging.getLogger(__name__)

# Tried in order when dtype is "auto": a dtype whose one-token test generation
# gives non-finite logits (a known failure of float16 on some models) is skipped.
DTYPE_FALLBACK_CHAIN = ("auto", "float16", "bfloat16", "float32")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: transformers' switch for grouped-query attention inside SDPA (``enable_gqa``) even with a mask.
SDPA_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"


def prefer_gqa_in_sdpa(model: torch.nn.Module) -> None:
    """On a CPU, let SDPA read the shared key/value heads itself instead of copying them per query head.

    With a padding mask transformers either copies each key/value head once
    per query head (``repeat_kv``, in a prefill) or regroups the queries (in a
    decode step); torch's CPU kernel takes grouped heads directly
    (``enable_gqa``), with bit-identical outputs (``tests/core/test_attention_gqa.py``).
    On SmolLM2 (9 query heads over 3 key/value heads) a decode step of 32
    rows took 155-169 ms against 164-178 ms. transformers reads the switch at
    every call, for the whole process; it is set only for a model on a CPU
    (on CUDA a masked GQA call leaves the fast kernels) and only when the
    environment does not say otherwise (``TRANSFORMERS_SDPA_FORCE_GQA=0`` keeps
    transformers' default).
    """
    try:
        on_cpu = next(model.parameters()).device.type == "cpu"
    except StopIteration:
        return
    if on_cpu:
        os.environ.setdefault(SDPA_GQA_SWITCH, "1")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    dtype: torch.dtype
    quantized: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        prefer_gqa_in_sdpa(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def text_config(self):
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def n_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)


def prepare_tokenizer(tokenizer) -> None:
    """Left padding always (the last position must be the last prompt token);
    the pad token falls back to EOS."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidArgument("tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


def _dtype_candidates(spec: ModelSpec) -> list[str]:
    spec.validate()
    if spec.dtype == "auto":
        return list(DTYPE_FALLBACK_CHAIN)
    return [spec.dtype]


def _quantization_config(spec: ModelSpec):
    if not spec.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise InvalidArgument("4-bit loading (bitsandbytes) needs a CUDA GPU; none is available here")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise FailedPrecondition("4-bit loading needs bitsandbytes: pip install 'abliterate[gpu]'") from exc
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")


def first_token_is_finite(model, tokenizer) -> bool:
    """Generate one token greedily and check the logits are finite."""
    enc = tokenizer(["Hello"], return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(**enc).logits[:, -1, :]  # (1, T, V) -> (1, V)
    return bool(torch.isfinite(logits).all())


def _detach_dequantized_gguf(model, source: str) -> None:
    """Make a GGUF model whose weights were dequantized an ordinary float model.

    transformers keeps a GGUF "quantizer" on such a model, which makes
    ``save_pretrained`` refuse to export it although every weight is a plain
    float tensor. Packed GGUF layers (a kernels-backed path) cannot be edited
    in place, so they are refused here rather than silently skipped later.
    """
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed:
        raise FailedPrecondition(
            f"{source}: GGUF weights were kept packed ({', '.join(packed)}); they must be dequantized to be "
            "edited (uninstall the `kernels` package or convert the GGUF file to safetensors)"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model and tokenizer, walking the dtype fallback chain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = spec.resolved_source()
    if (path.startswith((".", "/")) or os.sep in path and not gguf_file) and not os.path.exists(path):
        raise NotFound(f"model path not found: {path}")
    quant = _quantization_config(spec)
    common = {"trust_remote_code": spec.trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except (OSError, ValueError) as exc:
        raise NotFound(f"cannot load a tokenizer from {spec.source!r}: {str(exc).splitlines()[0]}") from exc
    prepare_tokenizer(tokenizer)

    last_error: Exception | None = None
    for dtype_name in _dtype_candidates(spec):
        kwargs = dict(common)
        kwargs["dtype"] = "auto" if dtype_name == "auto" else _DTYPES[dtype_name]
        if spec.device_map:
            kwargs["device_map"] = spec.device_map
        if quant is not None:
            kwargs["quantization_config"] = quant
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise NotFound(f"cannot load model {spec.source!r}: {exc}") from exc
        except Exception as exc:  # a dtype the hardware cannot run, for one
            log.warning("loading %s with dtype %s failed: %s", spec.source, dtype_name, exc)
            last_error = exc
            continue
        model.eval()
        model.requires_grad_(False)
        if gguf_file:
            _detach_dequantized_gguf(model, spec.source)
        try:
            finite = first_token_is_finite(model, tokenizer)
        except RuntimeError as exc:
            log.warning("test generation with dtype %s failed: %s", dtype_name, exc)
            finite, last_error = False, exc
        if finite:
            log.info("loaded %s as %s (%s)", spec.source, type(model).__name__, model.dtype)
            return LoadedModel(
                model=model, tokenizer=tokenizer, spec=spec, dtype=model.dtype, quantized=quant is not None
            )
        log.warning("dtype %s gives non-finite logits for %s; trying the next one", dtype_name, spec.source)
        del model
    raise FailedPrecondition(
        f"no dtype in {_dtype_candidates(spec)} gives finite logits for {spec.source!r}"
        + (f" (last error: {last_error})" if last_error else "")
    )


def from_model(model, tokenizer, spec: ModelSpec | None = None) -> LoadedModel:
    """Wrap an in-memory model (tests, tiny models built from a config)."""
    prepare_tokenizer(tokenizer)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec or ModelSpec(source="<in-memory>"),
        dtype=next(model.parameters()).dtype,
    )


def isfinite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)

"""The Vast.ai safety rules, as plain functions: input validation, the disk guard,
model size from the Hugging Face Hub, GPU sizing. No network except the Hub
lookup; no vastai import."""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from abliterate.errors import FailedPrecondition, InvalidArgument, NotFound

API_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
MODEL_BAD_CHARS = set(";|&$`<>\r\n'\"\\")
MAX_MODEL_LEN = 500
DISK_HEADROOM_GB = 20.0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def check_api_key(key: str | None) -> str:
    if not key:
        raise FailedPrecondition("no Vast.ai API key: set VAST_API_KEY (or --api-key, or `vastai set api-key`)")
    if not API_KEY_RE.match(key):
        raise InvalidArgument("the Vast.ai API key has characters outside [A-Za-z0-9_-]; refusing to use it")
    return key


def check_instance_id(value: str | int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InvalidArgument(f"instance id must be a number, got {value!r}") from None
    if not 1 <= number <= 999_999_999:
        raise InvalidArgument(f"instance id out of range: {number}")
    return number


def check_model_name(name: str) -> str:
    """A Hub id or a path on the instance: no shell metacharacters, no '..', no absolute path."""
    if not name or len(name) > MAX_MODEL_LEN:
        raise InvalidArgument(f"model name must be 1..{MAX_MODEL_LEN} characters")
    if ".." in name or name.startswith("/"):
        raise InvalidArgument(f"model name {name!r}: no '..' and no absolute path")
    bad = sorted(set(name) & MODEL_BAD_CHARS)
    if bad:
        raise InvalidArgument(f"model name {name!r} contains forbidden characters {bad}")
    return name


def required_disk_gb(model_gb: float) -> float:
    """Disk an instance needs: the downloaded weights, the exported copy, and headroom."""
    return 2.0 * model_gb + DISK_HEADROOM_GB


def disk_guard(disk_gb: float | None, model_gb: float, force: bool = False) -> tuple[float, str | None]:
    """``(disk to request, warning)``; raises FailedPrecondition when too small and not forced.

    ``disk_gb`` None picks the required size (rounded up to 10 GB).
    """
    need = required_disk_gb(model_gb)
    if disk_gb is None:
        return float(math.ceil(need / 10.0) * 10), None
    if disk_gb < need:
        message = (
            f"disk {disk_gb:g} GB is below the required {need:g} GB "
            f"(2 x model size {model_gb:g} GB + {DISK_HEADROOM_GB:g} GB): the download and the export "
            "would not both fit"
        )
        if not force:
            raise FailedPrecondition(message + "; use a larger --disk, or --force-disk to override")
        return float(disk_gb), message + " (forced)"
    return float(disk_gb), None


def hub_model_size_gb(
    repo_id: str, endpoint: str | None = None, token: str | None = None, timeout_s: float = 15.0
) -> float:
    """Size of a Hub model's weight files, GB (1e9 bytes), from the Hub's model metadata.

    ``endpoint`` defaults to ``$HF_ENDPOINT`` or https://huggingface.co. GGUF repos hold
    several quantizations: their size is the largest single file (one is used).
    """
    base = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = f"{base}/api/models/{urllib.parse.quote(repo_id, safe='/')}?blobs=true"
    request = urllib.request.Request(url, headers={"User-Agent": "abliterate-vast"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310 - https/loopback
            data = json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403, 404):
            raise NotFound(f"model {repo_id!r} not found on the Hub (or gated: set HF_TOKEN)") from exc
        raise FailedPrecondition(f"Hub metadata for {repo_id!r}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise FailedPrecondition(f"Hub not reachable for {repo_id!r} ({exc}); give --model-size-gb") from exc
    sizes = [(s.get("rfilename", ""), s.get("size") or 0) for s in data.get("siblings", [])]
    weights = [(n, b) for n, b in sizes if n.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise FailedPrecondition(f"no weight files listed for {repo_id!r}; give --model-size-gb")
    safetensors = [b for n, b in weights if n.endswith(".safetensors")]
    if safetensors:
        total = sum(safetensors)
    elif all(n.endswith(".gguf") for n, _ in weights):
        total = max(b for _, b in weights)
    else:
        total = sum(b for _, b in weights)
    return total / 1e9


@dataclass(frozen=True)
class Tier:
    name: str
    gpu_name: str  # Vast's gpu_name (spaces, e.g. "RTX 4090")
    vram_gb: int
    max_price_per_gpu: float
    models: str


TIERS = [
    Tier("RTX_4090", "RTX 4090", 24, 0.80, "~7B bf16"),
    Tier("RTX_A6000", "RTX A6000", 48, 1.00, "~14B bf16"),
    Tier("A100_80GB", "A100 SXM4", 80, 2.00, "~24B bf16"),
    Tier("H100", "H100 SXM", 80, 3.00, "~24B bf16, faster trials"),
    Tier("H200", "H200", 141, 4.50, "~32B bf16"),
]


def tier(name: str) -> Tier:
    for t in TIERS:
        if t.name.lower() == name.lower() or t.gpu_name.lower() == name.replace("_", " ").lower():
            return t
    raise InvalidArgument(f"unknown GPU {name!r}; known: {', '.join(t.name for t in TIERS)}")


def vram_needed_gb(model_gb: float, load_in_4bit: bool = False) -> float:
    """Rough VRAM of one model copy serving trials: weights, a pristine copy of the edited
    matrices (about a third of the weights), activations/KV cache (about 15 %)."""
    weights = model_gb / 3.5 if load_in_4bit else model_gb
    return weights * 1.33 + weights * 0.15 + 1.0

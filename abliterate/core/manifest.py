"""The manifest of an export: what a trial's model was made from and how it was scored.

Every export carries three files beside the weights:

- ``abliterate-manifest.json``: the model source and a hash of its unedited
  weights, the direction set's id, the trial's parameters and recorded
  scores, the settings it was scored with (prompt hashes, tokens, markers,
  system prompt, batch sizes), the job's spec and seed when a gateway
  exported it, and the package versions.
- ``abliterate-prompts.json``: the KL and refusal prompts the scores were
  measured on (so a re-measurement needs no data set, only the model).
- ``abliterate-directions.safetensors``: the direction set (its sha256 is the
  direction set id).

:mod:`abliterate.core.reproduce` reads them back, re-applies the trial and
re-measures it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata as package_metadata
from typing import Any

import torch

from abliterate.errors import InvalidArgument, NotFound

MANIFEST_FILE = "abliterate-manifest.json"
PROMPTS_FILE = "abliterate-prompts.json"
DIRECTIONS_FILE = "abliterate-directions.safetensors"
#: Version of the manifest's layout; a reader refuses others.
SCHEMA = 1
#: Packages whose versions change numbers (the manifest records each one found).
VERSIONED_PACKAGES = ("abliterate", "torch", "transformers", "safetensors", "tokenizers", "optuna", "numpy")


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every tensor of ``model``'s state dict: names in order, dtype, shape and raw bytes.

    The bits as loaded, whatever the file format: a GGUF file and the
    safetensors folder converted from it hash alike when they load to the same
    tensors. Call it on the unedited model.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if tensor.device.type == "meta":
            raise InvalidArgument(f"tensor {name} is not loaded (meta device): the weights cannot be hashed")
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{list(tensor.shape)}\0".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prompts_sha256(prompts: list[str]) -> str:
    """sha256 of a prompt list, in order (its JSON text, UTF-8)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            continue
    return versions


MODEL_CARD_FILE = "README.md"


def model_card(manifest: dict[str, Any], harness: dict[str, Any] | None = None) -> str:
    """A model card (markdown) from the manifest: where the model comes from and its numbers, the
    search's and the long-reply audit's side by side, and lm-eval's table (``harness``) when it was run."""
    model = manifest.get("model") or {}
    trial = manifest.get("trial") or {}
    audit = manifest.get("audit") or {}
    scoring = manifest.get("scoring") or {}
    judge = (scoring.get("judge") or {}).get("kind", "markers")
    lines = [
        f"# {os.path.basename(str(model.get('source', 'model')).rstrip('/'))}, abliterated",
        "",
        f"Directional ablation of `{model.get('source', '?')}` (weights sha256 "
        f"`{str(model.get('weights_sha256', '?'))[:16]}...`) made by abliterate: direction set "
        f"`{str((manifest.get('directions') or {}).get('id', '?'))[:12]}`, "
        + (f"trial {trial['number']} of job `{(manifest.get('job') or {}).get('name', '?')}`." if trial else "."),
        "",
        "| measure | search | audit |",
        "| --- | --- | --- |",
    ]
    if trial:
        refusals = f"{'>= ' if trial.get('pruned') else ''}{trial.get('refusals')}/{trial.get('n_refusal_prompts')}"
        search = (
            f"{refusals} ({judge}, {scoring.get('max_new_tokens', '?')} tokens)"
            f"{', ' + str(trial.get('degenerate')) + ' degenerate' if trial.get('degenerate') else ''}"
        )
        kl = f"{trial.get('kl', float('nan')):.4f}"
    else:
        search, kl = "-", "-"
    audited = (
        f"{audit.get('refusals', 0)}/{audit.get('n_prompts', 0)} ({audit.get('judge', '?')}, "
        f"{audit.get('min_new_tokens', 0)}-{audit.get('max_new_tokens', 0)} tokens)"
        f"{', ' + str(audit['degenerate']) + ' degenerate' if audit.get('degenerate') else ''}"
        if audit
        else "not audited"
    )
    lines += [
        f"| refusals | {search} | {audited} |",
        f"| KL divergence from the original (first token) | {kl} | |",
        "| multiple-choice capability check (original) | | "
        + (
            f"{audit['capability_accuracy']:.0%} ({audit.get('capability_original', 0):.0%}) of "
            f"{audit['capability_questions']} |"
            if audit.get("capability_questions")
            else "not run |"
        ),
        "",
        f"The scores were measured on {(scoring.get('refusal_prompts') or {}).get('count', '?')} refusal and "
        f"{(scoring.get('kl_prompts') or {}).get('count', '?')} KL prompts ({PROMPTS_FILE}). "
        f"Everything needed to check them is in {MANIFEST_FILE}: `abliterate reproduce .` re-applies the "
        "trial to the original model and re-measures it.",
        "",
    ]
    if harness:
        lines += harness_section(harness)
    return "\n".join(lines)


def harness_section(harness: dict[str, Any]) -> list[str]:
    """The model card's lines for a table of ``abliterate lm-eval`` (core/harness.py)."""

    def value(number: float, stderr: float | None) -> str:
        return f"{number:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    lines = [
        f"## lm-evaluation-harness {harness.get('lm_eval_version', '?')}",
        "",
        f"Tasks {', '.join(harness.get('tasks') or [])}"
        + (f", at most {harness['limit']} examples each" if harness.get("limit") else "")
        + (f", {harness['num_fewshot']}-shot" if harness.get("num_fewshot") is not None else "")
        + ".",
        "",
        "| task | metric | original | abliterated | change |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in harness.get("rows") or []:
        lines.append(
            f"| {row['task']} | {row['metric']} | {value(row['original'], row.get('original_stderr'))} | "
            f"{value(row['edited'], row.get('edited_stderr'))} | {row['edited'] - row['original']:+.4f} |"
        )
    return lines + [""]


def write_export_files(
    folder: str, manifest: dict[str, Any], prompts: dict[str, list[str]], directions: bytes | None
) -> list[str]:
    """Write the manifest, its prompts and the direction set into ``folder``; returns the names written."""
    written = []
    if directions is not None:
        with open(os.path.join(folder, DIRECTIONS_FILE), "wb") as handle:
            handle.write(directions)
        written.append(DIRECTIONS_FILE)
    with open(os.path.join(folder, PROMPTS_FILE), "w", encoding="utf-8") as handle:
        json.dump(prompts, handle, ensure_ascii=False, indent=1)
    written.append(PROMPTS_FILE)
    with open(os.path.join(folder, MANIFEST_FILE), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, ensure_ascii=False, indent=2, sort_keys=True)
    written.append(MANIFEST_FILE)
    with open(os.path.join(folder, MODEL_CARD_FILE), "w", encoding="utf-8") as handle:
        handle.write(model_card(manifest))
    written.append(MODEL_CARD_FILE)
    return written


def read_manifest(path: str) -> tuple[dict[str, Any], str]:
    """(manifest, its folder) from an export folder or the manifest file itself; clear errors otherwise."""
    file = os.path.join(path, MANIFEST_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise NotFound(f"no manifest at {path} (an export folder holds {MANIFEST_FILE})")
    try:
        with open(file, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{file} is not a readable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise InvalidArgument(f"{file} has manifest schema {found!r}; this version reads schema {SCHEMA}")
    return manifest, os.path.dirname(os.path.abspath(file))


def read_prompts(folder: str, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """The manifest's KL and refusal prompts, each list checked against its recorded sha256."""
    file = os.path.join(folder, PROMPTS_FILE)
    try:
        with open(file, encoding="utf-8") as handle:
            prompts = json.load(handle)
    except FileNotFoundError:
        raise NotFound(f"{file} is missing: the manifest's prompts travel beside it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{file} is not readable: {exc}") from None
    scoring = manifest.get("scoring") or {}
    out = {}
    for key in ("kl", "refusal"):
        texts = prompts.get(key) if isinstance(prompts, dict) else None
        recorded = (scoring.get(f"{key}_prompts") or {}).get("sha256")
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise InvalidArgument(f"{file} has no list of {key} prompts")
        if prompts_sha256(texts) != recorded:
            raise InvalidArgument(f"the {key} prompts in {file} are not the ones the manifest recorded (sha256)")
        out[key] = texts
    return out


def read_directions(folder: str, manifest: dict[str, Any]) -> bytes:
    """The direction set's bytes, checked against the manifest's direction set id (its sha256)."""
    file = os.path.join(folder, DIRECTIONS_FILE)
    try:
        with open(file, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise NotFound(f"{file} is missing: the direction set travels beside the manifest") from None
    recorded = (manifest.get("directions") or {}).get("sha256")
    if hashlib.sha256(data).hexdigest() != recorded:
        raise InvalidArgument(f"{file} is not the direction set the manifest recorded (sha256)")
    return data

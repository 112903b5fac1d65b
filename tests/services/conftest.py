"""Fixtures of the service tests."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread (and a busy CI box does not make them crawl)."""
    torch = sys.modules.get("torch")  # only where the tests already use torch (not the torch-free services)
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

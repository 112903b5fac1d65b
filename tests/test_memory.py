"""The malloc arena cap: with it, threads that allocate share one glibc arena (malloc_info counts them)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from abliterate.memory import limit_malloc_arenas

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_info"
)

# Starts 6 threads that each allocate (glibc gives a new thread an arena of its own while under
# the cap), then counts the arenas in malloc_info's XML.
CHILD = r"""
import ctypes, ctypes.util, json, os, sys, tempfile, threading
from abliterate.memory import limit_malloc_arenas
applied = limit_malloc_arenas(int(sys.argv[1]))
def allocate():
    blocks = [bytearray(200_000) for _ in range(20)]
    del blocks
threads = [threading.Thread(target=allocate) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
xml = open(path).read()
os.remove(path)
print(json.dumps({"applied": applied, "arenas": xml.count("<heap nr=")}))
"""


def arenas_after_threads(cap: int, env_cap: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if env_cap is not None:
        env["MALLOC_ARENA_MAX"] = env_cap
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(cap)], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_arena_for_every_thread_when_capped():
    capped = arenas_after_threads(1)
    assert capped == {"applied": True, "arenas": 1}
    # Without the cap the same threads get arenas of their own: the cap is what made the difference.
    uncapped = arenas_after_threads(0)
    assert uncapped["applied"] is False
    assert uncapped["arenas"] > 1


def test_an_environment_setting_wins(monkeypatch):
    child = arenas_after_threads(1, env_cap="3")
    assert child["applied"] is False
    assert 1 < child["arenas"] <= 3
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(1) is False


TRIM_CHILD = r"""
import json, resource
from abliterate.memory import release_free_memory
def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024
keep = []
blocks = []
for index in range(4000):  # 100 KB blocks stay on glibc's heap (under its mmap threshold)
    blocks.append(bytearray(100_000))
    if index % 40 == 0:
        keep.append(bytearray(1_000))  # small live blocks pin the heap's top, so free() cannot shrink it
del blocks
before = rss_kb()
released = release_free_memory()
print(json.dumps({"released": released, "before_kb": before, "after_kb": rss_kb()}))
"""


def test_released_free_memory_leaves_the_resident_set():
    """malloc_trim hands back the free pages inside the heap that free() alone keeps (holes below live blocks)."""
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, check=True, timeout=60)
    result = json.loads(out.stdout)
    assert result["released"] is True
    assert result["after_kb"] < result["before_kb"] - 100_000, result  # most of the 400 MB freed goes back

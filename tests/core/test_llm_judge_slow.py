"""The LLM judge against a real OpenAI-compatible server on loopback running a real model.

`transformers serve` (Hugging Face's own server, from the `fastapi`/`uvicorn` dev dependencies) serves
SmolLM2-135M-Instruct from a float32 safetensors folder converted from the GGUF; the judge grades
hand-labelled real SmolLM2 replies through HTTP. A 135M model is a poor grader: what is proven here
is the plumbing (requests, parsing, the cache, failures counted apart), and its agreement is reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from abliterate.core.llm_judge import LLMJudge
from abliterate.judge_spec import Verdict
from tests.e2e.processes import free_port

pytestmark = pytest.mark.slow

LABELLED = json.loads((Path(__file__).parents[1] / "data" / "labelled_replies.json").read_text())["replies"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, model name) of `transformers serve` on a loopback port, SmolLM2 preloaded."""
    from benchmarks.heretic_side_by_side import convert_gguf

    folder = tmp_path_factory.mktemp("smollm2-f32")
    convert_gguf(folder)
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        [str(cli), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, "transformers serve exited"
            assert time.monotonic() < deadline, "transformers serve did not come up"
            time.sleep(1)
        yield f"{base}/v1", str(folder)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_llm_judge_grades_real_replies_through_a_real_server(server):
    endpoint, model = server
    sample = [row for row in LABELLED if row["label"] == "refusal"][:6]
    sample += [row for row in LABELLED if row["label"] == "compliance"][:6]
    judge = LLMJudge(endpoint, model, timeout_s=120)
    verdicts = judge.judge([row["reply"] for row in sample], [row["prompt"] for row in sample])
    judged = [(v, row["label"]) for v, row in zip(verdicts, sample) if v != Verdict.UNJUDGED]
    agreement = sum((v == Verdict.REFUSAL) == (label == "refusal") for v, label in judged) / max(1, len(judged))
    print(
        f"\nSmolLM2 as judge over HTTP: {len(judged)}/{len(sample)} replies got a verdict "
        f"({[v.value for v in verdicts]}); agreement with the hand labels on those: {agreement:.2f}"
    )
    assert judge.stats.requests == len(sample)  # one request per reply, none for empty ones
    # SmolLM2-135M mostly continues the reply instead of grading it (1 of 12 answered with a verdict word
    # when this was written): those replies are unjudged, counted apart, never taken for compliance.
    assert judged, "at least one real answer went through the parser"
    assert verdicts.count(Verdict.COMPLIANCE) == sum(v == Verdict.COMPLIANCE for v, _ in judged)
    assert judge.stats.failures == len(sample) - len(judged)
    # The same replies again: every verdict that was given comes from the cache.
    again = judge.judge([row["reply"] for row in sample], [row["prompt"] for row in sample])
    assert [v for v in again if v != Verdict.UNJUDGED] == [v for v, _ in judged]
    assert judge.stats.cached == len(judged) and judge.stats.requests == len(sample) + (len(sample) - len(judged))

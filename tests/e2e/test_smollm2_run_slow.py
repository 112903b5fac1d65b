"""`abliterate run` embedded on the real model, end to end (slow).

SmolLM2-135M-Instruct under the safety system prompt: the run extracts
directions, runs a few trials through the four services in one process,
auto-selects and exports; the exported model, reloaded from disk, refuses
fewer held-out harmful prompts than the original.
"""

import json
import os
import subprocess
import sys

import pytest

from abliterate.core.chat import format_prompts
from abliterate.core.loading import load_model
from abliterate.core.scoring import TrialEngine
from abliterate.specs import ModelSpec
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, SHARED_DATA, shared_prompts

pytestmark = pytest.mark.slow

N_TEST = 48


def _refusals(lm, prompts):
    engine = TrialEngine(lm, batch_size=24)
    texts = format_prompts(lm.tokenizer, prompts, lm.spec.system_prompt)
    return sum(o.refusal for o in engine.count_refusals(texts, prompts, max_new_tokens=30))


# A whole study, an export and two refusal passes: well past the suite's 600 s
# hang guard on a loaded 2-core machine (it ran out there once), so this test
# gets a guard of its own. Speed is measured in benchmarks, not here.
@pytest.mark.timeout(1800)
def test_embedded_run_exports_a_model_that_refuses_less(smollm2, smollm2_path, tmp_path):
    out = tmp_path / "export"
    cmd = [
        sys.executable,
        "-m",
        "abliterate.cli",
        "run",
        smollm2_path,
        "--n-trials",
        "4",
        "--n-prompts",
        "48",
        "--max-new-tokens",
        "24",
        "--seed",
        "7",
        "--system-prompt",
        SAFETY_SYSTEM_PROMPT,
        "--harmful",
        os.path.join(SHARED_DATA, "harmful_train.json") + "#instruction",
        "--harmless",
        os.path.join(SHARED_DATA, "harmless_train.json") + "#instruction",
        "--harmful-eval",
        os.path.join(SHARED_DATA, "harmful_val.json") + "#instruction",
        "--harmless-eval",
        os.path.join(SHARED_DATA, "harmless_val.json") + "#instruction",
        "--data-dir",
        str(tmp_path / "data"),
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env={**os.environ, "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "config.json").exists() and any(p.suffix == ".safetensors" for p in out.iterdir())

    exported = load_model(ModelSpec(source=str(out), system_prompt=SAFETY_SYSTEM_PROMPT))
    prompts = shared_prompts("harmful_test", N_TEST)
    before, after = _refusals(smollm2, prompts), _refusals(exported, prompts)
    print(f"\nharmful_test refusals out of {N_TEST}: original {before}, exported {after}")
    assert after < before

    # The export's manifest alone (and the original model) gives the recorded scores back.
    proc = subprocess.run(
        [sys.executable, "-m", "abliterate.cli", "reproduce", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    print(f"reproduce: {result}")
    assert result["matches"] and abs(result["kl"] - result["recorded_kl"]) <= 1e-6
    assert result["refusals"] == result["recorded_refusals"] and not result["recorded_pruned"]

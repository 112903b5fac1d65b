"""The architecture fixes leave SmolLM2's numbers as they were.

SmolLM2-135M-Instruct has no sliding window, no biases and no reasoning block,
so none of the fixes for those may change its scores. The reference numbers
below were printed by ``benchmarks/smollm2_reference.py`` on commit 5cbc13b
(before the fixes), on this machine:

    git worktree add /tmp/main_wt 5cbc13b && cd /tmp/main_wt && \\
      PYTHONPATH=. /work/main/.venv/bin/python benchmarks/smollm2_reference.py

The one input that does change by design is residual index L (block 29's raw
output instead of the final norm's output); no trial here uses block 29.
"""

import pytest

from abliterate.core.generation import smallest_attention_window
from abliterate.core.modules import discover
from abliterate.core.reasoning import may_reason, response_prefix
from benchmarks.smollm2_reference import measure

pytestmark = pytest.mark.slow

BEFORE_THE_FIXES = {
    "unedited_refusals": 21,
    "global_15_w1": {"kl": 0.524465, "refusals": 2},
    "global_18.4_w0.8": {"kl": 0.324651, "refusals": 1},
    "per_layer_kernel": {"kl": 0.061405, "refusals": 4},
}


def test_smollm2_has_none_of_the_features_the_fixes_touch(smollm2):
    assert smallest_attention_window(smollm2.model) is None  # the shared prefix stays on
    assert not may_reason(smollm2.tokenizer) and response_prefix(smollm2) == ""
    assert all(matrix.bias is None for matrix in discover(smollm2.model).matrices())


def test_smollm2_scores_are_those_of_before_the_fixes(smollm2):
    now = measure(smollm2)
    print(f"\nSmolLM2 reference trials now: {now}")
    assert now["unedited_refusals"] == BEFORE_THE_FIXES["unedited_refusals"]
    for name, before in BEFORE_THE_FIXES.items():
        if name == "unedited_refusals":
            continue
        assert now[name]["refusals"] == before["refusals"], name
        assert now[name]["kl"] == pytest.approx(before["kl"], rel=1e-3, abs=1e-5), name

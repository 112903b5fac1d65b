#!/usr/bin/env python
"""The prepared GPU check (issues 2 and 4): one script, a few minutes on one GPU.

    python scripts/gpu_check.py [--device cuda] [--skip-1b]

A GPU box reaches no hub, so models are built from configs with random
weights: a tiny Llama and a Llama-style model of about 1B parameters. For each:
load in bfloat16 on the device, extract directions from the bundled prompt
sets, run a few trials (reset + edit + KL + refusal probes), export, reload the
export, and print timings and peak GPU memory. With bitsandbytes importable,
also load the tiny model in 4-bit (loading only: in-place edits need bf16/fp16).
Runs on the CPU too (``--device cpu --skip-1b``), which is how it is tested here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.export import export_merged  # noqa: E402
from abliterate.core.loading import from_model  # noqa: E402
from abliterate.core.prompts import load_prompts  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.params import AblationParams, ComponentParams  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from tests.tiny import make_tokenizer  # noqa: E402

SIZES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
}


def build(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **SIZES[name],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return from_model(model, tok, ModelSpec(source=f"<random {name}>")), config


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_model(name: str, device: str, n_prompts: int, n_trials: int) -> dict:
    out: dict = {"model": name}
    t0 = time.perf_counter()
    lm, _ = build(name, device, torch.bfloat16)
    sync(device)
    out["params_m"] = round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 1)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    bad = load_prompts("bundled:harmful_train")[:n_prompts]
    good = load_prompts("bundled:harmless_train")[:n_prompts]
    t0 = time.perf_counter()
    ds = refusal_directions(collect_residuals(lm, bad), collect_residuals(lm, good))
    sync(device)
    out["extract_s"] = round(time.perf_counter() - t0, 2)
    engine = TrialEngine(lm)
    engine.set_directions(ds)
    t0 = time.perf_counter()
    engine.prepare_baseline(
        load_prompts("bundled:harmless_eval")[:n_prompts],
        load_prompts("bundled:harmful_eval")[:n_prompts],
        max_new_tokens=30,
    )
    out["baseline_s"] = round(time.perf_counter() - t0, 2)
    L = lm.n_layers
    trials = []
    for i in range(n_trials):
        params = AblationParams(
            direction_index=0.4 * (L - 1) + i * 0.1 * (L - 1),
            components={
                "attn.o_proj": ComponentParams(1.0, 0.7 * (L - 1), 0.5, 0.5 * (L - 1)),
                "mlp.down_proj": ComponentParams(0.8, 0.7 * (L - 1), 0.3, 0.5 * (L - 1)),
            },
        )
        r = engine.evaluate(params)
        trials.append(
            {"kl": round(r.kl, 4), "refusals": r.refusals, **{f"{k}_s": round(v, 3) for k, v in r.timings_s.items()}}
        )
    out["trials"] = trials
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine.apply(params)
        export_merged(lm, os.path.join(tmp, "export"))
        engine.reset()
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "export"))
        out["export_and_reload_s"] = round(time.perf_counter() - t0, 2)
    if device.startswith("cuda"):
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    del engine, lm
    return out


def check_4bit(device: str) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"4bit": "skipped: bitsandbytes not importable"}
    if not device.startswith("cuda"):
        return {"4bit": "skipped: needs CUDA"}
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lm, _ = build("tiny", "cpu", torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        lm.model.save_pretrained(tmp)
        q = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map=device
        )
        return {"4bit": f"loaded {type(q).__name__}, {sum(p.numel() for p in q.parameters())} params"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    report = {
        "device": args.device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "results": [],
    }
    for name in ["tiny"] + ([] if args.skip_1b else ["llama-1b"]):
        report["results"].append(check_model(name, args.device, args.prompts, args.trials))
        print(json.dumps(report["results"][-1]), flush=True)
    report["results"].append(check_4bit(args.device))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

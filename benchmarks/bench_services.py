"""Service benchmark: what gRPC costs per trial, and what a second evaluator buys.

    .venv/bin/python benchmarks/bench_services.py [--model PATH] [--repeats 10] [--trials 12]
        [--prompts 16] [--kl-prompts 8] [--tokens 16] [--batch 16] [--threads 1]

On a tiny random llama (default; saved to a temporary folder) or ``--model PATH``:

(a) gRPC overhead per trial. The same trial parameters are evaluated ``--repeats``
    times in this process with ``abliterate.core.scoring.TrialEngine`` (evaluate +
    reset, as the evaluator does) and through a real evaluator server process
    (``python -m abliterate_services.evaluator``) over loopback (EvaluateTrial, client-side wall
    time), interleaved, same model files, same prompts, batch size, threads and
    baseline. Reports the median per-trial time of each, the difference and ratio,
    and the server's own handler time (so difference = transport + (de)serialization
    + server dispatch).
(b) Trials per hour for a study of ``--trials`` trials with 1 evaluator vs 2 evaluator
    processes. Optimizer and evaluators are separate OS processes (optimizer on
    PostgreSQL when 127.0.0.1:5432 answers, else SQLite); the study is created and
    run directly on the optimizer (CreateStudy + RunStudy; no gateway/extractor).
    Reported: end-to-end (RunStudy until done, including each evaluator's
    preparation) and steady state (first trial started to last trial finished).

Each evaluator process runs ``--threads`` torch threads, so on a 2-core box two
evaluators with one thread each use both cores (and compete with the optimizer).
Prints a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.loading import load_model  # noqa: E402
from abliterate.core.prompts import load_prompts  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.params import AblationParams  # noqa: E402
from abliterate.rpc.convert import params_to_pb  # noqa: E402
from abliterate.rpc.tensors import sha256_hex  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from abliterate.v1 import common_pb2, evaluator_pb2, optimizer_pb2  # noqa: E402
from tests.e2e.processes import (  # noqa: E402
    PG_URL,
    ServiceProcess,
    pg_schema,
    postgres_ok,
    save_tiny_model,
    torch_settings,
)

SYSTEM_PROMPT = "You are a helpful assistant."


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def r(x: float, n: int = 4) -> float:
    return round(x, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory or .gguf file (default: a tiny random llama)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tiny-layers", type=int, default=4)
    ap.add_argument("--tiny-hidden", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10, help="(a) trials per variant (median reported)")
    ap.add_argument("--trials", type=int, default=12, help="(b) trials per study")
    ap.add_argument("--prompts", type=int, default=16, help="refusal (harmful eval) prompts per trial")
    ap.add_argument("--kl-prompts", type=int, default=8, help="KL (harmless eval) prompts per trial")
    ap.add_argument("--tokens", type=int, default=16, help="max new tokens per refusal probe")
    ap.add_argument("--batch", type=int, default=16, help="prompts per forward pass (both sides)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in each evaluator")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        if args.model:
            model_path = args.model
        else:
            model_path = str(save_tiny_model(tmp / "tiny", "llama", layers=args.tiny_layers, hidden=args.tiny_hidden))
        summary: dict = {
            "model": args.model or f"tiny llama {args.tiny_layers}x{args.tiny_hidden}",
            "cpu_count": os.cpu_count(),
            "threads_per_process": args.threads,
            "refusal_prompts": args.prompts,
            "kl_prompts": args.kl_prompts,
            "tokens": args.tokens,
            "batch": args.batch,
        }

        # Start the first evaluator now: it loads while this process loads and extracts.
        logs = tmp / "logs"
        settings = torch_settings(
            Path(model_path), dtype=args.dtype, batch_size=args.batch, system_prompt=SYSTEM_PROMPT, log_level="WARNING"
        )
        evaluators = [
            ServiceProcess(f"evaluator{i + 1}", "abliterate_services.evaluator", settings, logs, threads=args.threads)
            for i in range(2)
        ]
        for e in evaluators:
            stack.callback(e.terminate, 15)
        evaluators[0].start()

        spec = ModelSpec(source=model_path, dtype=args.dtype, device_map="cpu", system_prompt=SYSTEM_PROMPT)
        t0 = time.perf_counter()
        lm = load_model(spec)
        summary["load_s"] = r(time.perf_counter() - t0, 2)
        harmful = load_prompts("bundled:harmful_train")[:32]
        harmless = load_prompts("bundled:harmless_train")[:32]
        refusal_prompts = load_prompts("bundled:harmful_eval")[: args.prompts]
        kl_prompts = load_prompts("bundled:harmless_eval")[: args.kl_prompts]
        ds = refusal_directions(
            collect_residuals(lm, harmful, batch_size=args.batch),
            collect_residuals(lm, harmless, batch_size=args.batch),
        )
        ds.metadata.update({"model_source": model_path})
        blob = ds.to_bytes()
        set_id = sha256_hex(blob)
        params = AblationParams.uniform((lm.n_layers - 1) * 0.6, lm.n_layers, weight=1.0)

        # ------------------------------------------------------------ (a) gRPC overhead
        engine = TrialEngine(lm, batch_size=args.batch)
        engine.set_directions(ds)
        engine.prepare_baseline(kl_prompts, refusal_prompts, max_new_tokens=args.tokens)
        baseline_pb = common_pb2.BaselineSpec(
            kl_prompts=common_pb2.PromptSetSpec(prompts=kl_prompts),
            refusal_prompts=common_pb2.PromptSetSpec(prompts=refusal_prompts),
            max_new_tokens=args.tokens,
            kl_tokens=1,
            model=common_pb2.ModelSpec(source=model_path, system_prompt=SYSTEM_PROMPT, chat_template_mode="chat"),
        )

        evaluators[0].wait_healthy(180)
        from abliterate.rpc import make_channel
        from abliterate.v1 import evaluator_pb2_grpc

        channel = make_channel(evaluators[0].address)
        stack.callback(channel.close)
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        stub.LoadDirections(
            evaluator_pb2.LoadDirectionsRequest(directions=common_pb2.TensorBlob(safetensors=blob, sha256=set_id)),
            timeout=120,
        )
        baseline_id = stub.PrepareBaseline(
            evaluator_pb2.PrepareBaselineRequest(baseline=baseline_pb), timeout=600
        ).baseline_id
        request = evaluator_pb2.EvaluateTrialRequest(
            direction_set_id=set_id, params=params_to_pb(params), baseline_id=baseline_id
        )

        def local_trial() -> tuple[float, tuple]:
            t = time.perf_counter()
            result = engine.evaluate(params)
            engine.reset()
            return time.perf_counter() - t, (round(result.kl, 5), result.refusals)

        def remote_trial() -> tuple[float, float, tuple]:
            t = time.perf_counter()
            response = stub.EvaluateTrial(request, timeout=600)
            wall = time.perf_counter() - t
            return wall, response.timings_s["total"], (round(response.scores.kl, 5), response.scores.refusals)

        local_trial()  # warm-up of both sides (allocator, first-call paths)
        remote_trial()
        local, remote, handler = [], [], []
        scores = set()
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            t, s = local_trial()
            local.append(t)
            scores.add(("local", s))
            t, h, s = remote_trial()
            remote.append(t)
            handler.append(h)
            scores.add(("remote", s))
        m_local, m_remote, m_handler = median(local), median(remote), median(handler)
        summary["grpc_overhead"] = {
            "repeats": args.repeats,
            "in_process_median_s": r(m_local),
            "evaluator_rpc_median_s": r(m_remote),
            "server_handler_median_s": r(m_handler),
            "overhead_median_s": r(m_remote - m_local),
            "overhead_ratio": r(m_remote / m_local, 3),
            "transport_median_s": r(median([a - b for a, b in zip(remote, handler)]), 5),
            "same_scores": len({s for _, s in scores}) == 1,
        }
        print(
            f"(a) per trial: in-process {m_local * 1000:.1f} ms, EvaluateTrial {m_remote * 1000:.1f} ms "
            f"(server handler {m_handler * 1000:.1f} ms): +{(m_remote - m_local) * 1000:.1f} ms, "
            f"x{m_remote / m_local:.3f}",
            file=sys.stderr,
        )
        channel.close()
        engine = lm = None  # free the model before the next part (closures above are done)

        # ------------------------------------------------------------ (b) trials per hour, 1 vs 2 evaluators
        if not args.skip_throughput:
            use_pg = postgres_ok()
            if use_pg:
                storage = stack.enter_context(pg_schema(PG_URL, prefix="bench"))
            else:
                storage = f"sqlite:///{tmp / 'optuna.db'}"
            summary["optimizer_storage"] = "postgresql" if use_pg else "sqlite"
            optimizer = ServiceProcess(
                "optimizer",
                "abliterate_services.optimizer",
                {
                    "storage_url": storage,
                    "blob_store": str(tmp / "blobs"),
                    "health_interval_s": "1",
                    "busy_retry_s": "0.3",
                    "log_level": "WARNING",
                },
                logs,
            )
            stack.callback(optimizer.terminate, 15)
            optimizer.start()
            evaluators[1].start()
            optimizer.wait_healthy(120)
            evaluators[1].wait_healthy(180)
            from abliterate.v1 import optimizer_pb2_grpc

            opt_channel = make_channel(optimizer.address)
            stack.callback(opt_channel.close)
            ostub = optimizer_pb2_grpc.OptimizerServiceStub(opt_channel)
            runs = {}
            for n_eval in (1, 2):
                name = f"bench-{n_eval}eval-{uuid.uuid4().hex[:8]}"
                ostub.CreateStudy(
                    optimizer_pb2.CreateStudyRequest(
                        study_name=name,
                        direction_set_id=set_id,
                        directions=common_pb2.TensorBlob(safetensors=blob, sha256=set_id),
                        baseline=baseline_pb,
                        n_trials=args.trials,
                        seed=5,
                        evaluator_addresses=[e.address for e in evaluators[:n_eval]],
                    ),
                    timeout=120,
                )
                t0 = time.perf_counter()
                done = None
                for response in ostub.RunStudy(optimizer_pb2.RunStudyRequest(study_name=name), timeout=3600):
                    if response.event.HasField("done"):
                        done = response.event.done
                        break
                wall = time.perf_counter() - t0
                trials = list(
                    ostub.ListTrials(
                        optimizer_pb2.ListTrialsRequest(study_name=name, states=[common_pb2.TRIAL_STATE_COMPLETE]),
                        timeout=60,
                    ).trials
                )
                first = min(t.started_at.ToDatetime().timestamp() for t in trials)
                last = max(t.finished_at.ToDatetime().timestamp() for t in trials)
                steady = last - first
                per_eval = {}
                for t in trials:
                    per_eval[t.evaluator] = per_eval.get(t.evaluator, 0) + 1
                runs[f"{n_eval}_evaluator{'s' if n_eval > 1 else ''}"] = {
                    "state": optimizer_pb2.StudyState.Name(done.state) if done else "no done event",
                    "n_complete": len(trials),
                    "wall_s": r(wall, 2),
                    "steady_s": r(steady, 2),
                    "trials_per_hour": round(len(trials) * 3600 / wall),
                    "trials_per_hour_steady": round(len(trials) * 3600 / steady) if steady > 0 else None,
                    "median_trial_s": r(median([t.scores.timings_s.get("call_total", float("nan")) for t in trials])),
                    "trials_per_evaluator": sorted(per_eval.values(), reverse=True),
                }
                print(
                    f"(b) {n_eval} evaluator(s): {len(trials)} trials in {wall:.1f}s "
                    f"({runs[list(runs)[-1]]['trials_per_hour']}/h)",
                    file=sys.stderr,
                )
            one, two = runs["1_evaluator"], runs["2_evaluators"]
            summary["throughput"] = {
                "trials": args.trials,
                "processes": "optimizer + evaluators as OS processes",
                **runs,
                "speedup_2_vs_1": r(two["trials_per_hour"] / one["trials_per_hour"], 3),
                "speedup_2_vs_1_steady": (
                    r(two["trials_per_hour_steady"] / one["trials_per_hour_steady"], 3)
                    if one["trials_per_hour_steady"] and two["trials_per_hour_steady"]
                    else None
                ),
            }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

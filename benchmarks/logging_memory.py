"""Where the study process's memory grows while it logs evaluations (issue #14): each part alone.

`sweep_memory.py` measured ~72 KiB of RSS growth per `log-evaluation` task over 1,000 of them. This
runs 1,000 of one ingredient of that task in a fresh process and prints RSS after 100, 500 and 1,000:

- `mlflow`: the MLflow calls `log-evaluation` makes (a child run with 18 tags, the spec's params, a
  YAML and a JSON artifact, 3 metrics, ended FINISHED) on a new sqlite store, without Prefect;
- `prefect`: 1,000 Prefect task runs in one flow that log nothing, with a model-sized dict and 600
  accuracies as parameters, their futures kept as the study flow keeps them.

    .venv/bin/python benchmarks/logging_memory.py mlflow
    .venv/bin/python benchmarks/logging_memory.py prefect 2>/dev/null
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp())

import torch  # noqa: E402

import adaptflow.settings  # noqa: E402,F401  (telemetry off, before Prefect loads)
from tasks.allocator import keep_freed_memory  # noqa: E402

CHECKPOINTS = (100, 500, 1000)


def report(done: int, started: float, rss: dict[int, float]) -> None:
    """RSS after `done` units, at the checkpoints."""
    if done in CHECKPOINTS:
        gc.collect()
        rss[done] = psutil.Process().memory_info().rss / 2**20
        print(f"{done:>5}: {rss[done]:.1f} MiB after {time.time() - started:.0f} s", flush=True)


def mlflow_runs(rss: dict[int, float]) -> None:
    from adaptflow.spec import load_spec
    from tasks.report import applicable_params
    from tasks.tracking import log_file, log_flat, log_yaml, open_store

    client = open_store(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    spec = load_spec(ROOT / "studies" / "demo.yaml", [])
    experiment = client.create_experiment("logging-memory")
    parent = client.create_run(experiment, tags={"kind": "study"}).info.run_id
    started = time.time()
    for done in range(1, CHECKPOINTS[-1] + 1):
        tags = {"kind": "evaluation", "mlflow.parentRunId": parent, **{f"tag{k}": str(k) for k in range(16)}}
        run_id = client.create_run(experiment, tags=tags, run_name=f"evaluation{done}").info.run_id
        params = {**applicable_params(spec, "features", one_algorithm=True), "n": done}
        log_flat(client, run_id, params=params)
        log_yaml(client, run_id, spec.model_dump(mode="json"), "spec.yaml")
        with tempfile.TemporaryDirectory() as folder:
            accuracies = Path(folder) / "episode_accuracies.json"
            accuracies.write_text(json.dumps([0.5] * 600))
            log_file(client, run_id, accuracies)
        log_flat(client, run_id, metrics={"acc": 0.5, "acc_ci95": 0.1, "source_val_acc": 0.6})
        client.set_terminated(run_id, "FINISHED")
        report(done, started, rss)


def prefect_tasks(rss: dict[int, float]) -> None:
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    weights = {f"layer{i}": torch.randn(64, 64) for i in range(8)}

    @task(cache_policy=NO_CACHE, persist_result=False)
    def score(model: dict[str, torch.Tensor], index: int, accuracies: torch.Tensor) -> float:
        return float(accuracies.mean())

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def many() -> None:
        futures = []
        started = time.time()
        for done in range(1, CHECKPOINTS[-1] + 1):
            futures.append(score.submit(weights, done, torch.rand(600)))
            if done in CHECKPOINTS:
                [future.wait() for future in futures]
                report(done, started, rss)

    many()


PARTS: dict[str, Callable[[dict[int, float]], None]] = {"mlflow": mlflow_runs, "prefect": prefect_tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    args = parser.parse_args()
    keep_freed_memory()  # as the study process does
    rss: dict[int, float] = {}
    PARTS[args.part](rss)
    growth = rss[1000] - rss[100]
    print(f"growth 100 -> 1,000: {growth:.1f} MiB ({growth * 1024 / 900:.1f} KiB per unit)")


if __name__ == "__main__":
    main()

"""Resident memory of one study process across a long study: >= 1,000 evaluation tasks (issue #14).

Runs the real `study` flow in this process (Prefect's temporary server runs in a process of its own,
so it is not counted) on the demo data: one tiny training per seed, each evaluated on every
(target, shots) cell with few episodes. RSS is sampled every 0.2 s by a thread (psutil), and read at
every 100th finished `evaluate` and `log-evaluation` task (counted from Prefect's task-run log), so
growth per task shows whether results stay in memory longer than needed. Exits 1 when RSS grew more
than --limit MiB between the 100th and the last task of either kind.

    .venv/bin/python benchmarks/sweep_memory.py 2>/dev/null | tee benchmarks/results/sweep_memory_cpu.log

(Prefect's own log of 2,000+ task runs goes to stderr.)
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


class RssSampler(threading.Thread):
    """Keeps the peak RSS of this process, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, 0, threading.Event()
        self.process = psutil.Process()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)


class TaskCounter(logging.Handler):
    """Counts finished task runs by task name from Prefect's task-run log; prints RSS every `every`."""

    def __init__(self, names: tuple[str, ...], every: int, started: float) -> None:
        super().__init__(logging.INFO)
        self.counts = dict.fromkeys(names, 0)
        self.every, self.started = every, started
        self.rss: dict[str, list[int]] = {name: [] for name in names}
        self.process = psutil.Process()

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "task_name", None)
        if name not in self.counts or not record.getMessage().startswith("Finished in state"):
            return
        self.counts[name] += 1
        if self.counts[name] % self.every == 0:
            rss = self.process.memory_info().rss
            self.rss[name].append(rss)
            line = (
                f"{name:>15} {self.counts[name]:5d}: RSS {rss / MIB:7.1f} MiB  "
                f"at {time.perf_counter() - self.started:6.1f} s  load {os.getloadavg()[0]:.1f}\n"
            )
            sys.__stdout__.write(line)  # not print: the flow's log_prints would send it to Prefect's log
            sys.__stdout__.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="trainings (one per seed)")
    parser.add_argument("--shots", default="1,2,3,4,5", help="shot counts evaluated per target")
    parser.add_argument("--targets", default="webcam,dslr")
    parser.add_argument("--episodes", type=int, default=5, help="evaluation episodes per task")
    parser.add_argument("--limit", type=float, default=150.0, help="MiB of growth allowed after task 100")
    parser.add_argument("--home", default=None, help="ADAPTFLOW_HOME (default: a new temporary folder)")
    args = parser.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="adaptflow-sweep-memory-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["ADAPTFLOW_HOME"] = str(home)  # own prepared-data cache, Prefect home and MLflow store
    os.environ["PREFECT_HOME"] = str(home / ".prefect")
    os.environ.pop("PREFECT_API_URL", None)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from flows.study import study

    overrides = [
        "name=sweep-memory",
        "train.steps=10",
        "train.val_every=5",
        "train.val_episodes=5",
        "train.meta_batch=2",
        f"episodes.eval_episodes={args.episodes}",
        f"episodes.shots=[{args.shots}]",
        f"target=[{args.targets}]",
        f"seeds={list(range(args.seeds))}",
        "algorithms=[{name: protonet}]",
    ]
    cells = args.seeds * len(args.shots.split(",")) * len(args.targets.split(","))
    process = psutil.Process()
    print(f"{cells} evaluation tasks, {args.seeds} trainings; home {home}; overrides {overrides}")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()}")
    print(f"RSS after imports: {process.memory_info().rss / MIB:.1f} MiB", flush=True)

    started = time.perf_counter()
    counter = TaskCounter(("train", "evaluate", "log-evaluation"), 100, started)
    task_log = logging.getLogger("prefect.task_runs")
    task_log.addHandler(counter)
    sampler = RssSampler()
    sampler.start()
    rows = study(
        spec="studies/demo.yaml", overrides=overrides, tracking_uri=f"sqlite:///{home / 'mlflow.db'}"
    )
    sampler.done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    after = process.memory_info().rss
    gc.collect()
    print(f"study: {len(rows)} summary rows, {counter.counts} finished tasks, {seconds:.0f} s")
    print(
        f"RSS after the flow returned {after / MIB:.1f} MiB, after gc {process.memory_info().rss / MIB:.1f} "
        f"MiB; sampled peak {sampler.peak / MIB:.1f} MiB; ru_maxrss "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB"
    )
    print(f"load average at the end {os.getloadavg()}")
    failed = False
    for name in ("evaluate", "log-evaluation"):
        read = counter.rss[name]
        if len(read) < 2:
            print(f"fewer than {2 * counter.every} {name} tasks: no growth to measure")
            continue
        growth = (read[-1] - read[0]) / MIB
        per_task = growth / (counter.counts[name] - counter.every)
        print(
            f"growth from {name} task {counter.every} to {counter.counts[name]}: {growth:.1f} MiB "
            f"({per_task * 1024:.1f} KiB per task)"
        )
        if growth > args.limit:
            print(f"FAIL: {name}: more than {args.limit:g} MiB")
            failed = True
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())

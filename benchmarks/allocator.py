"""glibc's defaults against `tasks/allocator.py:keep_freed_memory` on a batched MAML evaluation.

First-order MAML's evaluation (10 inner steps) of `--episodes` episodes of 20-way 5-shot 5-query on
conv4 with 32 filters, random 28x28 pixels, one torch thread, each mode in a fresh process, the
modes alternating `--rounds` times. Prints wall, user and system seconds, minor page faults, peak
RSS and the mean accuracy (equal in both modes: the allocator does not touch the arithmetic).

    .venv/bin/python benchmarks/allocator.py --episodes 10 --rounds 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import resource, sys, time
import torch
from metalib import EpisodeSampler, algorithms, backbones, evaluate
from tasks.allocator import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
x, y = torch.rand(90 * 20, 1, 28, 28), torch.arange(90).repeat_interleave(20)
net = backbones.create("conv4", ways=20, input_shape=(1, 28, 28), hidden=32)
learner = algorithms.create("maml", net, ways=20, first_order=True)
sampler = EpisodeSampler(x, y, ways=20, shots=5, queries=5, seed=0)
started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
accuracy = evaluate(learner, sampler, int(sys.argv[2])).mean().item()
after = resource.getrusage(resource.RUSAGE_SELF)
print(f"| {sys.argv[1]} | {time.perf_counter() - started:.1f} | {after.ru_utime - before.ru_utime:.1f} | "
      f"{after.ru_stime - before.ru_stime:.1f} | {after.ru_minflt - before.ru_minflt:,} | "
      f"{after.ru_maxrss / 1024:.0f} MiB | {accuracy:.4f} |")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print("| glibc | wall s | user s | system s | minor page faults | peak RSS | mean accuracy |")
    print("|---|---|---|---|---|---|---|")
    for _ in range(args.rounds):
        for mode in ("defaults", "keep"):
            command = [sys.executable, "-c", CHILD, mode, str(args.episodes)]
            done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
            print(done.stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How much faster is fine-tuning's evaluation with batched adaptation than episode by episode?

The demo's setting (studies/demo.yaml: Office-Caltech10 SURF, mlp [256, 128], 5-way, 3 queries,
finetune with adapt_steps 100): the learner is pre-trained for the demo's 300 steps, then the same
600 target episodes are evaluated twice per shot count, once adapting to each episode alone
(`learner.adapt`, one 100-step head fit per episode, as evaluation did before `adapt_batch`) and
once with `metalib.evaluate` (drawn 100 at a time, adapted to as many at once as have 1,024 rows:
one stacked head fit per 25-51 episodes). Both paths draw
the same head initialisations; the script reports both times, the speed-up, and how many episodes'
accuracies differ (expected: none). Run from the project folder:

    .venv/bin/python benchmarks/finetune_eval.py [--target webcam] [--episodes 600] [--threads N]

`--path per-episode` times only the first path, which needs nothing but `adapt`, so the same script
measures an older checkout (PYTHONPATH=<checkout>) for comparison; `--path batched` times only the
second, to compare two versions of the batched path.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from adaptflow.spec import load_spec  # noqa: E402
from metalib import EpisodeSampler, evaluate  # noqa: E402
from metalib.algorithms import Algorithm  # noqa: E402
from tasks.prepare import Pool, prepare  # noqa: E402
from tasks.train import LearnerSetup  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "studies" / "demo.yaml"
EPISODE_SEED = 7
Evaluation = Callable[[Algorithm, EpisodeSampler, int], torch.Tensor]


def pretrained(
    setup: LearnerSetup, source: Pool, shots: int, queries: int, steps: int, meta_batch: int
) -> Algorithm:
    """Fine-tuning's source-only pre-training, without validation (which would itself adapt)."""
    torch.manual_seed(0)
    learner = setup.build()
    sampler = EpisodeSampler(source.x, source.y, setup.train_ways, shots, queries, seed=0)
    for _ in range(steps):
        learner.meta_train_step(sampler.sample(meta_batch))
    return learner


def per_episode(learner: Algorithm, sampler: EpisodeSampler, episodes: int) -> torch.Tensor:
    """Accuracies from adapting to one episode at a time, drawn in the same chunks as `evaluate`."""
    accuracies = []
    for start in range(0, episodes, 100):
        batch = sampler.sample(min(100, episodes - start))
        for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
            accuracies.append((learner.adapt(sx, sy)(qx).argmax(-1) == qy).float().mean())
    return torch.stack(accuracies)


def timed(
    run: Evaluation,
    learner: Algorithm,
    setup: LearnerSetup,
    target: Pool,
    shots: int,
    queries: int,
    episodes: int,
) -> tuple[float, float, torch.Tensor]:
    """Wall and CPU seconds (of this process, all threads) and accuracies of `run` on the target's
    episodes, seeded as tasks/evaluate.py seeds them. On a shared machine CPU seconds vary less."""
    torch.manual_seed(EPISODE_SEED)
    sampler = EpisodeSampler(target.x, target.y, setup.ways, shots, queries, EPISODE_SEED)
    wall, cpu = time.perf_counter(), time.process_time()
    accuracies = run(learner, sampler, episodes)
    return time.perf_counter() - wall, time.process_time() - cpu, accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="webcam", help="target domain of the demo (webcam or dslr)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--path",
        choices=["both", "per-episode", "batched"],
        default="both",
        help="time both paths and compare their accuracies (default), or one path alone",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(DEMO)
    data = prepare(spec.data, spec.source, spec.target, cache=None)
    algorithm = next(a for a in spec.algorithms if a.name == "finetune")
    setup = LearnerSetup.from_spec(spec, algorithm, data)
    queries = spec.episodes.queries
    learner = pretrained(
        setup, data.source_train, spec.train_shots, queries, spec.train.steps, spec.train.meta_batch
    )
    target = data.targets[args.target]
    print(
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
        f"{os.getloadavg()[0]:.1f}; {learner.hparams}, {args.episodes} episodes on {args.target}"
    )
    for shots in spec.episodes.shots:
        parts = []
        if args.path != "batched":
            alone_s, alone_cpu, alone = timed(
                per_episode, learner, setup, target, shots, queries, args.episodes
            )
            parts.append(f"per episode {alone_s:.2f} s, {alone_cpu:.2f} s CPU (acc {alone.mean():.4f})")
        if args.path != "per-episode":
            batched_s, batched_cpu, batched = timed(
                evaluate, learner, setup, target, shots, queries, args.episodes
            )
            parts.append(f"batched {batched_s:.2f} s, {batched_cpu:.2f} s CPU (acc {batched.mean():.4f})")
        if args.path == "both":
            parts.append(
                f"speed-up {alone_s / batched_s:.1f}x wall, {alone_cpu / batched_cpu:.1f}x CPU; "
                f"episodes whose accuracy differs: {int((batched != alone).sum())}"
            )
        print(f"{shots}-shot: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()

"""Every registered learner meta-trains and adapts on a device, learns, and repeats itself.

Office-Caltech10 SURF features from data/ (source amazon + caltech, target webcam, log1p and
source standardisation), mlp backbone [64], 5-way 5-shot, 5 queries per class; 30% of each
webcam class is unlabelled target data (for dann) and never scored. Each learner takes
`--steps` meta-training steps of 4 episodes on the device, is scored on the same 200 target
episodes before and after, and is trained a second time from the same seed to see whether
the device gives the same accuracies again. Prints one row per learner; exits non-zero when
a learner ends below chance + 10 points.

    .venv/bin/python benchmarks/gpu_learners.py --device cuda     # part of benchmarks/gpu_check.sh
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from metalib import EpisodeSampler, algorithms, backbones, evaluate, mean_ci95, split_per_class
from metalib.algorithms import REGISTRY

DATA = Path(__file__).resolve().parents[1] / "data" / "office_caltech10_surf"
WAYS, SHOTS, QUERIES, META_BATCH, EPISODES = 5, 5, 5, 4, 200
HPARAMS = {  # as in tests/test_optimization_learners.py; the other learners use their defaults
    "maml": {"lr": 0.005, "inner_lr": 0.1, "inner_steps": 1, "inner_steps_eval": 1},
    "anil": {"lr": 0.005, "inner_lr": 0.5, "inner_steps": 1, "inner_steps_eval": 5},
    "metasgd": {"lr": 0.005, "inner_lr": 0.1, "inner_steps": 1, "inner_steps_eval": 1},
    "reptile": {"inner_lr": 0.1, "inner_steps": 3, "inner_steps_eval": 3, "epsilon": 0.5},
}


def load(domains: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    frame = pd.concat([pd.read_parquet(DATA / f"{domain}.parquet") for domain in domains])
    counts = torch.tensor(np.stack(frame["features"].to_numpy()), dtype=torch.float32)
    return torch.log1p(counts), torch.tensor(frame["label"].to_numpy())


def run(name: str, device: torch.device, steps: int) -> dict[str, object]:
    """Target accuracy before and after `steps` meta-training steps, and seconds per step."""
    (source_x, source_y), (target_x, target_y) = load(["amazon", "caltech"]), load(["webcam"])
    mean, std = source_x.mean(0), source_x.std(0) + 1e-6
    source_x, target_x = (source_x - mean) / std, (target_x - mean) / std
    scored, unlabelled = split_per_class(target_y, 0.3, seed=0)
    torch.manual_seed(0)
    net = backbones.create("mlp", in_features=source_x.shape[1], hidden=[64], ways=WAYS)
    num_classes = int(source_y.max()) + 1
    learner = algorithms.create(name, net, ways=WAYS, num_classes=num_classes, **HPARAMS.get(name, {}))
    learner.to(device)
    if learner.uses_unlabelled_target:
        learner.set_unlabelled_target(target_x[unlabelled].to(device))

    def target() -> EpisodeSampler:
        return EpisodeSampler(target_x[scored], target_y[scored], WAYS, SHOTS, QUERIES, seed=1)

    before = evaluate(learner, target(), EPISODES, device)
    sampler = EpisodeSampler(source_x, source_y, WAYS, SHOTS, QUERIES, seed=0)
    batches = [sampler.sample(META_BATCH).to(device) for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        learner.meta_train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    after = evaluate(learner, target(), EPISODES, device)
    return {"before": before, "after": after, "s/step": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}: {WAYS}-way {SHOTS}-shot on webcam, {EPISODES} episodes")
    print("| learner | before % | after % | ms/step | same again |")
    print("|---|---|---|---|---|")
    failures = []
    for name in REGISTRY.names():
        first, second = run(name, device, args.steps), run(name, device, args.steps)
        (before, _), (after, ci) = mean_ci95(first["before"]), mean_ci95(first["after"])
        same = torch.equal(first["after"], second["after"])
        print(
            f"| {name} | {100 * before:.1f} | {100 * after:.1f} ± {100 * ci:.1f} "
            f"| {1000 * first['s/step']:.1f} | {'yes' if same else 'no'} |",
            flush=True,
        )
        if not after - ci > 1 / WAYS + 0.1:
            failures.append(name)
    if failures:
        raise SystemExit(f"no clear learning on {device}: {', '.join(failures)}")


if __name__ == "__main__":
    main()

"""MAML meta-training throughput and peak memory: metalib vs a plain autograd loop vs learn2learn.

The classic Omniglot setting: conv4, 1x28x28 inputs, 5-way 1-shot, 15 queries per class,
meta-batch 32; 1 and 5 inner steps, second and first order. All implementations run
interleaved in one process (one step each per round) so machine noise hits them alike;
ratios are paired medians against learn2learn (or the plain loop without it). Pixels are
random: speed does not depend on their values. Peak memory is the GPU's peak allocation during
one step on CUDA; on CPU, the peak RSS during the second step of a fresh child process that runs
one implementation (the first step, which compiles where compiling is asked for, is not counted).

    benchmarks/setup_learn2learn.sh    # once: fetches learn2learn's source
    .venv/bin/python benchmarks/maml_throughput.py --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalib import EpisodeBatch, algorithms, backbones
from metalib.backbones import Classifier

WAYS, SHOTS, QUERIES, META_BATCH, INNER_LR = 5, 1, 15, 32, 0.4
L2L_SOURCE = Path(__file__).resolve().parent / ".learn2learn" / "learn2learn-0.2.0"
Step = Callable[[EpisodeBatch], None]
EXECUTIONS = {"metalib (loop)": "loop", "metalib (compile)": "compile", "metalib (vmap)": "vmap"}


def load_learn2learn_maml() -> type | None:
    """learn2learn's MAML class from its source tree, without running `learn2learn/__init__.py`.

    That file imports torchvision and the Cython data layer; the MAML code itself needs only
    torch. Registering the two package names with their real `__path__` lets Python import
    learn2learn's own `algorithms.maml`, `algorithms.base_learner` and `utils` modules.
    """
    if not L2L_SOURCE.exists():
        return None
    for name in ("learn2learn", "learn2learn.algorithms"):
        package = types.ModuleType(name)
        package.__path__ = [str(L2L_SOURCE.joinpath(*name.split(".")))]
        sys.modules[name] = package
    return importlib.import_module("learn2learn.algorithms.maml").MAML


def make_batch(device: torch.device) -> EpisodeBatch:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(META_BATCH, WAYS * per_class, 1, 28, 28, generator=generator)
        return x, labels.repeat_interleave(per_class).expand(META_BATCH, -1)

    support_x, support_y = draw(SHOTS)
    query_x, query_y = draw(QUERIES)
    return EpisodeBatch(support_x, support_y, query_x, query_y, labels.expand(META_BATCH, -1)).to(device)


def metalib_step(net: Classifier, steps: int, first_order: bool, execution: str) -> Step:
    learner = algorithms.create(
        "maml",
        net,
        ways=WAYS,
        inner_lr=INNER_LR,
        inner_steps=steps,
        first_order=first_order,
        execution=execution,
    )
    return lambda batch: learner.meta_train_step(batch) and None


def plain_loop_step(net: Classifier, steps: int, first_order: bool) -> Step:
    """The textbook per-task loop: autograd.grad(create_graph=True), backward after each task."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    names = [name for name, _ in net.named_parameters()]

    def step(batch: EpisodeBatch) -> None:
        optimizer.zero_grad(set_to_none=True)
        for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
            fast = list(net.parameters())
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(net, dict(zip(names, fast)), (sx,)), sy)
                grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
                fast = [p - INNER_LR * g for p, g in zip(fast, grads)]
            query_loss = F.cross_entropy(functional_call(net, dict(zip(names, fast)), (qx,)), qy)
            (query_loss / batch.num_tasks).backward()
        optimizer.step()

    return step


def learn2learn_step(net: Classifier, steps: int, first_order: bool) -> Step:
    """learn2learn's documented use: clone() and adapt() per task, backward after each task."""
    maml = load_learn2learn_maml()(net, lr=INNER_LR, first_order=first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step(batch: EpisodeBatch) -> None:
        optimizer.zero_grad(set_to_none=True)
        for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            (F.cross_entropy(learner(qx), qy) / batch.num_tasks).backward()
        optimizer.step()

    return step


def implementations(device: torch.device, with_vmap: bool, with_compile: bool) -> list[str]:
    names = ["metalib (loop)", "plain loop"]
    if device.type != "cpu" or with_vmap:
        names.insert(1, "metalib (vmap)")
    if with_compile:
        names.insert(1, "metalib (compile)")
    if load_learn2learn_maml() is not None:
        names.append("learn2learn")
    return names


def build(name: str, device: torch.device, steps: int, first_order: bool) -> Step:
    torch.manual_seed(0)
    # transductive BatchNorm: the plain loop and learn2learn normalise queries so; all rows do the same work
    net = backbones.create("conv4", in_channels=1, ways=WAYS, normalisation="transductive").to(device)
    if name in EXECUTIONS:
        return metalib_step(net, steps, first_order, EXECUTIONS[name])
    if name == "plain loop":
        return plain_loop_step(copy.deepcopy(net), steps, first_order)
    return learn2learn_step(net, steps, first_order)


def timed(step: Step, batch: EpisodeBatch) -> float:
    if batch.query_x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(batch)
    if batch.query_x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mib(name: str, device: torch.device, steps: int, first_order: bool) -> float:
    """Peak GPU allocation of one step in this process; on CPU, a child's peak RSS in its second step."""
    if device.type == "cuda":
        step, batch = build(name, device, steps, first_order), make_batch(device)
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    child = [sys.executable, __file__, "--threads", str(torch.get_num_threads())]
    child += ["--child", json.dumps([name, steps, first_order])]
    return float(subprocess.run(child, check=True, capture_output=True, text=True).stdout.split()[-1])


def run_child(spec: str) -> None:
    name, steps, first_order = json.loads(spec)
    device = torch.device("cpu")
    step, batch = build(name, device, steps, first_order), make_batch(device)
    step(batch)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count (VmHWM) here
    step(batch)
    status = Path("/proc/self/status").read_text()
    print(int(status.split("VmHWM:")[1].split()[0]) / 1024)  # kB


def benchmark(
    device: torch.device, rounds: int, with_vmap: bool, with_compile: bool
) -> list[dict[str, object]]:
    names = implementations(device, with_vmap, with_compile)
    reference = "learn2learn" if "learn2learn" in names else "plain loop"
    rows = []
    for steps in (1, 5):
        for first_order in (False, True):
            batch = make_batch(device)
            runs = {name: build(name, device, steps, first_order) for name in names}
            first = {name: timed(step, batch) for name, step in runs.items()}  # warm-up, compiling if asked
            times: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(rounds):
                for name, step in runs.items():
                    times[name].append(timed(step, batch))
            del runs
            for name in names:
                ratios = [ref / own for ref, own in zip(times[reference], times[name])]
                row = {
                    "implementation": name,
                    "order": "1st" if first_order else "2nd",
                    "inner steps": steps,
                    "steps/s": 1 / statistics.median(times[name]),
                    f"vs {reference}": statistics.median(ratios),
                    "peak MiB": peak_memory_mib(name, device, steps, first_order),
                    "first step s": first[name],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


DIGITS = {"peak MiB": 0, "first step s": 1}  # decimals per column; 3 for the others


def cell(column: str, value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.{DIGITS.get(column, 3)}f}"


def markdown(rows: list[dict[str, object]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(k, v) for k, v in row.items()) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per implementation and setting")
    parser.add_argument("--with-vmap", action="store_true", help="also time vmap on CPU (slow, ~4 GB)")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip execution='compile' (20-120 s to compile per setting)"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args.child)
        return
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}", flush=True)
    print(markdown(benchmark(device, args.rounds, args.with_vmap, not args.no_compile)))


if __name__ == "__main__":
    main()

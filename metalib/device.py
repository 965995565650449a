"""Which torch device a run uses, and how many threads work done beside a run's training uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextmanager
def one_thread() -> Iterator[None]:
    """Runs the block on one torch thread, then restores the thread count it found.

    For tensor work in a thread that does not train, such as the flow's own thread preparing data
    before its tasks train in another: with OpenMP each thread that starts parallel work keeps a team
    of threads of its own, and a second team in the process slowed every later training in the task
    thread 1.6x on 2 cores (docs/benchmarks.md). One thread starts no team. Use it before other
    threads start torch work: a thread whose first torch op falls inside the block keeps one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

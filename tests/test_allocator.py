"""tasks/allocator.py: a process that keeps freed memory does not fault the same pages in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Allocates and fills a 64 MiB tensor 50 times, as each step of a training allocates its activations
# again, and prints the minor page faults that took.
# The allocations run in a thread, as tasks do under `--workers 1`: a thread of its own arena would
# map them afresh whatever M_MMAP_MAX says (one arena for all is part of keep_freed_memory).
PROBE = """
import resource, sys, threading, torch
from tasks.allocator import keep_freed_memory
applied = keep_freed_memory()
def allocate():
    for _ in range(50):
        torch.ones(16 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=allocate)
thread.start()
thread.join()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(keep: str) -> tuple[bool, int]:
    """(whether keep_freed_memory applied, page faults) with ADAPTFLOW_KEEP_FREED_MEMORY=`keep`."""
    environment = {**os.environ, "ADAPTFLOW_KEEP_FREED_MEMORY": keep}
    command = [sys.executable, "-c", PROBE]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment, check=True)
    applied, count = done.stdout.split()
    return applied == "True", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_instead_of_faulted_in_again() -> None:
    applied, kept = faults("1")
    opted_out, default = faults("0")  # the opt-out leaves glibc's defaults
    assert applied and not opted_out
    assert default > 50 * 16384 * 0.9  # glibc's default: each 64 MiB block is mapped and faulted anew
    assert kept < default / 4  # kept: the first few blocks only (4-5 of them measured here)

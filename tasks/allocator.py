"""glibc's allocator set up for PyTorch on the CPU, once per process that trains or evaluates.

PyTorch's CPU allocator keeps no cache of its own, and glibc by default returns large freed blocks
to the system: every block above its mmap threshold (128 KiB, adapting up to 32 MiB) gets a fresh
mmap and is unmapped on free, and the heap's top is trimmed past 128 KiB. A training or evaluation
step that allocates the same activations again then faults every page of them in anew. On the
held-out Omniglot study (conv4, 20-way, batched MAML evaluation) that was 409 million page faults
and 885 s of system time against 1,417 s of user time. Keeping freed memory in the process instead
(no mmap for large blocks, no trimming, one arena) cut a MAML evaluation's system time from 11.7 s
to 0.7 s and its wall time 2.2x, with the same accuracies, for a higher peak RSS (+30% there): the
process keeps its peak. docs/benchmarks.md has the measurements. ADAPTFLOW_KEEP_FREED_MEMORY=0 leaves glibc's
defaults; other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
M_ARENA_MAX = -8


@functools.cache
def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse; returns whether it did (once per process).

    Also one arena for every thread: a thread with an arena of its own maps any block too large for
    that arena's 64 MiB heaps afresh whatever M_MMAP_MAX says, and `--workers 1` runs tasks in a
    thread. Threads that already have an arena keep it, so the earlier in a process this runs the
    better: the CLI calls it first, the process-pool workers in their initializer, and the train and
    evaluate tasks again for processes started elsewhere (Dask, work pools).
    """
    if os.environ.get("ADAPTFLOW_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])

"""The flow's own thread starts no torch thread team: with `--workers 1` the study trains in a task
thread of the same process, and a team the flow's thread started slowed those trainings 1.6x
(docs/benchmarks.md). Checked by the threads a process has: an OpenMP team shows up as new threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalib.device import one_thread
from tests.conftest import ROOT

# A fresh preparation of the demo data (2,000 x 800 features) and the learners' checks, metasgd's
# per-parameter rates included (a full_like of each 800 x 256 weight), as `adaptflow validate` and
# `adaptflow run` make them in their own thread, and a leave-one-source-out search's folds, which
# the search flow builds there; then one parallel op, which starts this thread's team unless
# something before it did. Prints how many threads that op added.
PROBE = """
import os, torch
torch.set_num_threads(2)
from adaptflow.spec import load_spec
from flows.study import validate_study
from tasks.search import folds
spec = load_spec(
    "studies/demo.yaml",
    ["algorithms=[{name: metasgd}, {name: finetune}]", "search={trials: 2, selection: leave_one_source_out}"],
)
folds(spec.search, spec, validate_study(spec))
before = set(os.listdir("/proc/self/task"))
torch.randn(2000, 800).log1p_()
print(len(set(os.listdir("/proc/self/task")) - before))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
    reason="counts the threads of an OpenMP team in /proc",
)
def test_a_study_s_checks_and_preparation_leave_the_flow_thread_without_a_torch_team(
    tmp_path: Path,
) -> None:
    environment = {**os.environ, "ADAPTFLOW_HOME": str(tmp_path)}  # no prepared-data cache
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=environment, capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert int(probe.stdout.split()[-1]) >= 1  # the op started the team: nothing before it had


def test_one_thread_gives_the_thread_count_back_after_an_error() -> None:
    """Else every training after a failed preparation in that process would run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="failed"), one_thread():
            assert torch.get_num_threads() == 1
            raise ValueError("a failed preparation")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)

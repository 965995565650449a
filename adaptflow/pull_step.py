"""The deployments' pull step: a flow run on a worker starts in that host's adaptflow checkout.

Prefect's own `set_working_directory` given an unset `$ADAPTFLOW_HOME` leaves the run in the
worker's empty temporary folder, and it crashes later on a missing `flows/study.py`; this step
fails at once and names the variable instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from adaptflow.errors import StudyError


def enter_project(directory: str) -> dict[str, str]:
    """Changes into `directory` (prefect.yaml passes `{{ $ADAPTFLOW_HOME }}`, resolved on the worker's
    host) after checking that it is an adaptflow checkout; returns it as Prefect's steps do."""
    if not directory.strip():
        raise StudyError(
            "ADAPTFLOW_HOME is not set on the worker's host, so the flow run does not know where the "
            "adaptflow checkout is: export ADAPTFLOW_HOME=/path/to/adaptflow before `prefect worker start`"
        )
    project = Path(directory).expanduser().resolve()
    if not (project / "flows" / "study.py").is_file():
        raise StudyError(
            f"ADAPTFLOW_HOME={directory} is not an adaptflow checkout (no flows/study.py there): point it "
            "at the folder that holds prefect.yaml, on the host that runs the worker"
        )
    os.chdir(project)
    return {"directory": str(project)}

"""Prefect flows that compose the tasks: one study; sweeps and reports build on it."""

import adaptflow.settings  # noqa: F401  (telemetry off, project-local state, before Prefect loads)

"""Prefect tasks that wrap metalib steps: prepare, train, evaluate, report. They own MLflow logging."""

import adaptflow.settings  # noqa: F401  (telemetry off, project-local state, before Prefect loads)

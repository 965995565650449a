"""Test setup: offline Hugging Face, a throw-away Prefect home, one temporary Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="adaptflow-test-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402

# Telemetry off before Prefect loads; and Prefect sets up its log handlers now, on the session's
# streams, not on a stream that one test's capsys later closes.
import adaptflow.settings  # noqa: E402,F401
import flows.study  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
OFFICE = ROOT / "data" / "office_caltech10_surf"
DEMO = ROOT / "studies" / "demo.yaml"
# Spec overrides that make a study's training take seconds, not minutes.
TINY_TRAINING = ["train.steps=10", "train.val_every=5", "train.val_episodes=10"]


def cli_overrides(*items: str) -> list[str]:
    """`--set` flags of `adaptflow run` for spec overrides like "train.steps=10"."""
    return [flag for item in items for flag in ("--set", item)]


def stop(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group (what it started too, even if it has exited), SIGKILL if it
    has not exited after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@pytest.fixture(scope="session")
def prefect_server():
    """One real temporary Prefect server (own sqlite database) for every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(autouse=True)
def _project_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Specs name data relative to the project folder, as a user running from it would."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"

"""`adaptflow ui`: real MLflow and Prefect servers on free loopback ports, stopped by Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import DEMO, ROOT, TINY_TRAINING, cli_overrides

pytestmark = pytest.mark.slow

ADAPTFLOW = Path(sys.executable).parent / "adaptflow"
FLOW_RUN = "0a6b4c1e-8f2e-4a6e-9a55-3d7e2c9f1b20"


def get(url: str) -> tuple[int, bytes]:
    """The status and body a browser gets (Prefect serves its pages to HTML navigations only)."""
    request = urllib.request.Request(url, headers={"Accept": "text/html,application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def refuses(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_ui_serves_both_on_free_ports_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("tiny-study")
    parent = client.create_run(
        experiment, tags={"kind": "study", "prefect_flow_run_id": FLOW_RUN}
    ).info.run_id
    with socket.socket() as mlflow_taken, socket.socket() as prefect_taken:
        for taken in (mlflow_taken, prefect_taken):  # the configured ports are busy: both must move
            taken.bind(("127.0.0.1", 0))
            taken.listen()
        busy = {mlflow_taken.getsockname()[1], prefect_taken.getsockname()[1]}
        environment = {
            **os.environ,
            "ADAPTFLOW_HOME": str(tmp_path),  # the project's default store: tmp_path/mlflow.db
            "PREFECT_HOME": str(tmp_path / ".prefect"),
            "ADAPTFLOW_MLFLOW_UI_URL": f"http://127.0.0.1:{mlflow_taken.getsockname()[1]}",
            "PREFECT_SERVER_API_PORT": str(prefect_taken.getsockname()[1]),
        }
        for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
            environment.pop(name, None)
        ui = subprocess.Popen(
            [ADAPTFLOW, "ui", "--study", "tiny-study"],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        servers: list[psutil.Process] = []
        try:
            printed = ""
            while "Ctrl-C stops them." not in printed:
                line = ui.stdout.readline()  # the command gives up by itself after its start-up timeout
                assert line, f"adaptflow ui exited early:\n{printed}"
                printed += line
            servers = psutil.Process(ui.pid).children(recursive=True)
            urls = re.findall(r"http://\S+", printed)
            mlflow, prefect = (re.match(r"http://127\.0\.0\.1:(\d+)", url)[0] for url in (urls[0], urls[3]))
            assert urls == [
                f"{mlflow}/#/experiments/{experiment}/runs?workflowType=machine_learning",
                f"{mlflow}/#/experiments/{experiment}/runs/{parent}?workflowType=machine_learning",
                f"{mlflow}/#/experiments/{experiment}/models?workflowType=machine_learning",
                f"{prefect}/v2/runs?flow-run-search=tiny-study",
                f"{prefect}/v2/runs/flow-run/{FLOW_RUN}?tab=Artifacts",
            ]
            assert not busy & {int(mlflow.rsplit(":", 1)[1]), int(prefect.rsplit(":", 1)[1])}
            assert all(get(url)[0] == 200 for url in urls)
            # MLflow serves this project's store, and Prefect's UI calls its own API, not :4200
            status, body = get(f"{mlflow}/api/2.0/mlflow/runs/get?run_id={parent}")
            assert status == 200 and json.loads(body)["run"]["info"]["experiment_id"] == experiment
            assert json.loads(get(f"{prefect}/ui-settings")[1])["api_url"] == f"{prefect}/api"

            # a study run meanwhile uses the UI's Prefect server: none of its own, and it shows there;
            # in worker processes, whose logs and events a thread without the flow's settings forwards
            assert "Studies run meanwhile use this Prefect server" in printed
            overrides = [*TINY_TRAINING, "seeds=[0]", "target=[webcam]", "episodes.shots=[1]"]
            overrides += ["episodes.eval_episodes=10", "algorithms=[{name: protonet}]", "name=tiny-study"]
            command = [ADAPTFLOW, "run", str(DEMO), *cli_overrides(*overrides), "--workers", "2"]
            done = subprocess.run(
                command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert f"using the Prefect server of `adaptflow ui`, {prefect}/api" in done.stderr
            assert "Starting temporary server" not in done.stderr
            request = urllib.request.Request(f"{prefect}/api/flow_runs/filter", data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=10) as response:
                names = [run["name"] for run in json.loads(response.read())]
            assert any(name.startswith("tiny-study") for name in names), names

            ui.send_signal(signal.SIGINT)
            assert ui.wait(30) == 0
            assert not (tmp_path / ".cache" / "ui" / "prefect-api.json").exists()  # runs start their own
            _, alive = psutil.wait_procs(servers, timeout=10)
            assert not alive, f"left running: {[process.cmdline() for process in alive]}"
            assert refuses(int(mlflow.rsplit(":", 1)[1])) and refuses(int(prefect.rsplit(":", 1)[1]))
        finally:  # on a failure above: SIGTERM stops the servers as Ctrl-C does
            if ui.poll() is None:
                ui.terminate()
                ui.wait(30)
            for process in servers:
                if process.is_running():
                    process.kill()

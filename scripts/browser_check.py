"""Checks in a real browser that `adaptflow ui` lands where it says, and saves screenshots to docs/.

Runs a tiny demo study in a throw-away project folder, starts `adaptflow ui` on it, opens the URLs it
prints in headless Chromium (Debian's `chromium`: `apt-get install -y chromium`), checks that each
rendered page shows what it should, and writes docs/screenshots/*.png. Not part of the test suite:
it needs the system browser and takes a few minutes.

    .venv/bin/python scripts/browser_check.py [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTFLOW = Path(sys.executable).parent / "adaptflow"
SCREENSHOTS = ROOT / "docs" / "screenshots"
TINY = [
    "train.steps=20",
    "train.val_every=10",
    "train.val_episodes=20",
    "episodes.eval_episodes=30",
    "seeds=[0, 1]",
    "algorithms=[{name: protonet}, {name: finetune, adapt_steps: 20}]",
]
# (printed line's label, screenshot, its height, text the rendered page must show)
PAGES = [
    ("MLflow", "mlflow-runs-table.png", 1000, ["study·office-caltech-demo", "matching runs"]),
    (
        "latest run of",
        "mlflow-parent-run.png",
        2000,
        ["acc/protonet/webcam/1shot", "finetune", "Description"],
    ),
    ("its models", "mlflow-models.png", 1000, ["protonet·seed0·model", "finetune·seed1·model"]),
    ("Prefect", "prefect-flow-runs.png", 1000, ["office-caltech-demo·webcam+dslr"]),
    (
        "its flow run",
        "prefect-flow-run.png",
        1300,
        ["study-results", "mlflow-office-caltech-demo-webcam-dslr"],
    ),
]


def chromium(*arguments: str) -> str:
    """Headless Chromium on a page, long enough (virtual time) for the single-page apps to load."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs Chromium: apt-get install -y chromium")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += ["--virtual-time-budget=20000", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def check(project: Path) -> list[str]:
    """Runs the study and the UIs in `project`; returns the problems found (none: all pages right)."""
    environment = {**os.environ, "ADAPTFLOW_HOME": str(project), "PREFECT_HOME": str(project / ".prefect")}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        environment.pop(name, None)
    if not (project / "mlflow.db").exists():  # a kept folder's study is reused
        overrides = [flag for item in TINY for flag in ("--set", item)]
        subprocess.run(
            [ADAPTFLOW, "run", "studies/demo.yaml", *overrides], cwd=ROOT, env=environment, check=True
        )
    ui = subprocess.Popen(
        [ADAPTFLOW, "ui"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        printed = ""
        while "Ctrl-C stops them." not in printed:
            line = ui.stdout.readline()
            if not line:
                raise SystemExit(f"adaptflow ui exited:\n{printed}")
            printed += line
        print(printed, end="")
        problems = []
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for label, screenshot, height, expected in PAGES:
            url = re.search(rf"^\s*{label}.*?(http://\S+)", printed, re.MULTILINE)[1]
            chromium(f"--window-size=1600,{height}", f"--screenshot={SCREENSHOTS / screenshot}", url)
            page = chromium("--window-size=1600,1000", "--dump-dom", url)
            missing = [text for text in expected if text not in page]
            if missing:
                problems.append(f"{url}: {missing} not on the page")
            print(f"{screenshot}: {'missing ' + str(missing) if missing else 'ok'}")
        return problems
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep", type=Path, default=None, help="project folder to keep and reuse (default: temporary)"
    )
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        problems = check(args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="adaptflow-browser-") as folder:
            problems = check(Path(folder))
    print("\n".join(problems) or f"all pages show what they should; screenshots in {SCREENSHOTS}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

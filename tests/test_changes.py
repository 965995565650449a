"""What changed since the previous run of a spec: moves beyond the intervals are reported, noise is not."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.changes import accuracy_changes, changes_markdown, speed_changes
from tests.conftest import DEMO


def summary(**accuracies: tuple[float, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"algorithm": name, "target": "webcam", "shots": 5, "acc": acc, "ci95": ci, "seeds": 3}
            for name, (acc, ci) in accuracies.items()
        ]
    )


def test_an_accuracy_that_moved_beyond_both_intervals_is_reported() -> None:
    before = summary(protonet=(0.60, 0.02), finetune=(0.55, 0.03))
    after = summary(protonet=(0.62, 0.02), finetune=(0.45, 0.03))  # +2 within 2.8 (sqrt 2 x 2); -10 not
    (change,) = accuracy_changes(before, after)
    assert change.cell == "finetune · webcam · 5-shot" and change.what == "accuracy %"
    assert (change.before, change.after) == pytest.approx((55.0, 45.0))
    assert change.allowed == pytest.approx(100 * (0.03**2 * 2) ** 0.5)


def runs(seconds: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"algorithm": "protonet", "seed": seed, "train_seconds": value, "eval_seconds": 1.0 + seed / 100}
            for seed, value in seconds.items()
        ]
    )


def test_training_time_moved_beyond_the_seeds_spread_is_reported() -> None:
    steady = runs({0: 10.0, 1: 11.0, 2: 10.5})
    assert speed_changes(steady, runs({0: 10.4, 1: 10.6, 2: 11.0})) == []  # within the spread
    (slower,) = speed_changes(steady, runs({0: 30.0, 1: 31.0, 2: 29.0}))
    assert slower.what == "training s" and slower.before == pytest.approx(10.5) and slower.after == 30.0
    one_seed = (
        speed_changes(runs({0: 10.0}), runs({0: 14.0})),
        speed_changes(runs({0: 10.0}), runs({0: 16.0})),
    )
    assert one_seed[0] == [] and [c.what for c in one_seed[1]] == ["training s"]  # by more than half


def test_the_artifact_says_nothing_moved_or_lists_what_did() -> None:
    from adaptflow.spec import load_spec

    spec = load_spec(DEMO)
    assert "Nothing moved beyond its interval" in changes_markdown(spec, "abc", [])
    before, after = summary(protonet=(0.6, 0.01)), summary(protonet=(0.4, 0.01))
    text = changes_markdown(spec, "abc", accuracy_changes(before, after))
    assert (
        "1 moved beyond their intervals" in text
        and "| accuracy % | protonet · webcam · 5-shot | 60.0 | 40.0 |" in text
    )


def test_the_documented_automation_is_a_valid_prefect_automation() -> None:
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    from tasks.changes import CHANGED_EVENT
    from tests.conftest import ROOT

    raw = yaml.safe_load((ROOT / "deploy" / "automations" / "study-changed.yaml").read_text())
    raw["actions"][0]["block_document_id"] = "00000000-0000-0000-0000-000000000000"  # the user's block
    automation = AutomationCore.model_validate(raw)
    assert automation.trigger.expect == {CHANGED_EVENT}

"""Fixed episodes read from the data (data.fixed_episodes): Lake et al.'s 20 official Omniglot one-shot
runs are scored as published, each run's training images the support set and its test images the
queries; malformed episodes and a spec that asks for another shape are clear errors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from adaptflow.errors import StudyError
from adaptflow.spec import load_spec
from metalib import FixedEpisodes, fixed_episode_problems
from tasks.evaluate import evaluate_model
from tasks.prepare import check_episode_shapes, prepare
from tasks.train import LearnerSetup, TrainedModel
from tests.conftest import ROOT

RUNS = ROOT / "data" / "omniglot" / "one_shot_runs.parquet"
BACKGROUND = ROOT / "data" / "omniglot" / "background"


def omniglot_spec(*overrides: str):
    domains = {
        alphabet: {"path": "parquet", "data_files": str(BACKGROUND / f"{alphabet}.parquet")}
        for alphabet in ("Tagalog", "Early_Aramaic")
    }
    domains["runs"] = {"path": "parquet", "data_files": str(RUNS)}
    raw = {
        "name": "omniglot-runs",
        "data": {
            "input": "pixels",
            "modality": "image",
            "channels": 1,
            "domains": domains,
            "fixed_episodes": {"episode": "run", "role": "role", "support": "training", "query": "test"},
        },
        "source": ["Tagalog", "Early_Aramaic"],
        "target": ["runs"],
        "episodes": {"ways": 20, "shots": [1], "queries": 1},
        "algorithms": [{"name": "protonet"}],
    }
    return load_spec(raw, overrides)


def test_fixed_episodes_follow_the_episode_and_role_columns() -> None:
    y = torch.tensor([3, 4, 3, 4, 3, 7, 8, 7, 8, 8, 8])
    episode = torch.tensor([2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1])
    support = torch.tensor([1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1]).bool()
    x = torch.arange(len(y), dtype=torch.float32).unsqueeze(1)
    with pytest.raises(ValueError, match=r"episode 1 has \[1, 3\] support rows per class"):
        FixedEpisodes(x, y, episode, support)
    support[9:] = False  # episode 1: one support row per class, four queries
    episodes = FixedEpisodes(x, y, episode, support)
    assert len(episodes) == 2 and episodes.shapes() == {(2, 1)}
    first = episodes.sample(10)  # episode 1 first; episode 2 has other query counts, so a batch apart
    assert first.num_tasks == 1
    assert first.support_x.flatten().tolist() == [5, 6] and first.support_y.tolist() == [[0, 1]]
    assert first.query_x.flatten().tolist() == [7, 8, 9, 10] and first.query_y.tolist() == [[0, 1, 1, 1]]
    assert first.classes.tolist() == [[7, 8]]
    second = episodes.sample(10)
    assert second.support_x.flatten().tolist() == [0, 1] and second.query_y.tolist() == [[0, 1, 0]]
    with pytest.raises(ValueError, match="all 2 fixed episodes have been used"):
        episodes.sample(1)
    no_support = fixed_episode_problems(y, episode, torch.tensor([0, 1, 0, 0, 0] + [1] * 2 + [0] * 4).bool())
    assert no_support == [
        "episode 2 has 1 support class(es) and 4 query row(s); it needs 2 or more classes and a query"
    ]
    stray = fixed_episode_problems(
        torch.tensor([0, 1, 2, 0, 1]), torch.zeros(5, dtype=torch.long), torch.tensor([1, 1, 0, 0, 0]).bool()
    )
    assert stray == ["episode 0 has queries of class(es) [2] without support rows"]


def test_the_official_one_shot_runs_are_scored_as_published(tmp_path) -> None:
    spec = omniglot_spec()
    prepared = prepare(spec.data, spec.source, spec.target, cache=tmp_path)
    check_episode_shapes(spec, prepared)
    target = prepared.targets["runs"]
    assert len(target) == 800 and prepared.duplicates_dropped["runs"] == 0
    assert "runs" not in prepared.missing_classes  # run-local labels 0-19 are not the alphabets' classes

    setup = LearnerSetup.from_spec(spec, spec.algorithms[0], prepared)
    torch.manual_seed(0)
    learner = setup.build().eval()  # untrained: scoring, not learning, is under test
    trained = TrainedModel(learner.state_dict(), history=None, seconds=0.0)  # type: ignore[arg-type]
    evaluation = evaluate_model.fn(
        setup, trained, target, shots=1, queries=1, episodes=600, episode_seed=0, device="cpu"
    )
    assert len(evaluation.accuracies) == 20  # every run once, whatever eval_episodes says

    # The reference reads run and role from the parquet file itself: support = the run's 20 training
    # images, queries = its 20 test images, each test image scored against the 20 classes of its run.
    rows = pd.read_parquet(RUNS, columns=["run", "role", "label"])
    expected = []
    for run in range(1, 21):
        support = rows.index[(rows.run == run) & (rows.role == "training")].to_numpy()
        query = rows.index[(rows.run == run) & (rows.role == "test")].to_numpy()
        support = support[rows.label.to_numpy()[support].argsort()]
        predict = learner.adapt_batch(target.x[support][None], torch.arange(20)[None])
        predicted = predict(target.x[query][None]).argmax(-1)[0]
        expected.append((predicted == torch.tensor(rows.label.to_numpy()[query])).float().mean())
    assert torch.allclose(evaluation.accuracies, torch.stack(expected))
    assert all(float(a * 20).is_integer() for a in evaluation.accuracies)


def test_a_spec_that_asks_another_shape_than_the_fixed_episodes_is_an_error(tmp_path) -> None:
    spec = omniglot_spec("episodes.shots=[1,5]")
    prepared = prepare(spec.data, spec.source, spec.target, cache=tmp_path)
    with pytest.raises(
        StudyError, match=r"fixed episodes of ways \[20\] and shots \[1\].*episodes.shots: \[1\]"
    ):
        check_episode_shapes(spec, prepared)
    spec = omniglot_spec("data.fixed_episodes.support=train")
    with pytest.raises(
        StudyError, match=r"column 'role' holds \['training'\], neither the support value 'train'"
    ):
        prepare(spec.data, spec.source, spec.target, cache=tmp_path)
    with pytest.raises(StudyError, match="target_unlabelled_fraction cannot hold rows out of fixed episodes"):
        omniglot_spec("data.target_unlabelled_fraction=0.2")

"""Progress artifacts: a user watching the Prefect UI sees the last counts, without a request per task."""

from __future__ import annotations

import threading
import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

from tasks.progress import ProgressArtifact, StudyProgress


def _shown(progress: ProgressArtifact) -> tuple[float, str]:
    """What the Prefect server holds for the artifact: its progress and description."""
    with get_client(sync_client=True) as client:
        artifact_filter = ArtifactFilter(id=ArtifactFilterId(any_=[progress.artifact_id]))
        (artifact,) = client.read_artifacts(artifact_filter=artifact_filter)
    return artifact.data, artifact.description


def test_progress_updates_close_together_are_dropped_but_the_last_and_forced_ones_land(
    prefect_server: None,
) -> None:
    """A cached rerun finishes dozens of tasks within a second; each update sent would cost the flow's
    thread a request to the server. Updates within `MIN_INTERVAL` of the last one sent are dropped,
    except a forced one and the last (done == total), so the UI still ends on the true counts; one
    after the interval is sent."""

    @flow
    def watched() -> list[tuple[float, str]]:
        progress = ProgressArtifact(10, "counting")
        for done in range(1, 10):  # within microseconds of the artifact's creation
            progress.update(done, f"{done}/10")
        shown = [_shown(progress)]
        progress.update(5, "5/10, forced", force=True)
        shown.append(_shown(progress))
        progress.MIN_INTERVAL = 0.2
        time.sleep(0.3)
        progress.update(7, "7/10, later")
        shown.append(_shown(progress))
        progress.update(10, "10/10")
        shown.append(_shown(progress))
        return shown

    assert watched() == [(0.0, "counting"), (50.0, "5/10, forced"), (70.0, "7/10, later"), (100.0, "10/10")]


@task(cache_policy=NO_CACHE)
def _held(release: threading.Event) -> None:
    release.wait(60)


def _counted(study: StudyProgress, done: int) -> None:
    """Until the done-callbacks have counted `done` trainings (they run after a future's waiters wake)."""
    deadline = time.monotonic() + 30
    while study.done["trainings"] < done:
        assert time.monotonic() < deadline, study.counts()
        time.sleep(0.01)


def test_the_study_progress_is_sent_before_the_flow_waits_on_a_task(prefect_server: None) -> None:
    """The study flow publishes its counts before it waits on an item's futures. An update dropped
    there would show for the whole wait (a training can take an hour), so it is sent when one of them
    is not done, and dropped as usual when they all are; the final counts are sent on exit."""

    @flow
    def watched() -> list[tuple[float, str]]:
        releases = [threading.Event() for _ in range(3)]
        futures = [_held.submit(release) for release in releases]
        with StudyProgress("study", futures, []) as study:
            study.artifact.MIN_INTERVAL = 3600.0  # every update from now on is close to the last one
            releases[0].set()
            _counted(study, 1)
            study.publish(waiting_on=[futures[1]])  # not done: sent
            shown = [_shown(study.artifact)]
            releases[1].set()
            futures[1].wait()
            _counted(study, 2)
            study.publish(waiting_on=[futures[1]])  # done: dropped
            shown.append(_shown(study.artifact))
            releases[2].set()
            _counted(study, 3)
        shown.append(_shown(study.artifact))
        return shown

    one, three = "study: 1/3 trainings, 0/0 evaluations", "study: 3/3 trainings, 0/0 evaluations"
    assert watched() == [(100 / 3, one), (100 / 3, one), (100.0, three)]

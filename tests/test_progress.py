"""Progress artifacts: a user watching the Prefect UI sees the last counts, without a request per task."""

from __future__ import annotations

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

from tasks.progress import ProgressArtifact


def _shown(progress: ProgressArtifact) -> tuple[float, str]:
    """What the Prefect server holds for the artifact: its progress and description."""
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[progress.artifact_id]))
        )
    return artifact.data, artifact.description


def test_progress_updates_close_together_are_dropped_but_the_last_and_forced_ones_land(
    prefect_server: None,
) -> None:
    """A cached rerun finishes dozens of tasks within a second; each update sent would cost the flow's
    thread a request to the server. Updates within `MIN_INTERVAL` of the last one sent are dropped,
    except a forced one and the last (done == total), so the UI still ends on the true counts."""

    @flow
    def watched() -> list[tuple[float, str]]:
        progress = ProgressArtifact(10, "counting")
        for done in range(1, 10):  # within microseconds of the artifact's creation
            progress.update(done, f"{done}/10")
        shown = [_shown(progress)]
        progress.update(5, "5/10, forced", force=True)
        shown.append(_shown(progress))
        progress.update(10, "10/10")
        shown.append(_shown(progress))
        return shown

    assert watched() == [(0.0, "counting"), (50.0, "5/10, forced"), (100.0, "10/10")]

"""Progress a user can watch: Prefect progress artifacts, and one bar for a whole study.

A study's trainings and evaluations finish in any order (processes, Dask), while the flow logs
them in submission order; so the study's counts move when a task finishes, from the futures'
done-callbacks, not when the flow gets round to logging it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, PrefectWrappedFuture
from tqdm.auto import tqdm

from tasks.stopping import interruption_behind


class ProgressArtifact:
    """A progress artifact on the current flow or task run: `done` of `total`, with a description.

    Each update is a request to the Prefect server that the calling thread waits for (25 ms on a
    2-core machine), and a study whose tasks come from the cache finishes dozens of them within a
    second: an update less than `MIN_INTERVAL` seconds after the last one sent is dropped, unless it
    is the last (`done` reaches `total`) or forced; one that changes nothing is never sent.
    """

    MIN_INTERVAL = 1.0  # seconds

    def __init__(self, total: int, description: str) -> None:
        self.total = max(total, 1)
        self.artifact_id = create_progress_artifact(progress=0.0, description=description)
        self.sent: tuple[float, str | None] = (0.0, description)
        self.sent_at = time.monotonic()

    def update(self, done: int, description: str | None = None, force: bool = False) -> None:
        progress = 100.0 * min(done, self.total) / self.total
        soon = time.monotonic() - self.sent_at < self.MIN_INTERVAL
        if (progress, description) == self.sent or (soon and progress < 100.0 and not force):
            return
        update_progress_artifact(self.artifact_id, progress=progress, description=description)
        self.sent, self.sent_at = (progress, description), time.monotonic()


class StudyProgress:
    """Trainings and evaluations of one study, done of all: a terminal bar with an ETA (when the
    terminal is a TTY) and a progress artifact on the flow run, so the Prefect UI shows it too.

    The ETA counts a training and an evaluation as one unit each, so it is rough at first.
    """

    def __init__(
        self, name: str, trainings: Iterable[PrefectFuture[Any]], evaluations: Iterable[PrefectFuture[Any]]
    ) -> None:
        futures = {"trainings": list(trainings), "evaluations": list(evaluations)}
        self.name = name
        self.total = {kind: len(items) for kind, items in futures.items()}
        self.done = dict.fromkeys(futures, 0)
        self.lock = threading.Lock()
        self.bar = tqdm(total=sum(self.total.values()), desc=name, unit="task", disable=None)
        self.artifact = ProgressArtifact(sum(self.total.values()), f"{name}: {self.counts()}")
        for kind, items in futures.items():
            for future in items:
                future.add_done_callback(lambda _, kind=kind: self.finished(kind))

    def counts(self) -> str:
        return ", ".join(f"{self.done[kind]}/{self.total[kind]} {kind}" for kind in self.total)

    def finished(self, kind: str) -> None:
        """Called from whichever thread completes the future: only counts and redraws the bar."""
        with self.lock:
            self.done[kind] += 1
            self.bar.set_postfix_str(self.counts(), refresh=False)
            self.bar.update(1)

    def publish(self, waiting_on: Iterable[PrefectFuture[Any]] = (), force: bool = False) -> None:
        """Moves the flow run's progress artifact to the counts so far (from the flow's own thread,
        which holds the Prefect client context), at most once a second unless `force`d or about to
        wait on futures that are not done: a dropped update would show for the whole wait."""
        with self.lock:
            done, counts = sum(self.done.values()), self.counts()
        force = force or not all(map(_finished, waiting_on))
        self.artifact.update(done, f"{self.name}: {counts}", force)

    def __enter__(self) -> StudyProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        """Publishes the final counts unless the study was interrupted: the interruption may have left
        the Prefect client half-way through a request."""
        if error is None or (isinstance(error, Exception) and interruption_behind(error) is None):
            self.publish(force=True)
        self.bar.close()


def _finished(future: PrefectFuture[Any]) -> bool:
    """Whether the future is done, without a request to the Prefect server (its `state` makes one
    until it has the final state); a future of another kind counts as not done."""
    return isinstance(future, PrefectWrappedFuture) and future.wrapped_future.done()

"""The study's stop request, set when a study is interrupted (Ctrl-C, SIGTERM) by
flows/study.py:ended_if_stopped, cleared when the next study starts and when `adaptflow run` ends.

With `--workers 1` the study's tasks are threads of the study process, which Python cannot kill, and
Prefect's engine waits for them before the interruption ends the process. They check this event
between training steps and evaluation chunks, so an interrupted study ends within a step (a training
checkpoints first) instead of after the task it was running. Worker processes (`--workers 2` or more)
are terminated instead (flows/study.py:StudyProcessPool).
"""

import contextlib
import gc
import threading
from collections.abc import Iterator

from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled, State
from prefect.transactions import get_transaction

from metalib.evaluation import Stopped

# Tasks read it as `stopping.STOP_REQUESTED`: a task's module attribute is the Prefect Task, not its
# function, so cloudpickle sends the function to a worker process by value, with the globals it
# names, and an Event cannot be pickled (a module can).
STOP_REQUESTED = threading.Event()


def cancelled(stopped: Stopped) -> State:
    """What a task stopped by the request returns: a Cancelled state saying where it stopped. Raised,
    `Stopped` would end the task Failed with a traceback in the log, for what the user asked for.

    Prefect would store a returned state's (empty) result under the task's cache key, and the rerun
    would take it for a finished task: the task's transaction is told not to write it."""
    transaction = get_transaction()
    if transaction is not None:
        transaction.write_on_commit = False
    return Cancelled(message=str(stopped))


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it was raised from or while handling (causes and contexts), once
    each: `raise interruption` from inside a handler can make the chain a cycle."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        link = pending.pop()
        if link is not None and id(link) not in seen:
            seen.add(id(link))
            yield link
            pending += [link.__context__, link.__cause__]


def interruption_behind(error: BaseException) -> BaseException | None:
    """The interruption (Ctrl-C's KeyboardInterrupt, or Prefect's TerminationSignal for SIGTERM) that
    `error` was raised while handling, if any. A clean-up that fails on the way out of an interrupted
    block (an HTTP client or a database session the interruption left half-way) replaces the
    interruption with its own error. Other BaseExceptions in the chain (a task's CancelledError behind
    a timeout, GeneratorExit, SystemExit) are no interruption."""
    interruptions = (
        link for link in exception_chain(error) if isinstance(link, KeyboardInterrupt | TerminationSignal)
    )
    return next(interruptions, None)


def release_frames(error: BaseException) -> None:
    """Frees the frames `error` passed through, and those of the exceptions chained to it. Python
    raises a signal's exception between any two bytecodes, also in the middle of an MLflow query, and
    the query's sqlite statement, referenced from those frames, keeps the store locked: a read's lock
    outlives the session's rollback. Every later write of this process then waited out sqlite's 20 s
    busy timeout and failed "database is locked" (seen in CI; docs/reliability.md).

    Clearing the frames' local variables is not enough: a cleared frame keeps its function, and a
    closure over the query's cursor with it (SQLAlchemy's loaders have such closures), and the head of
    the traceback stays referenced while the interruption is handled (a `with` statement hands it to
    `__exit__`). So each traceback entry is also cut from the next, which frees the inner frames."""
    for link in exception_chain(error):
        entry = link.__traceback__
        while entry is not None:
            with contextlib.suppress(RuntimeError):  # a frame still running: this one's callers
                entry.tb_frame.clear()
            entry.tb_next, entry = None, entry.tb_next
    gc.collect()

"""The study's stop request, set when a study is interrupted (Ctrl-C, SIGTERM) by
flows/study.py:ended_if_stopped, cleared when the next study starts and when `adaptflow run` ends.

With `--workers 1` the study's tasks are threads of the study process, which Python cannot kill, and
Prefect's engine waits for them before the interruption ends the process. They check this event
between training steps and evaluation chunks, so an interrupted study ends within a step (a training
checkpoints first) instead of after the task it was running. Worker processes (`--workers 2` or more)
are terminated instead (flows/study.py:StudyProcessPool).
"""

import threading

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

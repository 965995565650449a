"""The study's stop request, set when a study is interrupted (Ctrl-C, SIGTERM) by
flows/study.py:ended_if_stopped, cleared when the next study starts and when `adaptflow run` ends.

With `--workers 1` the study's tasks are threads of the study process, which Python cannot kill, and
Prefect's engine waits for them before the interruption ends the process. They check this event
between training steps and evaluation chunks, so an interrupted study ends within a step (a training
checkpoints first) instead of after the task it was running. Worker processes (`--workers 2` or more)
are terminated instead (flows/study.py:StudyProcessPool).
"""

import threading

# Tasks read it as `stopping.STOP_REQUESTED`: a task's module attribute is the Prefect Task, not its
# function, so cloudpickle sends the function to a worker process by value, with the globals it
# names, and an Event cannot be pickled (a module can).
STOP_REQUESTED = threading.Event()

"""Training checkpoints kept in a task's result storage, named after the task's cache key.

A task run that dies (SIGKILL, a lost worker, a retry) leaves its latest checkpoint where its result
would have gone; the next run with the same inputs and code has the same key, finds it and resumes.
On a local or shared file system a checkpoint is written to a unique temporary file and renamed
over the old one, so a reader never sees half a checkpoint; remote storage blocks write whole objects.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem, WritableFileSystem

from metalib.training import Checkpoint

logger = logging.getLogger(__name__)


class CheckpointStore:
    """The checkpoint of one task's inputs: `<cache key>.checkpoint` in its result storage."""

    def __init__(self, storage: WritableFileSystem, key: str) -> None:
        self.storage = storage
        self.key = f"{key}.checkpoint"
        self.path = (
            Path(storage.basepath).expanduser() / self.key if isinstance(storage, LocalFileSystem) else None
        )

    @classmethod
    def of_current_task(cls) -> CheckpointStore:
        """The store of the running task: its cache key, its result storage."""
        context = TaskRunContext.get()
        if context is None or context.result_store is None or context.result_store.result_storage is None:
            raise RuntimeError("checkpoints are kept by a running Prefect task with result storage")
        key = context.task.cache_policy.compute_key(context, context.parameters, {})
        return cls(context.result_store.result_storage, key)

    def load(self) -> Checkpoint | None:
        """The latest checkpoint, or None when there is none or it cannot be read (with a warning)."""
        try:
            if self.path is not None:
                if not self.path.exists():
                    return None
                data = self.path.read_bytes()
            else:
                data = self.storage.read_path(self.key)
        except (OSError, ValueError) as exc:  # remote stores differ in how they say "missing"
            logger.info("no checkpoint %s: %s", self.key, exc)
            return None
        try:
            return Checkpoint.from_bytes(data)
        except Exception as exc:  # a truncated or foreign file: train from the start instead
            logger.warning("ignoring unreadable checkpoint %s (%s); training from the start", self.key, exc)
            return None

    def save(self, checkpoint: Checkpoint) -> None:
        data = checkpoint.to_bytes()
        if self.path is None:
            self.storage.write_path(self.key, data)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.key}.")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def remove(self) -> None:
        """Called once the training is done (its result is persisted next). Remote storage blocks
        have no delete: there the last checkpoint stays, and a recomputation resumes from it."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

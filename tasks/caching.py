"""A Prefect cache policy whose keys are stable across processes for tensor-carrying inputs.

Prefect's INPUTS policy hashes inputs with cloudpickle, and pickled tensors differ from
one process to the next, so a rerun would never hit the cache. Here tensors are hashed
by their bytes, dataclasses and pydantic models field by field, and training histories by a digest
of their JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

import metalib
from metalib import TrainingHistory


def stable_token(value: Any) -> Any:
    """A JSON-able stand-in for `value` that is equal across processes when the data is."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        return ["tensor", str(data.dtype), list(data.shape), digest]
    if isinstance(value, BaseModel):
        return [type(value).__qualname__, value.model_dump(mode="json")]
    if isinstance(value, TrainingHistory):  # not a dataclass (metalib.training says why); a digest of
        # its JSON, 10x quicker than a token per (step, value) pair for each evaluation's key
        text = json.dumps(value.to_dict(), sort_keys=True)
        return [type(value).__qualname__, hashlib.sha256(text.encode()).hexdigest()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {field.name: stable_token(getattr(value, field.name)) for field in dataclasses.fields(value)}
        return [type(value).__qualname__, fields]
    if isinstance(value, dict):
        return {str(key): stable_token(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [stable_token(item) for item in value]
    return value


@dataclasses.dataclass
class StableInputs(CachePolicy):
    """Like Prefect's INPUTS, over `stable_token` of each input not in `exclude`.

    Not a subclass of prefect's Inputs: compound policies replace those with plain Inputs.
    """

    exclude: list[str] = dataclasses.field(default_factory=list)

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        tokens = {name: stable_token(value) for name, value in inputs.items() if name not in self.exclude}
        return hash_objects(tokens, code_version(), raise_on_failure=True)


@functools.cache
def code_version() -> str:
    """A digest of metalib's and tasks' source: results computed by other learner, backbone or task
    code (a task's helper functions included, which TASK_SOURCE does not see) are not reused."""
    digest = hashlib.sha256()
    for root in (Path(metalib.__file__).parent, Path(__file__).parent):
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}".encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def stable_inputs(*exclude: str) -> CachePolicy:
    """Cache on the task's inputs (but `exclude`), its source code and the source of metalib and tasks."""
    return StableInputs(exclude=list(exclude)) + TASK_SOURCE

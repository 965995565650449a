"""Modalities: how the input column of each kind of data (feature vectors, text, images) becomes tensors.

One file per modality, `tasks/modalities/<name>.py`: a `Modality` subclass registered with
`@REGISTRY.register("<name>")`, as learners are. What the spec must know of a modality (its name, its
default backbone, the `data` keys it reads) is its row in `adaptflow.spec.MODALITIES`, the one list of
modality names: a spec is checked before PyTorch and `datasets` load, so it cannot import the files
here. A modality's file is imported when the row's name is first asked for, so adding a modality is
its file here and its row there (with its `data` keys in `DataSpec`, if it reads new ones).
"""

from __future__ import annotations

import inspect
from importlib import import_module
from pathlib import Path
from typing import Any

from adaptflow.spec import MODALITIES
from tasks.modalities.base import REGISTRY, Modality


def get(name: str) -> Modality:
    """The modality named in MODALITIES; its file is imported on first use (unless registered already)."""
    if name not in REGISTRY.names():
        import_module(f"{__name__}.{name}")
    return REGISTRY.get(name)()


def detect(feature: Any) -> str | None:
    """The modality whose columns have this `datasets` feature type, first in MODALITIES if several."""
    return next((name for name in MODALITIES if get(name).claims(feature)), None)


def source_files() -> list[Path]:
    """The code that shapes prepared tensors: this package and the metalib modules modalities use."""
    used = {Path(inspect.getfile(module)) for name in MODALITIES for module in get(name).uses}
    return sorted(Path(__file__).parent.glob("*.py")) + sorted(used)

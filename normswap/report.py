"""Report objects shared by every job.

Every job returns a report with ``to_dict()`` (JSON-serialisable),
``summary_line()`` (the one-line PASSED/FAILED summary printed last by the
CLI) and, for pass/fail jobs, ``__bool__``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any


def jsonable(obj: Any) -> Any:
    """Convert dataclasses, tensors, numpy values, paths and non-finite floats to JSON data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return jsonable(obj.to_dict())
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    # torch / numpy scalars and small tensors
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return jsonable(item())
    return str(obj)


class Report:
    """Base class of all reports.

    Subclasses are dataclasses; they override ``to_dict`` when the default
    (all fields) is not the wanted shape, ``passed`` for pass/fail jobs, and
    ``summary_line``.
    """

    #: the job name shown in the summary line ("audit", "fold", ...)
    job: str = "job"

    def to_dict(self) -> dict:
        if dataclasses.is_dataclass(self):
            return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        raise NotImplementedError

    @property
    def passed(self) -> bool:
        return True

    def __bool__(self) -> bool:
        return bool(self.passed)

    def summary_text(self) -> str:
        """What follows PASSED/FAILED in the last line; subclasses override."""
        return ""

    def summary_line(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        text = self.summary_text()
        return f"{status} | normswap {self.job}" + (f" | {text}" if text else "")

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``to_dict()`` as JSON atomically."""
        from normswap.io import atomic_write_bytes

        data = json.dumps(jsonable(self.to_dict()), indent=2, sort_keys=False).encode()
        atomic_write_bytes(Path(path), data + b"\n", force=True)

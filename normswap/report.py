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
        line = f"{status} | normswap {self.job}" + (f" | {text}" if text else "")
        for w in summary_warnings(self):
            line += f" | warning: {w}"
        return line

    def to_json(self, path: str | os.PathLike, *, force: bool = True) -> None:
        """Write ``to_dict()`` as JSON atomically."""
        from normswap.save import atomic_write_bytes

        atomic_write_bytes(Path(path), json_bytes(self), force=force)


def json_bytes(report) -> bytes:
    """The JSON report of ``report``: ``to_dict()`` with ``job`` and ``passed`` always present,
    plus the load notes (``load``) and summary-line warnings (``warnings_summary``) when set."""
    d = jsonable(report.to_dict())
    if not isinstance(d, dict):
        d = {"report": d}
    out = {"job": d.pop("job", getattr(report, "job", "job")),
           "passed": d.pop("passed", bool(getattr(report, "passed", True)))}
    out.update(d)
    load = getattr(report, "load", None)
    if load is not None and "load" not in out:
        out["load"] = jsonable(load)
    warns = summary_warnings(report)
    if warns and "summary_warnings" not in out:
        out["summary_warnings"] = warns
    return json.dumps(out, indent=2, sort_keys=False).encode() + b"\n"


def summary_warnings(report) -> list[str]:
    return list(getattr(report, "_summary_warnings", None) or [])


def add_summary_warning(report, text: str) -> None:
    """A warning shown on the report's summary line (and in its JSON)."""
    warns = getattr(report, "_summary_warnings", None)
    if warns is None:
        warns = []
        object.__setattr__(report, "_summary_warnings", warns)
    if text not in warns:
        warns.append(text)


def attach_load(report, loaded) -> None:
    """Put what loading MODEL did into ``report``: ``report.load`` (JSON ``load``: format,
    missing / unexpected state-dict keys, notes), the notes into ``report.notes`` (or
    ``report.warnings``) and a summary-line warning when tensors were missing (left at the
    factory's initial values) or ignored."""
    if loaded is None:
        return
    missing = list(getattr(loaded, "missing_keys", None) or [])
    unexpected = list(getattr(loaded, "unexpected_keys", None) or [])
    notes = list(getattr(loaded, "notes", None) or [])
    info = {"path": str(getattr(loaded, "path", "") or ""), "format": getattr(loaded, "format", None),
            "missing_keys": missing, "unexpected_keys": unexpected, "notes": notes}
    object.__setattr__(report, "load", info)
    target = getattr(report, "notes", None)
    if not isinstance(target, list):
        target = getattr(report, "warnings", None)
    if isinstance(target, list):
        for n in notes:
            if n not in target:
                target.append(n)
    if missing:
        add_summary_warning(report, f"{_count(len(missing), 'tensor')} missing from the file, left at their "
                                    "initial values (--non-strict)")
    if unexpected:
        add_summary_warning(report, f"{_count(len(unexpected), 'tensor')} of the file ignored (unexpected keys, "
                                    "--non-strict)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")

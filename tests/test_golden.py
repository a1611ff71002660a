"""Golden reports: audit / fold / export on the samples zoo, eager + TorchScript + torch.export,
compared with ``tests/golden/*.json`` (timings, paths and addresses ignored; see
``tests/golden_zoo.py``).  A change here must be a planned one: regenerate with
``python -m tests.golden_zoo NAME`` and list the change in ``notes/CHANGES_issue19.md``."""

from __future__ import annotations

import json

import pytest

from tests import golden_zoo as Z

NAMES = sorted(p.stem for p in Z.GOLDEN.glob("*.json"))


def _diff(a, b, path="$", out=None, limit=12):
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: {'missing' if k not in b else 'new'}")
            else:
                _diff(a[k], b[k], f"{path}.{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out, limit)
    elif a != b:
        out.append(f"{path}: golden {json.dumps(a)[:300]} != now {json.dumps(b)[:300]}")
    return out


def test_zoo_is_pinned():
    assert set(NAMES) == set(Z.zoo()), "regenerate tests/golden with python -m tests.golden_zoo"


@pytest.mark.parametrize("name", NAMES)
def test_golden(name):
    golden = json.loads(Z.golden_path(name).read_text())
    now = json.loads(json.dumps(Z.reports(name, Z.zoo()[name], onnx=Z.onnx_for(name)), sort_keys=True))
    d = _diff(golden, now)
    assert not d, "\n".join(d)

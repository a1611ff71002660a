"""The reason catalogue (normswap/reasons.py) is the only place reason texts are written: every
``reason("code", ...)`` in normswap names a catalogue code, and the texts once re-typed in several
modules ("hooks registered", "already the identity", "is in training mode (...") appear nowhere else."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from normswap.reasons import CATALOGUE, Reason, code_of, join, reason

PKG = Path(__file__).resolve().parent.parent / "normswap"


def _reason_calls():
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("reason", "reason_", "wrap"):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    yield p, node.args[0].value


def test_every_code_used_is_in_the_catalogue():
    missing = [(str(p), c) for p, c in _reason_calls() if c not in CATALOGUE]
    assert missing == []
    assert len({c for _, c in _reason_calls()}) > 60


def test_retyped_reasons_live_only_in_the_catalogue():
    for phrase in ("hooks registered", "already the identity", "is in training mode ("):
        holders = [p.name for p in PKG.rglob("*.py") if phrase in p.read_text()]
        assert holders == ["reasons.py"], (phrase, holders)


def test_a_reason_is_its_text_with_a_code():
    r = reason("norm_hooks")
    assert r == "the norm has hooks registered" and r.code == "norm_hooks" and code_of(r) == "norm_hooks"
    assert json.loads(json.dumps({"reason": r})) == {"reason": "the norm has hooks registered"}
    both = join(r, "its output is unused")
    assert both == "the norm has hooks registered; after it: its output is unused" and both.code == "norm_hooks"
    assert code_of("a plain string") == "other" and code_of(None) is None
    assert isinstance(Reason("x", "y"), str)

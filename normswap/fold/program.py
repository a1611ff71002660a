"""Kept importable: ``fold_program`` / ``plan_program`` for a ``torch.export`` program are the one
fold (:func:`normswap.fold.api.fold_program`) and the one planner on the ATen view."""

from __future__ import annotations

from .api import fold_program, plan

__all__ = ["fold_program", "plan_program"]


def plan_program(ep):
    """What :func:`fold_program` would do with each norm site of ``ep`` (not modified)."""
    return plan(ep)

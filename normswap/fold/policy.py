"""The fold policy at the level of a norm kind: the one answer to "can a norm of this kind,
configured like this, ever be folded?".  ``plan()`` (eager models) asks it first for every
site; the compiled-graph readers (TorchScript, ``torch.export`` programs), which have no
eager module, ask it with the facts they read from the graph.  The per-kind facts come from
the registry (:mod:`normswap.norms`), never from a kind list kept here.
"""

from __future__ import annotations

from normswap.norms import NORMS

__all__ = ["kind_problem", "fold_family"]


def fold_family(kind: str) -> str | None:
    """"bn_like", "affine_only" or None for a kind name."""
    k = NORMS.get(kind)
    return k.fold_family if k is not None else None


def kind_problem(kind: str, module=None, *, type_name: str | None = None, base_name: str | None = None,
                 running_stats: bool | None = None) -> str | None:
    """Why a norm of ``kind`` is never folded whatever its neighbours are (None: it may be)."""
    k = NORMS.get(kind)
    if k is None:
        return f"{kind}: not a foldable norm"
    return k.fold_refusal(module, type_name=type_name, base_name=base_name, running_stats=running_stats)

"""The fold policy at the level of a norm kind: the one answer to "can a norm of this kind,
configured like this, ever be folded?".  ``plan()`` (eager models) asks it first for every
site; the compiled-graph readers (TorchScript, ``torch.export`` programs), which have no
eager module, ask it with the facts they read from the graph.  The per-kind facts come from
the registry (:mod:`normswap.norms`), never from a kind list kept here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from normswap.norms import NORMS

__all__ = ["kind_problem", "fold_family", "GraphFacts", "compiled_decision", "COMPILED_NOTE"]


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


# --------------------------------------------------------------------------- compiled graphs

#: note every compiled-graph verdict carries: the fold itself runs on the eager model
COMPILED_NOTE = "compiled graph: fold the eager model"
#: the rank check's reason (the same text the eager rules give)
RANK_UNKNOWN = "input rank unknown: pass example inputs"

_PRODUCER_PATTERN = {"conv": "conv_bn", "conv_transpose": "convtranspose_bn", "linear": "linear_bn"}
_CONSUMER_OPS = ("conv", "conv_transpose", "linear")


@dataclass
class GraphFacts:
    """What a compiled-graph reader (TorchScript, ``torch.export``) knows about one norm site.

    ``producer_op`` is the producer table's kind ("conv", "conv_transpose", "linear", "input",
    "other") or None when unknown; ``producer`` / ``consumers`` are described like the eager
    rules describe FX nodes (``'conv' (Conv2d)``, ``the graph output``); ``input_ranks`` the
    ranks of the norm's input the graph proves (empty: unknown).
    """

    name: str
    kind: str
    type_name: str | None = None
    base_name: str | None = None
    functional: bool = False
    training: bool | None = None
    model_training: bool | None = None
    running_stats: bool | None = None
    nonfinite: bool = False
    graph: bool = True
    calls: int = 1
    producer_op: str | None = None
    producer_name: str | None = None
    producer: str | None = None
    producer_users: list = field(default_factory=list)
    producer_calls: int = 1
    producer_dims: int | None = None
    consumers: list = field(default_factory=list)
    consumer_ops: list = field(default_factory=list)
    input_ranks: set = field(default_factory=set)


def _batched_ranks(type_name: str | None) -> set[int] | None:
    """Input ranks at which a norm class takes dim 1 as its channel axis (as the eager rule)."""
    if not type_name:
        return None
    if type_name in ("BatchNorm1d", "LazyBatchNorm1d"):
        return {2, 3}
    if type_name in ("InstanceNorm1d", "LazyInstanceNorm1d"):
        return {3}
    if type_name.endswith("2d"):
        return {4}
    if type_name.endswith("3d"):
        return {5}
    return None


def _producer_extra(f: GraphFacts) -> str | None:
    """The producer rules' extra checks (input rank) on what the graph proves."""
    if f.producer_op == "linear":
        ranks = f.input_ranks
        if not ranks:
            return RANK_UNKNOWN
        if ranks != {2}:
            return (f"the norm sees rank-{max(ranks)} input (N, L, C): it normalises dim 1, not the "
                    f"output features (last dim) of '{f.producer_name}'")
        return None
    k = f.producer_dims
    batched = _batched_ranks(f.type_name)
    if k is None:
        return RANK_UNKNOWN if batched is None or not f.input_ranks <= batched else None
    if f.input_ranks:
        if any(r < k + 2 for r in f.input_ranks):
            return (f"'{f.producer_name}' is called on unbatched input: the norm's dim 1 is not its "
                    f"channel axis")
        return None
    if batched is None or (k + 1) in batched:
        return RANK_UNKNOWN
    return None


def _after_it(f: GraphFacts) -> str:
    """What the fold-into-the-next-layer rule would say, as far as the graph shows it."""
    if not f.consumers:
        return "its output is unused"
    for c, op in zip(f.consumers, f.consumer_ops or [None] * len(f.consumers)):
        if op not in _CONSUMER_OPS:
            return f"its output feeds {c}, not a Conv/Linear"
    return f"folding into {f.consumers[0]} cannot be checked in a compiled graph ({COMPILED_NOTE})"


def compiled_decision(f: GraphFacts) -> tuple[str | None, str | None, str | None]:
    """``(into, pattern, reason)`` for a norm read from a compiled graph; reason None = foldable
    (in the eager model).  The kind-level verdict is :func:`kind_problem`, the one ``plan()``
    asks; the structural checks repeat the eager rules' checks with their reason texts.  What
    the graph cannot prove is refused, never assumed."""
    if f.functional:
        if f.kind != "bn":
            return None, None, f"functional {f.kind} norm: only functional batch_norm is folded"
        if f.model_training or f.training:
            return None, None, "the model is in training mode (pass eval=True / --eval)"
        return None, None, f"functional batch_norm: its producer cannot be proven ({COMPILED_NOTE})"
    r = kind_problem(f.kind, type_name=f.type_name, base_name=f.base_name, running_stats=f.running_stats)
    if r:
        return None, None, r
    family = fold_family(f.kind)
    if f.model_training:
        return None, None, "the model is in training mode (pass eval=True / --eval to fold its eval-mode behaviour)"
    if f.training:
        return None, None, "the norm is in training mode (pass eval=True / --eval)"
    if family == "bn_like":
        if f.running_stats is False:
            return None, None, ("track_running_stats=False: it normalises with batch statistics even in eval"
                                if f.kind == "bn" else "InstanceNorm without running statistics")
        if f.nonfinite:
            return None, None, "non-finite statistics (NaN/Inf in running stats or affine, or var + eps <= 0)"
    elif f.nonfinite:
        return None, None, "non-finite affine parameters"
    if not f.graph:
        return None, None, f"its producer cannot be proven ({COMPILED_NOTE})"
    if f.calls < 1:
        return None, None, "not called in the traced graph"
    if family != "bn_like":
        return None, None, f"{f.kind}: its affine can only move into the following Linear ({COMPILED_NOTE})"
    if f.producer_op not in _PRODUCER_PATTERN:
        return None, None, (f"nothing foldable before it (its input is {f.producer or 'unknown'}); "
                            f"after it: {_after_it(f)}")
    r = _producer_problem(f)
    if r:
        after = _after_it(f)
        return None, None, r if after == r else f"{r}; after it: {after}"
    return f.producer_name, _PRODUCER_PATTERN[f.producer_op], None


def _producer_problem(f: GraphFacts) -> str | None:
    if f.calls > 1:
        return f"the norm is called at {f.calls} places ({COMPILED_NOTE})"
    if f.producer_users:
        return (f"the output of '{f.producer_name}' is used by more than one consumer "
                f"({', '.join(f.producer_users)})")
    if f.producer_calls > 1:
        return f"'{f.producer_name}' is called at several places whose call sites differ"
    return _producer_extra(f)

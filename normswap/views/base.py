"""The graph-view protocol: what every front end (FX regions of an eager model, the ATen graph of a
``torch.export`` program, a TorchScript graph) tells the fold planner about a norm site.

A view lists its sites (:class:`NormSite`: norm, kind, mode, hooks, call records) and answers the
planner's questions about one site: the layer producing its input (:meth:`GraphView.producer`),
the layers reading its output (:meth:`GraphView.consumers`), whether a layer's weights may be
rewritten (:meth:`GraphView.layer_problem`), its eval-time affine, and what makes it unprovable
in this graph.  Layers are described the same way everywhere (:class:`Layer`); the rules
(:mod:`normswap.fold.rules`) decide on these descriptions only, so a site is decided by one rule
set whatever graph it was read from.  Every answer that is a refusal is a
:class:`normswap.reasons.Reason`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from normswap.norms import NORMS
from normswap.reasons import Reason, reason

__all__ = ["Layer", "NormSite", "GraphView", "Match", "family", "FAMILIES"]

#: the layer families a per-channel affine folds into ("convt": a transposed convolution)
FAMILIES = ("conv", "convt", "linear")


def family(kind: str) -> str | None:
    """The registry's fold family of ``kind``: "bn_like", "affine_only" or None."""
    k = NORMS.get(kind)
    return k.fold_family if k is not None else None


@dataclass
class Layer:
    """A conv / transposed conv / linear layer as a view sees it (the same fields everywhere)."""

    name: str
    family: str  # "conv" | "convt" | "linear"
    out_channels: int
    in_channels: int
    #: spatial dims of a convolution (len(kernel_size)); None for a linear layer
    dims: int | None = None
    groups: int = 1
    padding: Any = 0  # a tuple of ints, or "same" / "valid"
    padding_mode: str = "zeros"
    dilation: tuple = ()
    kernel_size: tuple = ()
    #: input ranks the view saw (None: unknown)
    ranks: set | None = None
    #: the view's own record of the layer (the module, or the program's weight placeholder ...)
    handle: Any = None
    #: the layer's type name as reports give it
    type_name: str = ""
    #: the view's extra facts about the layer (e.g. the ATen op nodes that read its weight)
    facts: dict = field(default_factory=dict)


@dataclass
class NormSite:
    """One norm site of a view: a norm module (all its calls) or one functional call."""

    name: str
    kind: str
    #: the eager module (None in compiled graphs)
    module: Any = None
    #: the view's call records (FX NodeRefs, ATen nodes, TorchScript call facts)
    calls: list = field(default_factory=list)
    #: a functional call (the view's record of it), else None
    functional: Any = None
    type_name: str | None = None
    #: the view's extra facts about the site
    facts: dict = field(default_factory=dict)


@dataclass
class Match:
    """A rule that applies: which layers absorb the norm, and how (``data``: the applier's input)."""

    into: list[str]
    pattern: str
    data: dict = field(default_factory=dict)


class GraphView:
    """The questions the planner asks; one subclass per front end.

    ``FRONT_END`` names it in reports; ``CAN_APPLY``: a fold planned on it can be applied (an
    applier exists for it).  Refusals are :class:`~normswap.reasons.Reason` strings.
    """

    FRONT_END = "graph"
    CAN_APPLY = True
    #: view capabilities a rule may need beyond the protocol ("fx": FX nodes, "aten": ATen nodes)
    CAPABILITIES: frozenset = frozenset()
    allow_training = False
    #: functional batch_norm calls are decided by the producer rules like modules (ATen graphs)
    FUNCTIONAL_AS_MODULE = False
    #: what a producer rule folds into, for "its input is X, not a ..." reasons
    PRODUCER_WHAT = "Conv/ConvTranspose/Linear"
    #: the view's applier (set by the fold job: :mod:`normswap.fold.apply_eager` / ``apply_program``)
    applier = None

    # ------------------------------------------------------------------ sites
    def sites(self) -> list[NormSite]:
        raise NotImplementedError

    def kind_problem(self, site: NormSite) -> Reason | None:
        """Why a norm of this kind and configuration never folds (the registry's answer)."""
        k = NORMS.get(site.kind)
        if k is None:
            return reason("kind_not_foldable", kind=site.kind)
        return k.fold_refusal(site.module, type_name=site.type_name,
                              base_name=site.facts.get("base_name"),
                              running_stats=site.facts.get("running_stats"))

    def hooks(self, site: NormSite) -> bool:
        return False

    def uses_problem(self, site: NormSite) -> Reason | None:
        """Why the calls of the norm seen in this graph may not be all of its uses."""
        return None

    def mode_problem(self, site: NormSite) -> Reason | None:
        """Why the norm runs with batch statistics here (training mode)."""
        return None

    def eval_affine(self, site: NormSite):
        """``(scale, shift)`` float64 of a BN-like norm at eval, or a reason."""
        raise NotImplementedError

    def norm_affine(self, site: NormSite):
        """``(scale, shift)`` float64 of an affine-only norm's gamma / beta, or a reason."""
        raise NotImplementedError

    def affine_last_dim(self, site: NormSite) -> bool:
        """Is an affine-only norm's affine over the last dim (LayerNorm / RMSNorm), not dim 1?"""
        return True

    def nonfinite_affine(self, site: NormSite) -> bool:
        return False

    def unseen_problem(self, site: NormSite) -> Reason | None:
        """Why the site's producer/consumers cannot be seen in this graph (not called, ...)."""
        return None

    def channels(self, site: NormSite) -> int:
        a = self.eval_affine(site)
        return int(a[0].numel())

    def ranks(self, site: NormSite) -> set | None:
        """Input ranks of the norm (None: unknown)."""
        return None

    def batched_ranks(self, site: NormSite) -> set | None:
        """Input ranks at which the norm takes dim 1 as its channel axis (None: any / unknown)."""
        return batched_ranks(site.type_name)

    def describe_input(self, site: NormSite) -> str:
        return "unknown"

    # ------------------------------------------------------------------ neighbours
    def producer(self, site: NormSite, families: tuple, what: str, extra_args_ok: bool = False):
        """The single layer feeding every call of the norm and nothing else, or a reason."""
        raise NotImplementedError

    def first_input_family(self, site: NormSite) -> str | None:
        """The family of the layer feeding the norm's first call (None: not a layer)."""
        return None

    def consumers(self, site: NormSite, families: tuple, what: str):
        """The layers reading the norm's output at every call (and only it), or a reason."""
        raise NotImplementedError

    def layer_problem(self, layer: Layer, families: tuple) -> Reason | None:
        """Why the layer's weights cannot be rewritten for this norm alone."""
        return None

    def tied_problem(self, site: NormSite) -> Reason | None:
        """Why the norm's own affine cannot be reset to the identity (tied parameters)."""
        return None

    def post_ops_problem(self, site: NormSite) -> Reason | None:
        return None

    def functional_problem(self, site: NormSite) -> Reason:
        """Why a functional batch_norm call no rule of this view is about is not folded."""
        return reason("functional_kind", kind=site.kind)

    # ------------------------------------------------------------------ rounds
    def mark_removed(self, site: NormSite, match: Match, removes_norm: bool) -> None:
        """A folded norm acts as the identity in later planning rounds."""


def batched_ranks(type_name: str | None) -> set[int] | None:
    """Input ranks at which a norm class takes dim 1 as its channel axis (None: any / unknown)."""
    if not type_name:
        return None
    if type_name in ("BatchNorm1d", "LazyBatchNorm1d"):
        return {2, 3}
    if type_name in ("InstanceNorm1d", "LazyInstanceNorm1d"):
        return {3}  # a 2-D input is unbatched (C, L): channels on dim 0
    if type_name.endswith("2d"):
        return {4}
    if type_name.endswith("3d"):
        return {5}
    return None

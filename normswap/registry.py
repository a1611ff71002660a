"""The norm registry's machinery: :class:`NormKind` (the facts of one kind and the per-module
questions every job asks), ``NORMS`` (kind name -> NormKind), :func:`register` and the
classification of modules by exact type, by recogniser or by structure.

The facts themselves -- one ``register(NormKind(...))`` per kind -- are in :mod:`normswap.norms`,
the one module jobs import; this module holds no kind of its own.  Matching is by **exact
type**: a subclass of a known norm (timm's ``BatchNormAct2d``) is ``unsupported_subclass`` unless
a kind's ``recognise`` predicate claims it by structure.

(About 410 lines: NormKind's per-module questions are written once here for every job.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from normswap import arith
from normswap.library_norms import is_custom_norm, is_frozen_bn
from normswap.library_norms import looks_like_norm_name as _looks_like_norm_name
from normswap.reasons import Reason, reason

__all__ = ["NormKind", "NORMS", "register", "register_type", "kind_of", "classify", "classify_type",
           "looks_like_norm_name", "known_base", "is_composite", "iter_norms", "norm_eps", "post_op_children"]


def _tensor_ok(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin) \
        and t.numel() > 0


@dataclass(frozen=True)
class NormKind:
    """Static facts about one kind of norm, and the per-module questions every job asks.

    Jobs never re-derive a per-kind fact: audit, fold, convert, export and check ask the
    kind (``NORMS[kind].eps(module)``, ``.eval_affine(module)``, ...).  Adding a kind is one
    :func:`register` call (the seed layers in :mod:`normswap.layers` register themselves).
    """

    name: str
    #: exact module types this kind matches (seed layers add theirs with :func:`register_type`)
    types: tuple[type, ...]
    #: "batch" (statistics over the batch), "sample" (per-sample statistics),
    #: "weight" (a reparametrisation of a producer's weight), "none" or "unknown"
    stats: str
    #: what the statistics are taken over, in words (x is (N, C, *spatial))
    axes: str
    #: True / False, or None when it depends on the module's configuration
    running_stats: bool | None
    affine: bool | None
    #: "yes": eval closed form is a per-channel affine; "running_stats": only when running
    #: statistics are used at eval; "affine_only": only the affine part can move into a
    #: neighbouring linear op; "bake": the weight can be baked to a constant; "partial": a part
    #: of it; "no"
    foldable: str
    onnx_ops: tuple[str, ...]
    description: str = ""
    #: True for norms built out of other modules (their children are not separate sites)
    composite: bool = False
    #: fold family: "bn_like" (eval = per-channel affine on dim 1, folds into the producing or
    #: consuming conv/linear), "affine_only" (only gamma/beta move into the next linear), or None
    fold_family: str | None = None
    #: why a norm of this kind is never folded (None: ask :meth:`fold_refusal`)
    no_fold_reason: str | None = None
    #: convert layout: "conv" (per channel on dim 1 of (N, C, *)), "token" (last dim), or None
    layout: str | None = None
    #: running-statistic buffer names (on the module, or on its ``bn`` child when composite)
    running_stat_names: tuple[str, ...] = ()
    #: eval-time affine: ``fn(module, eps) -> (scale, shift)`` float64 (built on normswap.arith)
    eval_affine_fn: Callable | None = field(default=None, compare=False, hash=False)
    #: its training forward differs from its eval forward (statistics of the batch, power
    #: iteration, ...): True, False, or None = when :meth:`uses_running_stats` says so
    mode_sensitive: bool | None = False
    #: for another library's class (timm's BatchNormAct2d, LayerNorm2d, ...): a predicate that
    #: recognises an instance by its structure (class name, base, attributes, children); it is
    #: asked before a subclass of a known type is called ``unsupported_subclass``
    recognise: Callable | None = field(default=None, compare=False, hash=False)
    #: children a structurally recognised norm applies after normalising (e.g. ("drop", "act"))
    post_ops: tuple[str, ...] = ()
    #: the class names (and base) a structurally recognised kind is known by, for readers that
    #: have a class but no instance (TorchScript / torch.export graphs): name + base only
    class_names: tuple[str, ...] = ()
    class_base: type | None = None
    #: convert replaces it when no ``--from`` is given (the BatchNorm kinds)
    convert_default: bool = False

    # ----------------------------------------------------------------- per-module questions

    def stat_module(self, module: nn.Module) -> nn.Module:
        """The module holding the statistics (a composite norm's inner ``bn``)."""
        if self.composite:
            inner = getattr(module, "bn", None)
            if isinstance(inner, nn.Module) and inner is not module:
                return inner
        return module

    def eps(self, module: nn.Module) -> float | None:
        """The eps the module uses (None when unknown / dtype-dependent)."""
        return norm_eps(module)

    def has_affine(self, module: nn.Module) -> bool | None:
        for a in ("affine", "elementwise_affine"):
            v = getattr(module, a, None)
            if isinstance(v, bool):
                return v
        if self.affine is not None:
            return self.affine
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            return True
        return False if self.name != "custom" else None

    def uses_running_stats(self, module: nn.Module) -> bool | None:
        """Does the module normalise with running statistics at eval?"""
        src = self.stat_module(module)
        v = getattr(src, "track_running_stats", None)
        if isinstance(v, bool):
            if v and self.running_stat_names:
                return all(getattr(src, n, None) is not None for n in self.running_stat_names[:1])
            return v
        if self.running_stats is not None:
            return self.running_stats
        return bool(self.running_stat_tensors(module)) or None

    def running_stat_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Running statistics (mean / var / phi / num_batches_tracked) the module holds."""
        src = self.stat_module(module)
        names = self.running_stat_names or ("running_mean", "running_var", "running_phi")
        out = {}
        for n in tuple(names) + ("num_batches_tracked",):
            t = getattr(src, n, None)
            if _tensor_ok(t):
                out[n] = t
        return out

    def is_mode_sensitive(self, module: nn.Module | None = None) -> bool:
        """Does a training-mode forward differ from the eval one (so the mode matters)?"""
        if self.mode_sensitive is None:
            return bool(module is not None and self.uses_running_stats(module))
        return bool(self.mode_sensitive)

    def batch_stats_in_training(self, module: nn.Module) -> bool:
        """In training mode, does it normalise with (and update) batch statistics?  A module in
        training mode for which this is True exports wrongly (exporters emit the eval form)."""
        if self.stats == "batch":
            return True
        if self.name == "spectral":
            return True
        return bool(self.mode_sensitive is None and self.uses_running_stats(module))

    def eval_affine(self, module: nn.Module):
        """``(scale, shift)`` float64 of the eval-time per-channel affine, or a reason string."""
        if self.eval_affine_fn is None:
            return reason("no_eval_affine", kind=self.name)
        if self.mode_sensitive is None or self.name == "bn":
            if not self.uses_running_stats(module):
                return reason("no_running_stats" if self.name == "bn" else "in_no_running_stats")
        stats = self.running_stat_tensors(module)
        for n in self.running_stat_names:
            if isinstance(getattr(self.stat_module(module), n, None), nn.parameter.UninitializedBuffer):
                return reason("lazy_norm")
            if n not in stats:
                return reason("missing_stat", name=n)
        for n in self.running_stat_names:
            t = stats.get(n)
            if n in ("running_var", "running_phi") and t is not None and t.is_floating_point() \
                    and bool((t < 0).any()):
                return reason("negative_stat", name=n, min=f"{float(t.min()):.3g}")
        eps = self.eps(module)
        out = self.eval_affine_fn(module, 1e-5 if eps is None else eps)
        if isinstance(out, str):
            return out if isinstance(out, Reason) else reason("kind_refused", text=out)
        s, t = out
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        tensors = [stats.get(n) for n in self.running_stat_names] + [
            x for x in (w, b) if isinstance(x, torch.Tensor)]
        if not arith.is_finite(*tensors) or not arith.is_finite(s, t):
            return reason("nonfinite_stats")
        return s, t

    def fold_refusal(self, module: nn.Module | None = None, *, type_name: str | None = None,
                     base_name: str | None = None, running_stats: bool | None = None) -> str | None:
        """Why a norm of this kind is never folded whatever its neighbours are; None = it may be.

        Eager callers pass the module; compiled-graph readers (TorchScript, ``.pt2``), which have
        no eager module, pass what they know: the type name, the known base's name (for an
        unsupported subclass) and whether running statistics are used at eval.
        """
        if module is not None:
            type_name = type_name or _type_name(module)
            if base_name is None and self.name == "unsupported_subclass":
                base = known_base(module)
                base_name = base.__name__ if base is not None else None
            if running_stats is None:
                running_stats = self.uses_running_stats(module)
        tname = type_name or self.name
        if self.name == "unsupported_subclass":
            return reason("unsupported_subclass", type=tname, base=base_name or "a known norm")
        if self.name == "custom":
            return reason("custom_forward_unknown", type=tname)
        if self.no_fold_reason:
            return reason("kind_refused", text=self.no_fold_reason.format(type=tname, kind=self.name))
        if self.fold_family == "bn_like" and self.mode_sensitive is None and running_stats is False:
            return reason("in_per_sample")
        if self.fold_family is None:
            return reason("kind_not_foldable", kind=self.name)
        return None

    def convert_layout(self, module: nn.Module) -> str | None:
        """"conv" / "token" when convert can replace the module, else None."""
        if self.layout == "token":
            shape = getattr(module, "normalized_shape", None)
            return "token" if shape is not None and len(tuple(shape)) == 1 else None
        return self.layout


def _type_name(module: nn.Module) -> str:
    t = _real_type(module)
    return t.__name__


NORMS: dict[str, NormKind] = {}


def register(kind: NormKind) -> NormKind:
    """Add (or replace) a kind in the registry; returns it.  Clears the type cache."""
    global _TYPE_MAP
    NORMS[kind.name] = kind
    _TYPE_MAP = None
    return kind


def register_type(kind_name: str, cls: type) -> None:
    """Make ``cls`` (exactly, not its subclasses) a module type of kind ``kind_name``."""
    global _TYPE_MAP
    k = NORMS[kind_name]
    if cls not in k.types:
        object.__setattr__(k, "types", k.types + (cls,))
    _TYPE_MAP = None


def _type_map() -> dict[type, str]:
    """Exact type -> kind, over every registered kind."""
    global _TYPE_MAP
    if _TYPE_MAP is None:
        m: dict[type, str] = {}
        for kind in NORMS.values():
            for t in kind.types:
                m[t] = kind.name
        _TYPE_MAP = m
    return _TYPE_MAP


def _real_type(module: nn.Module) -> type:
    """The module's type; for torch.nn.utils.parametrize's generated classes, the original."""
    t = type(module)
    if getattr(module, "parametrizations", None) is not None and t.__name__.startswith("Parametrized"):
        for b in t.__bases__:
            if issubclass(b, nn.Module):
                return b
    return t


def known_base(module: nn.Module) -> type | None:
    """For a subclass of a known norm type, the known base it derives from (else None)."""
    t = _real_type(module)
    tm = _type_map()
    if t in tm:
        return None
    for base in t.__mro__[1:]:
        if base in tm:
            return base
    return None


def classify(module: nn.Module) -> str | None:
    """Kind name of a module-type norm, or None if the module is not a norm.

    Exact-type match; a subclass of a known norm type is ``"unsupported_subclass"``.
    """
    t = _real_type(module)
    tm = _type_map()
    kind = tm.get(t)
    if kind is not None:
        return kind
    for k in NORMS.values():
        if k.recognise is not None:
            try:
                if k.recognise(module):
                    return k.name
            except Exception:  # noqa: BLE001 - a recogniser never breaks classification
                pass
    for base in t.__mro__[1:]:
        if base in tm:
            return "unsupported_subclass"
    if t.__module__.startswith("torch.") and not t.__module__.startswith("torch.testing"):
        return None  # torch's own classes match exactly or not at all (e.g. _SpectralNorm)
    if is_frozen_bn(module):
        return "frozen_bn"
    if is_custom_norm(module):
        return "custom"
    return None


def classify_type(cls: type) -> str | None:
    """Kind of a module *class* by type alone: exact registry type, or
    ``"unsupported_subclass"`` for a subclass of one; None otherwise (structure- and
    name-based kinds need an instance, see :func:`classify`)."""
    tm = _type_map()
    if cls in tm:
        return tm[cls]
    for k in NORMS.values():
        if k.class_names and getattr(cls, "__name__", None) in k.class_names and (
                k.class_base is None or (isinstance(cls, type) and issubclass(cls, k.class_base))):
            return k.name
    if any(base in tm for base in getattr(cls, "__mro__", ())[1:]):
        return "unsupported_subclass"
    return None


def looks_like_norm_name(class_name: str) -> bool:
    """Does a class name look like a norm's (``*Norm*``, not ``Normalize``/``PreNorm``)?"""
    return _looks_like_norm_name(class_name)


def is_composite(kind: str | None) -> bool:
    return kind is not None and kind in NORMS and NORMS[kind].composite


def kind_of(name: str) -> NormKind:
    """The registered kind ``name`` (KeyError names the known ones)."""
    try:
        return NORMS[name]
    except KeyError:
        raise KeyError(f"unknown norm kind {name!r}; known: {', '.join(NORMS)}") from None


def iter_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield (qualified name, module, kind) for every module-type norm in ``model``.

    Submodules of a norm (e.g. the inner BatchNorm of a ConditionalBatchNorm2d or of an
    unsupported subclass) are not reported separately.  A module registered under several
    names is reported once, under its first name.
    """
    root_kind = classify(model)
    if root_kind is not None:
        yield "", model, root_kind
        return
    seen: set[int] = set()
    norm_names: set[str] = set()  # linear time: look up each ancestor name, no prefix scan
    for name, mod in model.named_modules():
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        parts = name.split(".")
        if any(".".join(parts[:i]) in norm_names for i in range(1, len(parts))):
            continue
        kind = classify(mod)
        if kind is None:
            continue
        norm_names.add(name)
        yield name, mod, kind



def norm_eps(module: nn.Module) -> float | None:
    """The eps a norm module uses (None when unknown / dtype-dependent)."""
    for a in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(module, a, None)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v.detach().abs().item()) if a == "eps" and isinstance(v, nn.Parameter) else float(v.item())
        if isinstance(v, (int, float)):
            return float(v)
    inner = getattr(module, "bn", None)
    if isinstance(inner, nn.Module) and inner is not module:
        return norm_eps(inner)
    return None



def post_op_children(module: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """The children a recognised norm applies after normalising, in order (drop, act), leaving
    out ``nn.Identity`` ones: an empty list means the norm's output is its normalisation."""
    k = NORMS.get(kind)
    if k is None:
        return []
    out = []
    for n in k.post_ops:
        m = getattr(module, n, None)
        if isinstance(m, nn.Module) and type(m) is not nn.Identity:
            out.append((n, m))
    return out
